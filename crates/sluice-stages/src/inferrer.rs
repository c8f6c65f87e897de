//! The inferrer: answers each batch the runtime cuts (size, or deadline from
//! the oldest message) from the prediction cache where it can, and runs the
//! model once on the rest, on the model thread, while the runtime accumulates
//! the next batch. Identical inputs in a batch share one model row. Non-finite
//! answers are dead letters. A `model_version` override loads the new version
//! beside the serving one, warms it up, and swaps it in between two batches.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use metrics::{counter, histogram};
use sluice_control::Settings;
use sluice_control::cache::{CacheKey, PredictionCache, Tier};
use sluice_kafka::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::envelope::{Envelope, Payload, StockPrediction};
use sluice_model::{ModelConfig, ModelError, ModelWorker};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::StageError;
use crate::common::{dead_letter, decode, forward};

/// Counts for reports and tests.
#[derive(Debug, Default)]
pub struct InferrerStats {
    /// Rows the model computed (cache hits and coalesced duplicates excluded).
    pub model_rows: AtomicU64,
    /// Events answered from the cache.
    pub cache_hits: AtomicU64,
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

/// The inferrer stage.
#[derive(Debug)]
pub struct Inferrer {
    worker: ModelWorker,
    /// How to load another version (`version` replaced).
    model: ModelConfig,
    settings: watch::Receiver<Settings>,
    cache: Option<Arc<PredictionCache>>,
    loading: Option<(String, JoinHandle<Result<ModelWorker, ModelError>>)>,
    /// A version that failed to load; not retried until the override changes.
    failed: Option<String>,
    threads: usize,
    output: Arc<str>,
    /// Reused across batches: the model input, `rows x sample_len`.
    input: Vec<f32>,
    stats: Arc<InferrerStats>,
}

/// Rows of a batch with the same input: computed once.
struct Group {
    key: Option<CacheKey>,
    rows: Vec<usize>,
}

impl Inferrer {
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
        stats.set_serving(worker.version());
        Ok(Self {
            threads: model.threads(),
            worker,
            model,
            settings,
            cache,
            loading: None,
            failed: None,
            output: output_topic.into(),
            input: Vec::new(),
            stats,
        })
    }

    /// Applies thread and version changes; swaps in a loaded version.
    async fn follow_settings(&mut self) {
        let settings = self.settings.borrow().clone();
        if settings.intra_op_threads != self.threads && self.worker.set_threads(settings.intra_op_threads).await.is_ok()
        {
            self.threads = settings.intra_op_threads;
        }
        if self.loading.as_ref().is_some_and(|(_, task)| task.is_finished())
            && let Some((version, task)) = self.loading.take()
        {
            let loaded = task.await.unwrap_or_else(|e| Err(ModelError::Torch(format!("loading task: {e}"))));
            match loaded.and_then(|w| compatible(&self.worker, &w).map(|()| w)) {
                Ok(worker) if version == settings.model_version => {
                    tracing::info!(from = self.worker.version(), to = version, "model version switched");
                    counter!("sluice_model_switches_total").increment(1);
                    self.stats.switches.fetch_add(1, Ordering::Relaxed);
                    self.stats.set_serving(&version);
                    let old = std::mem::replace(&mut self.worker, worker);
                    // Joining the old model thread blocks: not on the async runtime.
                    tokio::task::spawn_blocking(move || drop(old));
                    // The thread count may have changed while it loaded.
                    if self.worker.set_threads(settings.intra_op_threads).await.is_ok() {
                        self.threads = settings.intra_op_threads;
                    }
                }
                // The override moved on meanwhile.
                Ok(unwanted) => drop(tokio::task::spawn_blocking(move || drop(unwanted))),
                Err(e) => {
                    tracing::error!(version, error = %e, serving = self.worker.version(), "model version failed to load; the serving version stays");
                    counter!("sluice_model_load_failures_total").increment(1);
                    self.failed = Some(version);
                }
            }
        }
        let want = &settings.model_version;
        if want == self.worker.version() {
            self.failed = None;
        } else if self.failed.as_ref() != Some(want) && self.loading.as_ref().is_none_or(|(v, _)| v != want) {
            tracing::info!(
                version = want,
                serving = self.worker.version(),
                "loading a model version; the serving one answers meanwhile"
            );
            let config = ModelConfig {
                version: want.clone(),
                intra_op_threads: settings.intra_op_threads,
                warmup_batch_size: self.model.warmup_batch_size.max(settings.max_batch_size),
                ..self.model.clone()
            };
            self.loading = Some((want.clone(), tokio::spawn(ModelWorker::start(config))));
        }
    }
}

/// A new version must take the same input as the serving one: the upstream
/// stages shape and normalise windows for it.
fn compatible(serving: &ModelWorker, new: &ModelWorker) -> Result<(), ModelError> {
    output_indices(new)?;
    let (a, b) = (serving.metadata(), new.metadata());
    if a.input_shape != b.input_shape || a.normalization != b.normalization {
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

impl Stage for Inferrer {
    fn name(&self) -> &'static str {
        "inferrer"
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        self.follow_settings().await;
        let settings = self.settings.borrow().clone();
        let metadata = self.worker.metadata().clone();
        let version = self.worker.version().to_string();
        let (return_index, confidence_index) =
            output_indices(&self.worker).map_err(|e| BatchFailure { retryable: false, message: e.to_string() })?;
        let sample_len = metadata.sample_len();
        let mut outputs = Vec::with_capacity(batch.len());

        // (input index, envelope) of each well-formed row.
        let mut rows: Vec<(usize, Envelope)> = Vec::with_capacity(batch.len());
        for (i, incoming) in batch.iter().enumerate() {
            let envelope = match decode(i, incoming) {
                Ok(envelope) => envelope,
                Err(dead) => {
                    outputs.push(dead);
                    continue;
                }
            };
            let problem = match &envelope.payload {
                Payload::Normalized(w) if w.values.len() == sample_len && w.rows as usize == metadata.days() => None,
                Payload::Normalized(w) => Some(StageError::WindowShape {
                    rows: w.rows as usize,
                    cols: w.cols as usize,
                    want_rows: metadata.days(),
                    want_cols: metadata.features(),
                }),
                other => Some(StageError::UnexpectedPayload { expected: "normalized", got: other.kind() }),
            };
            match problem {
                None => rows.push((i, envelope)),
                Some(e) => outputs.push(dead_letter(i, &e, Some(envelope.event_id))),
            }
        }
        if rows.is_empty() {
            return Ok(outputs);
        }
        let window = |row: usize| match &rows[row].1.payload {
            Payload::Normalized(w) => &w.values[..],
            _ => &[],
        };

        // Group identical inputs (with the cache on) and answer from the cache.
        let cache = self.cache.clone().filter(|_| settings.cache_enabled);
        let ttl = Duration::from_secs(settings.cache_ttl_s);
        let mut groups: Vec<Group> = Vec::with_capacity(rows.len());
        if cache.is_some() {
            let mut by_key: HashMap<CacheKey, usize> = HashMap::with_capacity(rows.len());
            for row in 0..rows.len() {
                let key = CacheKey::of(&metadata.name, &version, window(row));
                let g = *by_key.entry(key).or_insert_with(|| {
                    groups.push(Group { key: Some(key), rows: Vec::new() });
                    groups.len() - 1
                });
                groups[g].rows.push(row);
            }
        } else {
            groups.extend((0..rows.len()).map(|row| Group { key: None, rows: vec![row] }));
        }
        let mut answers: Vec<Option<(Vec<f32>, bool)>> = vec![None; rows.len()];
        let mut hits_by_tier = [0u64; 2];
        let mut to_compute: Vec<Group> = Vec::with_capacity(groups.len());
        if let Some(cache) = &cache {
            let keys: Vec<CacheKey> = groups.iter().filter_map(|g| g.key).collect();
            let found = cache.get_many(&metadata.name, &version, &keys, ttl).await;
            for (group, found) in groups.into_iter().zip(found) {
                match found {
                    // A value of another width (corrupt, or another model's) is a miss.
                    Some((values, tier)) if values.len() == metadata.outputs.len() => {
                        hits_by_tier[usize::from(tier == Tier::Redis)] += group.rows.len() as u64;
                        for row in group.rows {
                            answers[row] = Some((values.clone(), true));
                        }
                    }
                    _ => to_compute.push(group),
                }
            }
        } else {
            to_compute = groups;
        }

        // One model run for what is left.
        let width = metadata.outputs.len();
        let mut computed = 0;
        if !to_compute.is_empty() {
            let mut input = std::mem::take(&mut self.input);
            input.clear();
            for group in &to_compute {
                input.extend_from_slice(window(group.rows[0]));
            }
            computed = to_compute.len();
            let mut inference = self
                .worker
                .infer(input, computed)
                .await
                .map_err(|e| BatchFailure { retryable: false, message: StageError::from(e).to_string() })?;
            self.input = std::mem::take(&mut inference.input);
            histogram!("sluice_model_batch_rows").record(computed as f64);
            histogram!("sluice_model_inference_seconds").record(inference.elapsed.as_secs_f64());
            counter!("sluice_model_rows_total").increment(computed as u64);
            self.stats.model_rows.fetch_add(computed as u64, Ordering::Relaxed);
            let mut fresh = Vec::new();
            for (g, group) in to_compute.iter().enumerate() {
                let values = inference.outputs[g * width..(g + 1) * width].to_vec();
                if let Some(key) = group.key
                    && values.iter().all(|v| v.is_finite())
                {
                    fresh.push((key, values.clone()));
                }
                for row in &group.rows {
                    answers[*row] = Some((values.clone(), false));
                }
            }
            if let Some(cache) = &cache {
                cache.put_many(&metadata.name, &version, fresh, ttl).await;
            }
        }
        if let Some(cache) = &cache {
            let misses = to_compute.iter().map(|g| g.rows.len() as u64).sum();
            let stats = [
                ("hits_lru", hits_by_tier[0]),
                ("hits_redis", hits_by_tier[1]),
                ("misses", misses),
                ("model_rows", computed as u64),
            ];
            cache.record_shared_stats(&stats).await;
        }
        let hits: u64 = hits_by_tier.iter().sum();
        self.stats.cache_hits.fetch_add(hits, Ordering::Relaxed);

        let inferred_at_ms = sluice_messages::now_ms();
        for ((i, envelope), answer) in rows.into_iter().zip(answers) {
            let Some((values, cached)) = answer else { unreachable!("every row is answered or computed") };
            let (predicted_return, confidence) = (values[return_index], values[confidence_index]);
            let bad = [("predicted_return", predicted_return), ("confidence", confidence)]
                .into_iter()
                .find(|(_, v)| !v.is_finite());
            if let Some((output, value)) = bad {
                let e = StageError::NonFinitePrediction { output, value };
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
                batch_size: if cached { 0 } else { computed as u32 },
                cached,
                inferred_at_ms,
            };
            outputs.push(forward(i, &batch[i], &self.output, &envelope, Payload::Prediction(prediction)));
        }
        Ok(outputs)
    }
}
