//! The inferrers: each answers the batches the runtime cuts (size, or deadline
//! from the oldest message) from the prediction cache where it can, and runs
//! its model on the rest, on the model thread, while the runtime accumulates
//! the next batch. Identical inputs in a batch share one model row. Non-finite
//! answers are dead letters. A `model_version` override loads the new version
//! beside the serving one, warms it up, and swaps it in between two batches.
//!
//! [`Inferrer`] serves the stock model (normalised windows, one model call per
//! batch); [`QueryInferrer`] the query model (token ids, padded per call to the
//! call's longest sequence, calls capped by rows and by padded tokens). Each
//! reads its own topic with its own batcher, so one process can run both, or a
//! deployment one.

mod answers;
mod query;
mod served;

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use sluice_control::Settings;
use sluice_control::cache::{CacheKey, PredictionCache};
use sluice_kafka::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::envelope::{Envelope, Payload, StockPrediction};
use sluice_model::{Batch, ModelConfig, ModelError, ModelWorker};
use tokio::sync::watch;

use self::answers::Answers;
pub use self::query::QueryInferrer;
use self::served::ServedModel;
use crate::StageError;
use crate::common::{dead_letter, decode, forward};

/// Counts for reports and tests.
#[derive(Debug, Default)]
pub struct InferrerStats {
    /// Rows the model computed (cache hits and coalesced duplicates excluded).
    pub model_rows: AtomicU64,
    /// Events answered from the cache.
    pub cache_hits: AtomicU64,
    /// Cache entries that were not valid answers, ignored and recomputed.
    pub invalid_cache_entries: AtomicU64,
    /// Model versions swapped in.
    pub switches: AtomicU64,
    /// The version answering now (which may lag the requested one while it
    /// loads, or stay behind if it failed to load).
    pub serving_version: std::sync::Mutex<String>,
}

impl InferrerStats {
    pub fn serving_version(&self) -> String {
        self.serving_version.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    fn set_serving(&self, version: &str) {
        *self.serving_version.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = version.to_string();
    }
}

/// The stock inferrer stage.
#[derive(Debug)]
pub struct Inferrer {
    served: ServedModel,
    cache: Option<Arc<PredictionCache>>,
    output: Arc<str>,
    /// Reused across batches: the model input, `rows x sample_len`.
    input: Vec<f32>,
}

impl Inferrer {
    /// The dead-letter reasons this stage gives (docs/instrumentation.md).
    pub const DEAD_LETTER_REASONS: &[&str] = &[
        "unknown_envelope_version",
        "undecodable_envelope",
        "unexpected_payload",
        "invalid_window_shape",
        "model_error",
        "non_finite_prediction",
        "prediction_out_of_range",
    ];

    /// Takes a started (warmed-up) model worker whose outputs include
    /// `predicted_return` and `confidence`, the configuration it was started
    /// from, the live settings, and the prediction cache if there is one.
    pub fn new(
        worker: ModelWorker,
        model: ModelConfig,
        settings: watch::Receiver<Settings>,
        cache: Option<Arc<PredictionCache>>,
        output_topic: &str,
        stats: Arc<InferrerStats>,
    ) -> Result<Self, ModelError> {
        output_indices(&worker)?;
        Ok(Self {
            served: ServedModel::new(worker, model, settings, compatible, stats),
            cache,
            output: output_topic.into(),
            input: Vec::new(),
        })
    }
}

/// A new version must take the same input as the serving one: the upstream
/// stages shape and normalise windows for it.
fn compatible(_: &ModelConfig, serving: &ModelWorker, new: &ModelWorker) -> Result<(), ModelError> {
    output_indices(new)?;
    let (a, b) = (serving.metadata(), new.metadata());
    if a.kind != b.kind || a.input_shape != b.input_shape || a.normalization != b.normalization {
        return Err(ModelError::Metadata {
            path: format!("version {}/metadata.json", new.version()).into(),
            message: format!(
                "input shape {:?} or normalisation differs from the serving version {} ({:?}): a different input is a new model, not a version",
                b.input_shape,
                serving.version(),
                a.input_shape
            ),
        });
    }
    Ok(())
}

fn output_indices(worker: &ModelWorker) -> Result<(usize, usize), ModelError> {
    let metadata = worker.metadata();
    let index = |name: &str| {
        metadata.output_index(name).ok_or_else(|| ModelError::Metadata {
            path: format!("version {}/metadata.json", worker.version()).into(),
            message: format!("the model has no output named {name:?}"),
        })
    };
    Ok((index("predicted_return")?, index("confidence")?))
}

/// Decodes a batch: (input index, envelope) of the rows `check` accepts, and
/// a dead letter for each of the others.
fn accept(batch: &[Incoming], check: impl Fn(&Payload) -> Option<StageError>) -> (Vec<(usize, Envelope)>, Vec<Output>) {
    let mut rows = Vec::with_capacity(batch.len());
    let mut dead = Vec::new();
    for (i, incoming) in batch.iter().enumerate() {
        match decode(i, incoming) {
            Ok(envelope) => match check(&envelope.payload) {
                None => rows.push((i, envelope)),
                Some(e) => dead.push(dead_letter(i, &e, Some(envelope.event_id))),
            },
            Err(letter) => dead.push(letter),
        }
    }
    (rows, dead)
}

impl Stage for Inferrer {
    fn name(&self) -> &'static str {
        "inferrer"
    }

    fn dead_letter_reasons(&self) -> &'static [&'static str] {
        Self::DEAD_LETTER_REASONS
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let settings = self.served.follow_settings().await;
        let worker = &self.served.worker;
        let metadata = worker.metadata().clone();
        let version = worker.version().to_string();
        let (return_index, confidence_index) =
            output_indices(worker).map_err(|e| BatchFailure { retryable: false, message: e.to_string() })?;
        let sample_len = metadata.sample_len();

        let (rows, mut outputs) = accept(batch, |payload| match payload {
            Payload::Normalized(w) if w.values.len() == sample_len && w.rows as usize == metadata.days() => None,
            Payload::Normalized(w) => Some(StageError::WindowShape {
                rows: w.rows as usize,
                cols: w.cols as usize,
                want_rows: metadata.days(),
                want_cols: metadata.features(),
            }),
            other => Some(StageError::UnexpectedPayload { expected: "normalized", got: other.kind() }),
        });
        if rows.is_empty() {
            return Ok(outputs);
        }
        let window = |row: usize| match &rows[row].1.payload {
            Payload::Normalized(w) => &w.values[..],
            _ => &[],
        };

        let cache = self.cache.as_deref().filter(|_| settings.cache_enabled);
        let ttl = Duration::from_secs(settings.cache_ttl_s);
        let width = metadata.output_width();
        let key = |row: usize| CacheKey::of(&metadata.name, &version, window(row));
        let valid = |values: &[f32]| values.len() == width && metadata.invalid_value(values).is_none();
        let mut answers =
            Answers::look_up(cache, &metadata.name, &version, rows.len(), key, valid, ttl, &self.served.stats).await;

        // The model on what is left: one call, split only if it fails.
        let groups = &answers.to_compute;
        let input = &mut self.input;
        let computed = self
            .served
            .infer_rows(groups.len(), width, |range, recycled| {
                let mut buffer = recycled.map(Batch::into_windows).unwrap_or_else(|| std::mem::take(input));
                buffer.clear();
                for group in &groups[range] {
                    buffer.extend_from_slice(window(group.rows[0]));
                }
                Batch::Windows(buffer)
            })
            .await
            .map_err(|e| BatchFailure { retryable: false, message: StageError::from(e).to_string() })?;
        answers.fill(cache, &metadata.name, &version, computed, valid, ttl, &self.served.stats).await;

        let inferred_at_ms = sluice_messages::now_ms();
        for ((i, envelope), answer) in rows.into_iter().zip(answers.rows) {
            let answer = match answer {
                Some(Ok(answer)) => answer,
                Some(Err(e)) => {
                    outputs.push(dead_letter(i, &StageError::Model(e), Some(envelope.event_id)));
                    continue;
                }
                None => unreachable!("every row is answered or failed"),
            };
            let (predicted_return, confidence) = (answer.values[return_index], answer.values[confidence_index]);
            let bad = [("predicted_return", predicted_return), ("confidence", confidence)]
                .into_iter()
                .find(|(_, v)| !v.is_finite());
            if let Some((output, value)) = bad {
                let e = StageError::NonFinitePrediction { output, value };
                outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                continue;
            }
            if let Some((output, value, min, max)) = metadata.invalid_value(&answer.values) {
                let e = StageError::OutOfRange { output: output.to_string(), value, min, max };
                outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                continue;
            }
            let Payload::Normalized(window) = &envelope.payload else { unreachable!("only normalized rows are kept") };
            let prediction = StockPrediction {
                symbol: window.symbol.clone(),
                as_of: window.as_of,
                predicted_return,
                confidence,
                model_name: metadata.name.clone(),
                model_version: version.clone(),
                batch_size: answer.call_rows,
                cached: answer.cached,
                inferred_at_ms,
            };
            outputs.push(forward(i, &batch[i], &self.output, &envelope, Payload::Prediction(prediction)));
        }
        Ok(outputs)
    }
}
