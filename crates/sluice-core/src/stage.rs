use std::error::Error;
use std::future::Future;
use std::sync::Arc;

use sluice_messages::dead_letter::{Reason, SourceCoordinates};
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
    /// A message read at `topic`/`partition`/`offset`, with no key, timestamp
    /// or trace (benchmarks and tests feed stages these).
    pub fn new(topic: &str, partition: i32, offset: i64, payload: Vec<u8>) -> Self {
        Self { key: None, payload, topic: topic.into(), partition, offset, timestamp_ms: None, traceparent: None }
    }

    /// The same message, keyed.
    pub fn with_key(mut self, key: &[u8]) -> Self {
        self.key = Some(key.to_vec());
        self
    }

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
    /// `original`: the bytes to keep (and replay) instead of the input's,
    /// where the input carries several events and only this one failed (a
    /// step of a backfill's series: its own window's envelope).
    DeadLetter { source: usize, reason: Reason, detail: String, event_id: Option<String>, original: Option<Vec<u8>> },
}

/// A whole batch failed. Poison inputs are not batch failures (they are
/// [`Output::DeadLetter`]s); this is for the stage's own troubles. It keeps
/// the error it came from, so that a log line can show its causes.
#[derive(Debug, Clone)]
pub struct BatchFailure {
    /// Whether processing the same batch again may succeed (a timeout, a
    /// dependency briefly down). The runtime retries those with backoff; any
    /// other failure stops the stage without committing the batch.
    pub retryable: bool,
    pub message: String,
    source: Option<Arc<dyn Error + Send + Sync>>,
}

impl BatchFailure {
    /// A failure that trying the same batch again may cure.
    pub fn retryable(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self::of(true, error.into())
    }

    /// A failure that only a fix can cure: the stage stops.
    pub fn fatal(error: impl Into<Box<dyn Error + Send + Sync>>) -> Self {
        Self::of(false, error.into())
    }

    fn of(retryable: bool, error: Box<dyn Error + Send + Sync>) -> Self {
        Self { retryable, message: error.to_string(), source: Some(Arc::from(error)) }
    }

    /// The same failure, its message prefixed with what was being done.
    pub fn context(mut self, doing: &str) -> Self {
        self.message = format!("{doing}: {}", self.message);
        self
    }
}

impl std::fmt::Display for BatchFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl Error for BatchFailure {
    /// The causes of the error it was made from (whose own text is already
    /// the message).
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        self.source.as_deref().and_then(|e| e.source())
    }
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

    /// Processes `batch` as [`Stage::process`] does, given the batch that
    /// will follow it where the runtime already has it (a backlog). A stage
    /// whose work waits on something else (the model stage on its model
    /// thread) may prepare `next` meanwhile, for this method's next call to
    /// use; it must not assume that call comes (a retry of `batch`, or a
    /// shutdown, may come first). By default `next` is ignored.
    fn process_before(
        &mut self,
        batch: &[Incoming],
        next: Option<&[Incoming]>,
    ) -> impl Future<Output = Result<Vec<Output>, BatchFailure>> + Send {
        let _ = next;
        self.process(batch)
    }

    /// The dead-letter reasons this stage gives. Their counters are created at
    /// 0 when the stage starts, so that an alert on `increase()` sees the first
    /// dead letter too (a series that appears at 1 shows no increase). The
    /// runtime's own reason, [`Reason::OutputTooLarge`], is added for every stage.
    fn dead_letter_reasons(&self) -> &'static [Reason] {
        &[]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_failure_keeps_its_cause_and_says_what_was_being_done() {
        let io = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset by peer");
        let failure = BatchFailure::retryable(io).context("saving predictions");
        assert!(failure.retryable);
        assert_eq!(failure.to_string(), "saving predictions: reset by peer");
        let fatal = BatchFailure::fatal("no such table");
        assert!(!fatal.retryable);
    }
}
