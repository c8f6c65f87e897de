//! Sluice's messages: what producers publish, what stages pass each other, and
//! what comes out.
//!
//! - [`events`]: the JSON request events producers publish to the `requests`
//!   topic (schemas in `schemas/`), parsed and validated.
//! - [`envelope`]: the versioned binary envelope between stages.
//! - [`codec`]: the one place that knows the envelope's byte format (bincode
//!   today; swappable without touching the stages).
//! - [`dead_letter`] and [`prediction`]: the JSON records of the dead-letter and
//!   predictions topics.
//! - [`trace`]: the W3C `traceparent` every record carries in its headers.

pub mod codec;
pub mod dead_letter;
pub mod envelope;
mod error;
pub mod events;
pub mod prediction;
pub mod trace;

pub use error::MessageError;

/// Milliseconds since the Unix epoch, the unit of every timestamp in our messages.
pub fn now_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}
