//! Sluice's control plane, kept in Redis: live overrides that retune a running
//! pipeline, and the prediction cache.
//!
//! - [`overrides`]: the typed, bounded override fields and the effective
//!   [`Settings`] (built-in default < config file < Redis override).
//! - [`store`]: where overrides live (a Redis hash per scope, or in process for
//!   the embedded default), and the key layout ([`keys`]).
//! - [`controller`]: follows the store (pub/sub notification plus a periodic
//!   reconcile) and publishes the effective settings on a `watch` channel.
//! - [`cache`]: the two-tier prediction cache (bounded LRU in front of Redis).
//! - [`link`]: a Redis connection that survives outages and reports them once.
//! - [`rollout`]: safe model rollout: a candidate version beside the serving
//!   one (shadow, canary), its gates, and the decision, taken once for all replicas.

pub mod admin;
pub mod cache;
pub mod controller;
mod error;
pub mod keys;
pub mod link;
pub mod overrides;
pub mod rollout;
pub mod store;
mod telemetry;

pub use error::ControlError;
pub use overrides::{Overrides, Settings};
