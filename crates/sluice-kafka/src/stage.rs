use std::future::Future;
use std::sync::Arc;

use sluice_messages::dead_letter::SourceCoordinates;
use sluice_messages::trace::TraceParent;

/// One consumed message, owned, with its coordinates.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub topic: Arc<str>,
    pub partition: i32,
    pub offset: i64,
    /// The Kafka message timestamp (ms), when the broker gave one.
    pub timestamp_ms: Option<i64>,
    /// The record's `traceparent` header, when it had a valid one. The runtime
    /// gives each output a child of it (or a new trace); a stage needs it only
    /// to record it (the fetcher puts it in the envelope).
    pub traceparent: Option<TraceParent>,
}

impl Incoming {
    /// Where this message was read, for dead letters.
    pub fn coordinates(&self) -> SourceCoordinates {
        SourceCoordinates { topic: self.topic.to_string(), partition: self.partition, offset: self.offset }
    }
}

/// What a stage makes of one input. Each output names its input (`source`, an
/// index into the batch) so that the runtime can commit an input only after all
/// of its outputs are acknowledged, and dead-letter it with its coordinates.
#[derive(Debug, Clone, PartialEq)]
pub enum Output {
    /// Publish `payload` to `topic`.
    Send { source: usize, topic: Arc<str>, key: Option<Vec<u8>>, payload: Vec<u8> },
    /// The input cannot be processed: publish it to the dead-letter topic.
    DeadLetter { source: usize, reason: &'static str, detail: String, event_id: Option<String> },
}

/// A whole batch failed. Poison inputs are not batch failures (they are
/// [`Output::DeadLetter`]s); this is for the stage's own troubles.
#[derive(Debug, Clone)]
pub struct BatchFailure {
    /// Whether processing the same batch again may succeed (a timeout, a
    /// dependency briefly down). The runtime retries those with backoff; any
    /// other failure stops the stage without committing the batch.
    pub retryable: bool,
    pub message: String,
}

/// A pipeline stage: turns a batch of consumed messages into outputs.
///
/// Implementations see bytes and coordinates only; consuming, producing,
/// batching, retries and commits belong to the runtime.
pub trait Stage: Send + 'static {
    /// The stage's name: in metrics, logs, dead letters and the consumer group.
    fn name(&self) -> &'static str;

    /// Processes one non-empty batch, in consumption order.
    fn process(&mut self, batch: &[Incoming]) -> impl Future<Output = Result<Vec<Output>, BatchFailure>> + Send;

    /// The dead-letter reasons this stage gives. Their counters are created at
    /// 0 when the stage starts, so that an alert on `increase()` sees the first
    /// dead letter too (a series that appears at 1 shows no increase). The
    /// runtime's own reason, `output_too_large`, is added for every stage.
    fn dead_letter_reasons(&self) -> &'static [&'static str] {
        &[]
    }
}
