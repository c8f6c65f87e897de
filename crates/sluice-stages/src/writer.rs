//! The writer: drops stock predictions and query intents under
//! `min_confidence` (counted, not saved) and writes the rest, in batches, to the
//! `predictions` topic (JSON, `kind` says which), a JSON-lines file and the sink.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::counter;
use sluice_control::Settings;
use sluice_kafka::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::envelope::Payload;
use sluice_messages::prediction::{IntentRecord, ModelRef, PredictionRecord};
use tokio::sync::watch;

use crate::StageError;
use crate::common::{dead_letter, decode};

/// A durable destination for saved predictions (PostgreSQL). Called once per
/// batch, before the batch's offsets can be committed; it must be idempotent
/// by event id, since a crash or rebalance re-delivers what was not committed.
pub trait PredictionSink: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Writes a batch's stock predictions and query intents in one
    /// transaction; an `Err` fails the whole batch (retried by the runtime
    /// when retryable).
    fn write<'a>(
        &'a self,
        stocks: &'a [PredictionRecord],
        intents: &'a [IntentRecord],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BatchFailure>> + Send + 'a>>;
}

/// One saved answer and its JSON.
enum Record {
    Stock(PredictionRecord, Vec<u8>),
    Intent(IntentRecord, Vec<u8>),
}

/// Counts shared with whoever reports on the writer (the demo's summary).
#[derive(Debug, Default)]
pub struct WriterStats {
    pub written: AtomicU64,
    pub below_min_confidence: AtomicU64,
}

/// The writer stage.
pub struct Writer {
    /// `min_confidence` is read from here before each batch (Redis overrides).
    settings: watch::Receiver<Settings>,
    file: Option<(PathBuf, BufWriter<File>)>,
    sink: Option<Box<dyn PredictionSink>>,
    output: Arc<str>,
    stats: Arc<WriterStats>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("file", &self.file.as_ref().map(|(p, _)| p))
            .field("sink", &self.sink.as_ref().map(|s| s.name()))
            .finish_non_exhaustive()
    }
}

impl Writer {
    /// The dead-letter reasons this stage gives (docs/instrumentation.md).
    pub const DEAD_LETTER_REASONS: &[&str] =
        &["unknown_envelope_version", "undecodable_envelope", "unexpected_payload", "non_finite_prediction"];

    /// Drops predictions under the live `min_confidence`; appends the others
    /// to `file` (JSON lines) if one is given, and publishes them to `output_topic`.
    pub fn new(
        settings: watch::Receiver<Settings>,
        file: Option<&Path>,
        output_topic: &str,
        stats: Arc<WriterStats>,
    ) -> Result<Self, StageError> {
        let file = match file {
            Some(path) => Some((path.to_path_buf(), BufWriter::new(open_append(path)?))),
            None => None,
        };
        Ok(Self { settings, file, sink: None, output: output_topic.into(), stats })
    }

    /// Also writes every saved prediction to `sink`, in one transaction per batch.
    pub fn with_sink(mut self, sink: Box<dyn PredictionSink>) -> Self {
        self.sink = Some(sink);
        self
    }
}

fn open_append(path: &Path) -> Result<File, StageError> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| StageError::Sink { sink: "file", message: format!("{}: {e}", path.display()) })
}

impl Stage for Writer {
    fn name(&self) -> &'static str {
        "writer"
    }

    fn dead_letter_reasons(&self) -> &'static [&'static str] {
        Self::DEAD_LETTER_REASONS
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let mut outputs = Vec::with_capacity(batch.len());
        let mut lines = Vec::new();
        let mut below = 0;
        let (mut stocks, mut intents) = (Vec::new(), Vec::new());
        let written_at_ms = sluice_messages::now_ms();
        let min_confidence = self.settings.borrow().min_confidence;
        for (i, input) in batch.iter().enumerate() {
            let envelope = match decode(i, input) {
                Ok(envelope) => envelope,
                Err(dead) => {
                    outputs.push(dead);
                    continue;
                }
            };
            let model = |name: &str, version: &str| ModelRef { name: name.to_string(), version: version.to_string() };
            let (confidence, json) = match &envelope.payload {
                Payload::Prediction(p) if p.confidence.is_finite() && p.predicted_return.is_finite() => {
                    let record = PredictionRecord {
                        event_id: envelope.event_id.clone(),
                        kind: "stock".into(),
                        symbol: p.symbol.clone(),
                        as_of: p.as_of,
                        predicted_return: p.predicted_return,
                        confidence: p.confidence,
                        model: model(&p.model_name, &p.model_version),
                        batch_size: p.batch_size,
                        cached: p.cached,
                        requested_at_ms: envelope.requested_at_ms,
                        inferred_at_ms: p.inferred_at_ms,
                        written_at_ms,
                    };
                    let json = serde_json::to_vec(&record).expect("a PredictionRecord always serialises");
                    (p.confidence, Record::Stock(record, json))
                }
                Payload::Intent(q) if q.confidence.is_finite() && q.top.iter().all(|t| t.score.is_finite()) => {
                    let record = IntentRecord {
                        event_id: envelope.event_id.clone(),
                        kind: "query".into(),
                        text: q.text.clone(),
                        label: q.label.clone(),
                        confidence: q.confidence,
                        top: q.top.clone(),
                        model: model(&q.model_name, &q.model_version),
                        batch_size: q.batch_size,
                        cached: q.cached,
                        requested_at_ms: envelope.requested_at_ms,
                        inferred_at_ms: q.inferred_at_ms,
                        written_at_ms,
                    };
                    let json = serde_json::to_vec(&record).expect("an IntentRecord always serialises");
                    (q.confidence, Record::Intent(record, json))
                }
                Payload::Prediction(p) => {
                    let e = StageError::NonFinitePrediction {
                        output: "confidence or predicted_return",
                        value: p.confidence,
                    };
                    outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                    continue;
                }
                Payload::Intent(q) => {
                    let e = StageError::NonFinitePrediction { output: "confidence or scores", value: q.confidence };
                    outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                    continue;
                }
                other => {
                    let e = StageError::UnexpectedPayload { expected: "prediction or intent", got: other.kind() };
                    outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                    continue;
                }
            };
            if confidence < min_confidence {
                below += 1;
                continue;
            }
            let json = match json {
                Record::Stock(record, json) => {
                    if self.sink.is_some() {
                        stocks.push(record);
                    }
                    json
                }
                Record::Intent(record, json) => {
                    if self.sink.is_some() {
                        intents.push(record);
                    }
                    json
                }
            };
            if self.file.is_some() {
                lines.extend_from_slice(&json);
                lines.push(b'\n');
            }
            outputs.push(Output::Send {
                source: i,
                topic: self.output.clone(),
                key: Some(envelope.event_id.into_bytes()),
                payload: json,
            });
        }
        if let Some((path, file)) = &mut self.file
            && !lines.is_empty()
        {
            // Durable before the batch's offsets can be committed. A failure is
            // retried (the batch is processed again, nothing is committed), so
            // first cut the file back to where this batch began: no torn line,
            // no half batch written twice.
            let start = file.get_ref().metadata().map(|m| m.len());
            let written = file.write_all(&lines).and_then(|()| file.flush()).and_then(|()| file.get_ref().sync_data());
            if let Err(e) = written {
                if let (Ok(len), Ok(f)) = (start, open_append(path))
                    && f.set_len(len).is_ok()
                {
                    // into_parts drops the unwritten buffer; dropping the old
                    // writer would flush it after the cut.
                    let _ = std::mem::replace(file, BufWriter::new(f)).into_parts();
                }
                return Err(BatchFailure { retryable: true, message: format!("writing {}: {e}", path.display()) });
            }
        }
        if let Some(sink) = &self.sink
            && !(stocks.is_empty() && intents.is_empty())
        {
            // Committed before the batch's offsets can be: a re-delivery
            // re-writes the same event ids, which the sink ignores.
            sink.write(&stocks, &intents).await?;
        }
        let written = outputs.iter().filter(|o| matches!(o, Output::Send { .. })).count() as u64;
        self.stats.written.fetch_add(written, Ordering::Relaxed);
        self.stats.below_min_confidence.fetch_add(below, Ordering::Relaxed);
        counter!("sluice_writer_predictions_written_total").increment(written);
        counter!("sluice_writer_below_min_confidence_total").increment(below);
        Ok(outputs)
    }
}
