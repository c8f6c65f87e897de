//! One served model: its worker, and the live settings that change it (the
//! version to serve, libtorch's threads). Shared by the stock and the query
//! inferrer.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use metrics::{counter, gauge, histogram};
use sluice_control::Settings;
use sluice_model::{Batch, ModelConfig, ModelError, ModelWorker};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::InferrerStats;

/// Whether a newly loaded version may replace the serving one: the stages
/// upstream prepare inputs for the serving one.
pub(crate) type Compatible = fn(&ModelConfig, &ModelWorker, &ModelWorker) -> Result<(), ModelError>;

/// A model worker that follows the `model_version` and `intra_op_threads`
/// overrides: a new version loads and warms up beside the serving one and is
/// swapped in between two batches.
#[derive(Debug)]
pub(crate) struct ServedModel {
    pub(crate) worker: ModelWorker,
    /// How to load another version (`version` replaced).
    model: ModelConfig,
    pub(crate) settings: watch::Receiver<Settings>,
    loading: Option<(String, JoinHandle<Result<ModelWorker, ModelError>>)>,
    /// A version that failed to load; not retried until the override changes.
    failed: Option<String>,
    threads: usize,
    /// Rows per model call at most, once a call ran out of memory.
    row_cap: Option<usize>,
    compatible: Compatible,
    pub(crate) stats: Arc<InferrerStats>,
}

impl ServedModel {
    pub(crate) fn new(
        worker: ModelWorker,
        model: ModelConfig,
        settings: watch::Receiver<Settings>,
        compatible: Compatible,
        stats: Arc<InferrerStats>,
    ) -> Self {
        stats.set_serving(worker.version());
        // At 0 from the start, so that alerts on increase() see the first one.
        let name = worker.metadata().name.clone();
        counter!("sluice_model_load_failures_total").increment(0);
        counter!("sluice_model_out_of_memory_total", "model" => name.clone()).increment(0);
        counter!("sluice_model_bisections_total", "model" => name).increment(0);
        Self {
            threads: model.threads(),
            worker,
            model,
            settings,
            loading: None,
            failed: None,
            row_cap: None,
            compatible,
            stats,
        }
    }

    /// Applies thread and version changes, swaps in a loaded version, and
    /// returns the settings in force for the next batch.
    pub(crate) async fn follow_settings(&mut self) -> Settings {
        let settings = self.settings.borrow().clone();
        if settings.intra_op_threads != self.threads && self.worker.set_threads(settings.intra_op_threads).await.is_ok()
        {
            self.threads = settings.intra_op_threads;
        }
        if self.loading.as_ref().is_some_and(|(_, task)| task.is_finished())
            && let Some((version, task)) = self.loading.take()
        {
            let loaded = task.await.unwrap_or_else(|e| Err(ModelError::Torch(format!("loading task: {e}"))));
            let same_model = |w: &ModelWorker| {
                let (serving, new) = (&self.worker.metadata().name, &w.metadata().name);
                if serving == new {
                    return Ok(());
                }
                Err(ModelError::Metadata {
                    path: self.model.version_dir(w.version()).join("metadata.json"),
                    message: format!(
                        "it names the model {new:?}, not {serving:?}: another model is not a version of this one"
                    ),
                })
            };
            let checked = loaded.and_then(|w| {
                match same_model(&w).and_then(|()| (self.compatible)(&self.model, &self.worker, &w)) {
                    Ok(()) => Ok(w),
                    Err(e) => {
                        // Joining its model thread blocks: not on the async runtime.
                        drop(tokio::task::spawn_blocking(move || drop(w)));
                        Err(e)
                    }
                }
            });
            match checked {
                Ok(worker) if version == settings.model_version => {
                    tracing::info!(
                        model = self.worker.metadata().name,
                        from = self.worker.version(),
                        to = version,
                        "model version switched"
                    );
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
        settings
    }
}

/// One row's answer from [`ServedModel::infer_rows`].
#[derive(Debug, Clone)]
pub(crate) struct RowAnswer {
    pub(crate) values: Vec<f32>,
    /// Rows in the model call that computed it.
    pub(crate) call_rows: u32,
    /// Tokens per row in that call (token batches; 0 for windows).
    pub(crate) padded_length: u32,
}

/// Whether libtorch failed for lack of memory (CUDA or the CPU allocator).
fn out_of_memory(e: &ModelError) -> bool {
    let ModelError::Torch(message) = e else { return false };
    let message = message.to_ascii_lowercase();
    ["out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory"]
        .iter()
        .any(|m| message.contains(m))
}

impl ServedModel {
    /// Runs `rows` rows through the model, in calls of at most the row cap,
    /// each built by `build` from the rows it holds (and the last call's
    /// buffers, to reuse). A call that fails is split in halves and retried,
    /// down to single rows, so that only rows that fail alone get an error and
    /// the rest are answered. A call that runs out of memory (libtorch says
    /// so, or its input is over `memory_budget_bytes`) also lowers the row cap
    /// for every later call, which is logged and published as
    /// `sluice_model_row_cap`. Only a dead model thread fails the whole call.
    pub(crate) async fn infer_rows(
        &mut self,
        rows: usize,
        width: usize,
        mut build: impl FnMut(std::ops::Range<usize>, Option<Batch>) -> Batch,
    ) -> Result<Vec<Result<RowAnswer, ModelError>>, ModelError> {
        let mut answers: Vec<Option<Result<RowAnswer, ModelError>>> = vec![None; rows];
        // Ranges still to run, as a stack: a split pushes its second half first.
        let mut pending = Vec::with_capacity(8);
        pending.push(0..rows);
        let mut recycled = None;
        let budget = self.model.memory_budget_bytes;
        let name = self.worker.metadata().name.clone();
        while let Some(range) = pending.pop() {
            let n = range.len();
            if n == 0 {
                continue;
            }
            if let Some(cap) = self.row_cap
                && n > cap
            {
                // Later chunks first: the stack pops them in order.
                let starts: Vec<usize> = range.clone().step_by(cap).collect();
                pending.extend(starts.into_iter().rev().map(|s| s..(s + cap).min(range.end)));
                continue;
            }
            let batch = build(range.clone(), recycled.take());
            let padded_length = match &batch {
                Batch::Tokens { len, .. } => *len as u32,
                Batch::Windows(_) => 0,
            };
            let result = if budget > 0 && n > 1 && batch.bytes() as u64 > budget {
                Err(ModelError::Torch(format!(
                    "not enough memory: the input of {} bytes is over the memory budget of {budget} bytes",
                    batch.bytes()
                )))
            } else {
                self.worker.infer(batch, n).await
            };
            match result {
                Ok(inference) => {
                    histogram!("sluice_model_batch_rows").record(n as f64);
                    if padded_length > 0 {
                        histogram!("sluice_model_batch_tokens").record((n * padded_length as usize) as f64);
                    }
                    histogram!("sluice_model_inference_seconds").record(inference.elapsed.as_secs_f64());
                    counter!("sluice_model_rows_total").increment(n as u64);
                    for (row, values) in range.zip(inference.outputs.chunks_exact(width)) {
                        answers[row] =
                            Some(Ok(RowAnswer { values: values.to_vec(), call_rows: n as u32, padded_length }));
                    }
                    recycled = Some(inference.input);
                }
                Err(ModelError::WorkerGone) => return Err(ModelError::WorkerGone),
                Err(e) if n == 1 => {
                    tracing::warn!(model = name, error = %e, "a row fails alone: dead-lettered as model_error");
                    answers[range.start] = Some(Err(e));
                }
                Err(e) => {
                    if out_of_memory(&e) {
                        let cap = (n / 2).max(1);
                        if self.row_cap.is_none_or(|c| cap < c) {
                            self.row_cap = Some(cap);
                            tracing::warn!(model = name, rows = n, cap, error = %e, "a model call ran out of memory: split, and calls are capped at {cap} rows from now on");
                            gauge!("sluice_model_row_cap", "model" => name.clone()).set(cap as f64);
                        }
                        counter!("sluice_model_out_of_memory_total", "model" => name.clone()).increment(1);
                    } else {
                        tracing::warn!(model = name, rows = n, error = %e, "a model call failed: bisecting it");
                        counter!("sluice_model_bisections_total", "model" => name.clone()).increment(1);
                    }
                    let mid = range.start + n / 2;
                    pending.push(mid..range.end);
                    pending.push(range.start..mid);
                }
            }
        }
        Ok(answers.into_iter().map(|a| a.expect("every row is answered or failed")).collect())
    }
}
