//! The writer: drops predictions under `min_confidence` (counted, not saved)
//! and writes the rest, in batches, to the `predictions` topic (JSON) and to a
//! JSON-lines file.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use metrics::counter;
use sluice_control::Settings;
use sluice_kafka::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::envelope::Payload;
use sluice_messages::prediction::{ModelRef, PredictionRecord};
use tokio::sync::watch;

use crate::StageError;
use crate::common::{dead_letter, decode};

/// A durable destination for saved predictions (PostgreSQL). Called once per
/// batch, before the batch's offsets can be committed; it must be idempotent
/// by event id, since a crash or rebalance re-delivers what was not committed.
pub trait PredictionSink: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Writes the records in one transaction; an `Err` fails the whole batch
    /// (retried by the runtime when retryable).
    fn write<'a>(
        &'a self,
        records: &'a [PredictionRecord],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), BatchFailure>> + Send + 'a>>;
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

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let mut outputs = Vec::with_capacity(batch.len());
        let mut lines = Vec::new();
        let mut below = 0;
        let mut records = Vec::new();
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
            let Payload::Prediction(p) = &envelope.payload else {
                let e = StageError::UnexpectedPayload { expected: "prediction", got: envelope.payload.kind() };
                outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                continue;
            };
            if !(p.confidence.is_finite() && p.predicted_return.is_finite()) {
                let e =
                    StageError::NonFinitePrediction { output: "confidence or predicted_return", value: p.confidence };
                outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                continue;
            }
            if p.confidence < min_confidence {
                below += 1;
                continue;
            }
            let record = PredictionRecord {
                event_id: envelope.event_id.clone(),
                kind: "stock".into(),
                symbol: p.symbol.clone(),
                as_of: p.as_of,
                predicted_return: p.predicted_return,
                confidence: p.confidence,
                model: ModelRef { name: p.model_name.clone(), version: p.model_version.clone() },
                batch_size: p.batch_size,
                cached: p.cached,
                requested_at_ms: envelope.requested_at_ms,
                inferred_at_ms: p.inferred_at_ms,
                written_at_ms,
            };
            let json = serde_json::to_vec(&record).expect("a PredictionRecord always serialises");
            if self.sink.is_some() {
                records.push(record);
            }
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
            && !records.is_empty()
        {
            // Committed before the batch's offsets can be: a re-delivery
            // re-writes the same event ids, which the sink ignores.
            sink.write(&records).await?;
        }
        let written = outputs.iter().filter(|o| matches!(o, Output::Send { .. })).count() as u64;
        self.stats.written.fetch_add(written, Ordering::Relaxed);
        self.stats.below_min_confidence.fetch_add(below, Ordering::Relaxed);
        counter!("sluice_writer_predictions_written_total").increment(written);
        counter!("sluice_writer_below_min_confidence_total").increment(below);
        Ok(outputs)
    }
}
