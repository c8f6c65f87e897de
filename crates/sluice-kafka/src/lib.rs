//! Sluice's Kafka runtime. Stages never touch rdkafka: this crate consumes,
//! batches, hands each batch to a [`sluice_core::Stage`], produces what the stage returns
//! (dead letters included), and stores an input offset for commit only once
//! every output produced from it has been acknowledged by the broker.
//!
//! - [`config`]: broker addresses and client properties.
//! - [`batcher`]: size-or-deadline batching, the deadline timed from the oldest
//!   waiting message.
//! - [`runtime`]: the consume → batch → process → produce → commit loop, which
//!   also passes the W3C trace context on from each input to its outputs, and
//!   reports consumer lag from librdkafka's statistics.
//! - [`progress`]: the time the lag would take to drain, and stalled partitions.
//! - [`lanes`]: live work before bulk, bulk backpressure by pausing partitions.
//! - [`latency`]: a batch policy that holds a p99 latency target by itself.
//! - [`admin`] and [`embedded`]: topic creation, and librdkafka's in-process
//!   mock cluster for the demo and fast tests.

pub mod admin;
pub mod batcher;
pub mod client;
pub mod config;
pub mod embedded;
mod error;
mod lag;
pub mod lanes;
pub mod latency;
pub mod progress;
pub mod runtime;
pub mod status;
mod telemetry;

pub use batcher::BatchPolicy;
pub use config::KafkaConfig;
pub use error::KafkaRuntimeError;
pub use lanes::Lanes;
pub use runtime::{RunOptions, run_stage};
pub use status::StageStatus;
