//! The serving version of a model, and the live settings that change it: the
//! version to serve (loaded and warmed up beside the serving one, swapped in
//! between two batches) and the backend's threads.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_control::Settings;
use sluice_model::{ModelConfig, ModelError, ModelLoader, ModelMetadata, ModelRunner};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::InferrerStats;
use crate::telemetry;

/// Whether a loaded version may replace the serving one (see [`super::Task`]).
pub(crate) type Compatible = fn(&ModelConfig, (&ModelMetadata, &str), (&ModelMetadata, &str)) -> Result<(), ModelError>;

/// A version's loading task.
type Loading<L> = JoinHandle<Result<<L as ModelLoader>::Runner, ModelError>>;

/// A model's serving version, following the `model_version` and
/// `intra_op_threads` overrides.
pub(crate) struct ServedModel<L: ModelLoader> {
    loader: L,
    runner: L::Runner,
    /// How to load another version (`version` replaced).
    model: ModelConfig,
    settings: watch::Receiver<Settings>,
    /// A version being loaded, and its loading task.
    loading: Option<(String, Loading<L>)>,
    /// A version that failed to load or was refused; not retried until the
    /// override changes.
    failed: Option<String>,
    threads: usize,
    compatible: Compatible,
    stats: Arc<InferrerStats>,
}

impl<L: ModelLoader> ServedModel<L> {
    pub(crate) fn new(
        loader: L,
        runner: L::Runner,
        model: ModelConfig,
        settings: watch::Receiver<Settings>,
        compatible: Compatible,
        stats: Arc<InferrerStats>,
    ) -> Self {
        stats.set_serving(runner.version());
        Self {
            threads: model.threads(),
            loader,
            runner,
            model,
            settings,
            loading: None,
            failed: None,
            compatible,
            stats,
        }
    }

    pub(crate) fn runner(&self) -> &L::Runner {
        &self.runner
    }

    /// How the model is run (the configured version, not the serving one).
    pub(crate) fn config(&self) -> &ModelConfig {
        &self.model
    }

    pub(crate) fn stats(&self) -> &Arc<InferrerStats> {
        &self.stats
    }

    /// Applies thread and version changes, swaps in a loaded version, and
    /// returns the settings in force for the next batch.
    pub(crate) async fn follow_settings(&mut self) -> Settings {
        let settings = self.settings.borrow().clone();
        if settings.intra_op_threads != self.threads && self.runner.set_threads(settings.intra_op_threads).await.is_ok()
        {
            self.threads = settings.intra_op_threads;
        }
        if self.loading.as_ref().is_some_and(|(_, task)| task.is_finished())
            && let Some((version, task)) = self.loading.take()
        {
            let loaded = task.await.unwrap_or_else(|e| Err(ModelError::Torch(format!("loading task: {e}"))));
            match loaded.and_then(|runner| self.admit(runner)) {
                Ok(runner) if version == settings.model_version => {
                    let name = self.runner.metadata().name.clone();
                    telemetry::version_switched(&name, self.runner.version(), &version);
                    self.stats.switches.fetch_add(1, Ordering::Relaxed);
                    self.stats.set_serving(&version);
                    drop_off_runtime(std::mem::replace(&mut self.runner, runner));
                    // The thread count may have changed while it loaded.
                    if self.runner.set_threads(settings.intra_op_threads).await.is_ok() {
                        self.threads = settings.intra_op_threads;
                    }
                }
                // The override moved on meanwhile.
                Ok(unwanted) => drop_off_runtime(unwanted),
                Err(e) => {
                    telemetry::version_refused(&self.runner.metadata().name, &version, self.runner.version(), &e);
                    self.failed = Some(version);
                }
            }
        }
        let want = &settings.model_version;
        if want == self.runner.version() {
            self.failed = None;
        } else if self.failed.as_ref() != Some(want) && self.loading.as_ref().is_none_or(|(v, _)| v != want) {
            telemetry::version_loading(want, self.runner.version());
            let config = ModelConfig {
                version: want.clone(),
                intra_op_threads: settings.intra_op_threads,
                warmup_batch_size: self.model.warmup_batch_size.max(settings.max_batch_size),
                ..self.model.clone()
            };
            self.loading = Some((want.clone(), tokio::spawn(self.loader.load(config))));
        }
        settings
    }

    /// A loaded version, if it may serve: the same model (its metadata's
    /// name), reading the same input. Refused, it is dropped here.
    fn admit(&self, new: L::Runner) -> Result<L::Runner, ModelError> {
        let (serving, candidate) = (self.runner.metadata(), new.metadata());
        let checked = if serving.name == candidate.name {
            (self.compatible)(&self.model, (serving, self.runner.version()), (candidate, new.version()))
        } else {
            Err(ModelError::Metadata {
                path: self.model.version_dir(new.version()).join("metadata.json"),
                message: format!(
                    "it names the model {:?}, not {:?}: another model is not a version of this one",
                    candidate.name, serving.name
                ),
            })
        };
        match checked {
            Ok(()) => Ok(new),
            Err(e) => {
                drop_off_runtime(new);
                Err(e)
            }
        }
    }
}

/// Drops a runner on a blocking thread: it may join its model thread.
fn drop_off_runtime<R: ModelRunner>(runner: R) {
    drop(tokio::task::spawn_blocking(move || drop(runner)));
}
