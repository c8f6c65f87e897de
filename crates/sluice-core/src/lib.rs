//! Sluice's seams, in a crate with no Kafka client and no model engine, so
//! that every crate above them (the stages, the sinks, the runtime) is
//! built and tested on its own:
//!
//! - [`Stage`]: what a pipeline stage is, with the batch it gets
//!   ([`Incoming`]), what it returns ([`Output`]) and how a whole batch fails
//!   ([`BatchFailure`]). The Kafka runtime (`sluice-kafka`) drives it.
//! - [`ConfigError`]: a bad setting, always naming its key.
//! - [`Secret`]: a value (a DSN, a password) that prints as `<redacted>`.

mod config;
mod secret;
mod stage;

pub use config::ConfigError;
pub use secret::Secret;
pub use stage::{BatchFailure, Incoming, Output, Stage};
