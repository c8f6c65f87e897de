//! Sluice's four stages. Each implements [`sluice_kafka::Stage`]: it gets a
//! batch of consumed messages and returns what to publish, dead letters
//! included. None of them touches rdkafka.
//!
//! ```text
//! requests ─► fetcher ─► fetched ─► normalizer ─► normalized ─► inferrer ─► predictions-internal ─► writer ─► predictions (JSON) + file
//! ```

mod common;
mod error;
pub mod fetcher;
pub mod generate;
pub mod inferrer;
pub mod normalizer;
pub mod writer;

pub use error::StageError;
pub use fetcher::Fetcher;
pub use inferrer::{Inferrer, InferrerStats, QueryInferrer};
pub use normalizer::Normalizer;
pub use writer::{PredictionSink, Writer, WriterStats};
