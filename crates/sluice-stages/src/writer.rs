//! The writer: drops stock predictions and query intents under
//! `min_confidence` (counted, not saved) and writes the rest, in batches, to the
//! sink (PostgreSQL), then a JSON-lines file, then the `predictions` topic
//! (JSON, `kind` says which). Rows the sink refuses for good are isolated and
//! dead-lettered; the rest of their batch is saved and published.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use sluice_control::Settings;
use sluice_core::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Envelope, Payload};
use sluice_messages::prediction::{IntentRecord, ModelRef, PredictionRecord};
use tokio::sync::watch;

use crate::common::{dead_letter, decode};
use crate::{StageError, telemetry};

/// A durable destination for saved predictions (PostgreSQL). Called once per
/// batch, before the batch's offsets can be committed; it must be idempotent
/// by event id, since a crash or rebalance re-delivers what was not committed.
pub trait PredictionSink: Send + Sync + 'static {
    fn name(&self) -> &'static str;

    /// Writes stock predictions and query intents in one transaction: all of
    /// them, or none.
    fn write<'a>(
        &'a self,
        stocks: &'a [PredictionRecord],
        intents: &'a [IntentRecord],
    ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SinkError>> + Send + 'a>>;
}

/// Why a sink did not save a write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SinkError {
    /// The same write may succeed later (connection trouble, a timeout, a
    /// lock, a read-only database): the batch is retried with backoff.
    Retryable(String),
    /// The sink refuses some of these rows and will refuse them again (bad
    /// data): the writer splits the write until the rows refused alone are
    /// found, dead-letters them (`sink_refused`) and saves the rest.
    Refused(String),
    /// Only a fix of the deployment can help (a missing table): the stage stops.
    Fatal(String),
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
    /// Where saved answers are published.
    output: Arc<str>,
    stats: Arc<WriterStats>,
    /// A rollout's shadow answers (`shadow-writer`): none filtered, counted apart.
    shadow: bool,
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
    pub const DEAD_LETTER_REASONS: &[Reason] = &[
        Reason::UnknownEnvelopeVersion,
        Reason::UndecodableEnvelope,
        Reason::UnexpectedPayload,
        Reason::NonFinitePrediction,
        Reason::PredictionOutOfRange,
        Reason::SinkRefused,
    ];

    /// Drops predictions under the live `min_confidence`; appends the others
    /// to `file` (JSON lines) if one is given, and publishes them to `output_topic`.
    pub fn new(
        settings: watch::Receiver<Settings>,
        file: Option<&Path>,
        output_topic: &str,
        stats: Arc<WriterStats>,
    ) -> std::io::Result<Self> {
        let file = match file {
            Some(path) => Some((path.to_path_buf(), BufWriter::new(open_append(path)?))),
            None => None,
        };
        Ok(Self { settings, file, sink: None, output: output_topic.into(), stats, shadow: false })
    }

    /// The writer of a rollout's shadow answers (`shadow-writer`): every one
    /// published to `output_topic` (and saved to a sink given with
    /// [`Writer::with_sink`]: the shadow tables), none filtered by confidence.
    pub fn shadow(settings: watch::Receiver<Settings>, output_topic: &str, stats: Arc<WriterStats>) -> Self {
        Self { settings, file: None, sink: None, output: output_topic.into(), stats, shadow: true }
    }

    /// Also writes every saved prediction to `sink`, in one transaction per batch.
    pub fn with_sink(mut self, sink: Box<dyn PredictionSink>) -> Self {
        self.sink = Some(sink);
        self
    }
}

fn open_append(path: &Path) -> std::io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| std::io::Error::new(e.kind(), format!("the file sink {}: {e}", path.display())))
}

/// One answer to save: the input it came from, its key and its JSON.
struct Saved {
    source: usize,
    event_id: String,
    key: Vec<u8>,
    json: Vec<u8>,
    stock: bool,
}

/// A batch's answers, before anything is written.
#[derive(Default)]
struct Answers {
    saved: Vec<Saved>,
    /// The sink's rows (with a sink only), and the index in `saved` of each
    /// (the stocks first, then the intents).
    stocks: Vec<PredictionRecord>,
    intents: Vec<IntentRecord>,
    sink_rows: Vec<usize>,
}

impl Writer {
    /// The record for one decoded answer, or why it is not publishable.
    fn record(envelope: Envelope, written_at_ms: i64) -> Result<(f32, Record), (StageError, String)> {
        let model = |name: &str, version: &str| ModelRef { name: name.to_string(), version: version.to_string() };
        let event_id = envelope.event_id;
        let bad = |e: StageError, id: String| Err((e, id));
        match envelope.payload {
            Payload::Prediction(p) => {
                if let Some((output, value)) = [("predicted_return", p.predicted_return), ("confidence", p.confidence)]
                    .into_iter()
                    .find(|(_, v)| !v.is_finite())
                {
                    return bad(StageError::NonFinitePrediction { output: output.into(), value }, event_id);
                }
                if !(0.0..=1.0).contains(&p.confidence) {
                    let e =
                        StageError::OutOfRange { output: "confidence".into(), value: p.confidence, min: 0.0, max: 1.0 };
                    return bad(e, event_id);
                }
                let record = PredictionRecord {
                    event_id,
                    kind: "stock".into(),
                    symbol: p.symbol,
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
                Ok((record.confidence, Record::Stock(record)))
            }
            Payload::Intent(q) => {
                if let Some(value) =
                    std::iter::once(q.confidence).chain(q.top.iter().map(|t| t.score)).find(|v| !v.is_finite())
                {
                    let e = StageError::NonFinitePrediction { output: "confidence or scores".into(), value };
                    return bad(e, event_id);
                }
                if let Some(value) = std::iter::once(q.confidence)
                    .chain(q.top.iter().map(|t| t.score))
                    .find(|v| !(0.0..=1.0).contains(v))
                {
                    let e = StageError::OutOfRange { output: "confidence or scores".into(), value, min: 0.0, max: 1.0 };
                    return bad(e, event_id);
                }
                let record = IntentRecord {
                    event_id,
                    kind: "query".into(),
                    text: q.text,
                    label: q.label,
                    confidence: q.confidence,
                    top: q.top,
                    model: model(&q.model_name, &q.model_version),
                    batch_size: q.batch_size,
                    cached: q.cached,
                    requested_at_ms: envelope.requested_at_ms,
                    inferred_at_ms: q.inferred_at_ms,
                    written_at_ms,
                };
                Ok((record.confidence, Record::Intent(record)))
            }
            other => {
                bad(StageError::UnexpectedPayload { expected: "prediction or intent", got: other.kind() }, event_id)
            }
        }
    }
}

/// A stock prediction or a query intent, ready to save.
enum Record {
    Stock(PredictionRecord),
    Intent(IntentRecord),
}

/// Writes `stocks` then `intents` to `sink` in one write; where the sink
/// refuses rows, splits the write in halves until the rows it refuses alone
/// are found (as a failing model call is bisected). Returns the sink's reason
/// for each row it refused (indices: the stocks, then the intents). Rows saved
/// by a part that succeeded stay saved when a later part fails: the sink is
/// idempotent, so the retried batch adds nothing twice.
async fn save_isolating(
    sink: &dyn PredictionSink,
    stocks: &[PredictionRecord],
    intents: &[IntentRecord],
) -> Result<Vec<Option<String>>, BatchFailure> {
    let (ns, n) = (stocks.len(), stocks.len() + intents.len());
    let mut refused = vec![None; n];
    // Ranges still to write, as a stack: a split pushes its second half first.
    let mut pending = Vec::with_capacity(8);
    pending.push(0..n);
    while let Some(range) = pending.pop() {
        if range.is_empty() {
            continue;
        }
        let part_stocks = &stocks[range.start.min(ns)..range.end.min(ns)];
        let part_intents = &intents[range.start.saturating_sub(ns)..range.end.saturating_sub(ns)];
        match sink.write(part_stocks, part_intents).await {
            Ok(()) => {}
            Err(SinkError::Refused(reason)) if range.len() == 1 => refused[range.start] = Some(reason),
            Err(SinkError::Refused(reason)) => {
                telemetry::sink_bisected(sink.name(), range.len(), &reason);
                let mid = range.start + range.len() / 2;
                pending.push(mid..range.end);
                pending.push(range.start..mid);
            }
            Err(SinkError::Retryable(message)) => {
                return Err(BatchFailure::retryable(message).context(&format!("sink {}", sink.name())));
            }
            Err(SinkError::Fatal(message)) => {
                return Err(BatchFailure::fatal(message).context(&format!("sink {}", sink.name())));
            }
        }
    }
    Ok(refused)
}

impl Stage for Writer {
    fn name(&self) -> &'static str {
        if self.shadow { "shadow-writer" } else { "writer" }
    }

    fn dead_letter_reasons(&self) -> &'static [Reason] {
        Self::DEAD_LETTER_REASONS
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let mut outputs = Vec::with_capacity(batch.len());
        let mut below = 0;
        let mut answers = Answers::default();
        let written_at_ms = sluice_messages::now_ms();
        // Shadow answers are all kept: they are compared, not served.
        let min_confidence = if self.shadow { 0.0 } else { self.settings.borrow().min_confidence };
        for (i, input) in batch.iter().enumerate() {
            let envelope = match decode(i, input) {
                Ok(envelope) => envelope,
                Err(dead) => {
                    outputs.push(dead);
                    continue;
                }
            };
            // Keyed like the input, as every stage keys its outputs: the
            // producer's key, else the event id.
            let key = input.key.clone().unwrap_or_else(|| envelope.event_id.as_bytes().to_vec());
            let (confidence, record) = match Self::record(envelope, written_at_ms) {
                Ok(answer) => answer,
                Err((e, event_id)) => {
                    outputs.push(dead_letter(i, &e, Some(event_id)));
                    continue;
                }
            };
            if confidence < min_confidence {
                below += 1;
                continue;
            }
            let (event_id, json, stock) = match &record {
                Record::Stock(r) => {
                    (r.event_id.clone(), serde_json::to_vec(r).expect("a PredictionRecord always serialises"), true)
                }
                Record::Intent(r) => {
                    (r.event_id.clone(), serde_json::to_vec(r).expect("an IntentRecord always serialises"), false)
                }
            };
            if self.sink.is_some() {
                match record {
                    Record::Stock(r) => answers.stocks.push(r),
                    Record::Intent(r) => answers.intents.push(r),
                }
            }
            answers.saved.push(Saved { source: i, event_id, key, json, stock });
        }
        // The sink's rows in its order (the stocks, then the intents) -> their index in `saved`.
        if self.sink.is_some() {
            let (stocks, intents): (Vec<usize>, Vec<usize>) =
                (0..answers.saved.len()).partition(|i| answers.saved[*i].stock);
            answers.sink_rows = stocks.into_iter().chain(intents).collect();
        }

        // 1. The sink, committed before the batch's offsets can be: a
        //    re-delivery re-writes the same event ids, which the sink ignores.
        //    Rows it refuses for good are dead letters; the rest are saved.
        let mut refused: Vec<Option<String>> = vec![None; answers.saved.len()];
        if let Some(sink) = &self.sink
            && !answers.sink_rows.is_empty()
        {
            let by_row = save_isolating(sink.as_ref(), &answers.stocks, &answers.intents).await?;
            for (row, reason) in by_row.into_iter().enumerate() {
                refused[answers.sink_rows[row]] = reason;
            }
        }
        // 2. The file, last: a retried batch (a sink failure above) has not
        //    written it yet, so each batch is appended once.
        let mut lines = Vec::new();
        if self.file.is_some() {
            for (saved, refused) in answers.saved.iter().zip(&refused) {
                if refused.is_none() {
                    lines.extend_from_slice(&saved.json);
                    lines.push(b'\n');
                }
            }
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
                return Err(BatchFailure::retryable(e).context(&format!("writing {}", path.display())));
            }
        }
        // 3. The topic.
        let sink_name = self.sink.as_ref().map_or("sink", |s| s.name());
        let mut written = 0;
        for (saved, refused) in answers.saved.into_iter().zip(refused) {
            match refused {
                None => {
                    written += 1;
                    outputs.push(Output::Send {
                        source: saved.source,
                        topic: self.output.clone(),
                        key: Some(saved.key),
                        payload: saved.json,
                    });
                }
                Some(message) => {
                    let e = StageError::SinkRefused { sink: sink_name, message };
                    outputs.push(dead_letter(saved.source, &e, Some(saved.event_id)));
                }
            }
        }
        self.stats.written.fetch_add(written, Ordering::Relaxed);
        self.stats.below_min_confidence.fetch_add(below, Ordering::Relaxed);
        if self.shadow {
            telemetry::shadow_written(written);
        } else {
            telemetry::written(written, below);
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;
    use std::sync::atomic::AtomicU32;

    use sluice_messages::codec;
    use sluice_messages::envelope::{LabelScore, QueryIntent};

    use super::*;
    use crate::testing::settings;

    /// Refuses (for good) any write holding a text with "poison" in it; fails
    /// the first `flaky` writes as retryable.
    #[derive(Default)]
    struct FakeSink {
        flaky: AtomicU32,
        writes: AtomicU32,
        saved: Mutex<Vec<String>>,
    }

    impl PredictionSink for Arc<FakeSink> {
        fn name(&self) -> &'static str {
            "fake"
        }

        fn write<'a>(
            &'a self,
            _: &'a [PredictionRecord],
            intents: &'a [IntentRecord],
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Result<(), SinkError>> + Send + 'a>> {
            Box::pin(async move {
                self.writes.fetch_add(1, Ordering::Relaxed);
                if self.flaky.load(Ordering::Relaxed) > 0 {
                    self.flaky.fetch_sub(1, Ordering::Relaxed);
                    return Err(SinkError::Retryable("connection reset".into()));
                }
                if intents.iter().any(|i| i.text.contains("poison")) {
                    return Err(SinkError::Refused("SQLSTATE 22021: invalid byte sequence".into()));
                }
                self.saved.lock().expect("lock").extend(intents.iter().map(|i| i.event_id.clone()));
                Ok(())
            })
        }
    }

    fn intent(offset: i64, text: &str, key: Option<&str>) -> Incoming {
        let envelope = Envelope::new(
            &format!("q-{offset}"),
            Payload::Intent(QueryIntent {
                text: text.into(),
                label: "check_balance".into(),
                confidence: 0.9,
                top: vec![LabelScore { label: "check_balance".into(), score: 0.9 }],
                model_name: "query-intent".into(),
                model_version: "1".into(),
                batch_size: 8,
                padded_length: 6,
                cached: false,
                inferred_at_ms: 3,
            }),
        );
        let input = Incoming::new("inferred", 0, offset, codec::encode(&envelope));
        match key {
            Some(key) => input.with_key(key.as_bytes()),
            None => input,
        }
    }

    #[tokio::test]
    async fn rows_the_sink_refuses_are_isolated_and_the_file_gets_each_batch_once() {
        let dir = std::env::temp_dir().join(format!("sluice-writer-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("predictions.jsonl");
        let _ = std::fs::remove_file(&file);
        let sink = Arc::new(FakeSink { flaky: AtomicU32::new(2), ..FakeSink::default() });
        let (_tx, rx) = watch::channel(settings());
        let mut writer = Writer::new(rx, Some(&file), "predictions", Arc::default())
            .expect("writer")
            .with_sink(Box::new(sink.clone()));
        let batch: Vec<Incoming> = (0..8)
            .map(|i| {
                let text = if i == 2 || i == 5 { "poison\u{0}" } else { "what is my balance" };
                intent(i, text, (i == 0).then_some("customer-7"))
            })
            .collect();

        // A retryable failure writes nothing to the file, however often it happens.
        for _ in 0..2 {
            let failure = writer.process(&batch).await.expect_err("retryable");
            assert!(failure.retryable, "{}", failure.message);
            assert!(std::fs::read_to_string(&file).unwrap_or_default().is_empty());
        }
        let outputs = writer.process(&batch).await.expect("processed");
        let dead: Vec<(usize, Reason, &str)> = outputs
            .iter()
            .filter_map(|o| match o {
                Output::DeadLetter { source, reason, detail, .. } => Some((*source, *reason, detail.as_str())),
                Output::Send { .. } => None,
            })
            .collect();
        assert_eq!(
            dead.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(),
            vec![(2, Reason::SinkRefused), (5, Reason::SinkRefused)]
        );
        assert!(dead[0].2.contains("SQLSTATE 22021"), "{}", dead[0].2);
        let mut saved = sink.saved.lock().expect("lock").clone();
        saved.sort();
        assert_eq!(saved, ["q-0", "q-1", "q-3", "q-4", "q-6", "q-7"]);
        let lines = std::fs::read_to_string(&file).expect("file");
        assert_eq!(lines.lines().count(), 6, "{lines}");
        assert!(!lines.contains("poison"));
        // Outputs are keyed like their input: the producer's key, else the event id.
        let keys: Vec<Option<&[u8]>> = outputs
            .iter()
            .filter_map(|o| match o {
                Output::Send { key, .. } => Some(key.as_deref()),
                Output::DeadLetter { .. } => None,
            })
            .collect();
        assert_eq!(keys[0], Some(&b"customer-7"[..]));
        assert_eq!(keys[1], Some(&b"q-1"[..]));
        std::fs::remove_dir_all(&dir).expect("clean up");
    }

    #[tokio::test]
    async fn answers_outside_the_published_range_are_dead_letters() {
        let (_tx, rx) = watch::channel(settings());
        let mut writer = Writer::new(rx, None, "predictions", Arc::default()).expect("writer");
        let mut input = intent(0, "hello", None);
        let mut envelope = codec::decode(&input.payload).expect("envelope");
        if let Payload::Intent(q) = &mut envelope.payload {
            q.confidence = 1.5;
        }
        input.payload = codec::encode(&envelope);
        let outputs = writer.process(&[input]).await.expect("processed");
        assert!(
            matches!(&outputs[..], [Output::DeadLetter { reason: Reason::PredictionOutOfRange, .. }]),
            "{outputs:?}"
        );
    }
}
