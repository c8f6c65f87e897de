//! The serving version of a model, and the live settings that change it: the
//! version to serve (loaded and warmed up beside the serving one, swapped in
//! between two batches) and the backend's threads; and a rollout's candidate
//! version, loaded beside the serving one while the rollout runs, and swapped
//! in, already warm, when the rollout promotes it.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use sluice_control::Settings;
use sluice_control::rollout::{Phase, Rollout, RolloutLink};
use sluice_model::{ModelConfig, ModelError, ModelLoader, ModelMetadata, ModelRunner};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::InferrerStats;
use crate::telemetry;

/// Whether a loaded version may replace the serving one (see [`super::Task`]).
pub(crate) type Compatible = fn(&ModelConfig, (&ModelMetadata, &str), (&ModelMetadata, &str)) -> Result<(), ModelError>;

/// A version's loading task.
type Loading<L> = JoinHandle<Result<<L as ModelLoader>::Runner, ModelError>>;

/// A rollout's candidate here: loading, ready, or unable to run (the
/// rollout is told, and rolls back).
enum Candidate<L: ModelLoader> {
    Loading(Loading<L>),
    Ready(L::Runner),
    Failed,
}

/// The candidate of one rollout.
struct Trial<L: ModelLoader> {
    rollout: String,
    version: String,
    candidate: Candidate<L>,
}

/// A model's serving version, following the `model_version` and
/// `intra_op_threads` overrides, and its rollout's candidate.
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
    rollout: RolloutLink,
    trial: Option<Trial<L>>,
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
            rollout: RolloutLink::none(),
            trial: None,
        }
    }

    /// Follows `link`'s rollout; a running one's candidate starts loading
    /// now, while the stage warms up, rather than at the first batch.
    pub(crate) fn follow_rollout_of(&mut self, link: RolloutLink) {
        self.rollout = link;
        let settings = self.settings.borrow().clone();
        self.follow_rollout(&settings);
    }

    pub(crate) fn rollout(&self) -> &RolloutLink {
        &self.rollout
    }

    /// The running rollout and its candidate, when the candidate is ready here.
    pub(crate) fn trial(&self) -> Option<(Arc<Rollout>, &L::Runner)> {
        let rollout = self.rollout.running()?;
        match &self.trial {
            Some(Trial { rollout: id, candidate: Candidate::Ready(runner), .. }) if *id == rollout.id => {
                Some((rollout, runner))
            }
            _ => None,
        }
    }

    /// Loads the running rollout's candidate (once per rollout), admits it
    /// when loaded, and drops it when the rollout ends, unless it was
    /// promoted: then it waits, warm, for its `model_version` override.
    fn follow_rollout(&mut self, settings: &Settings) {
        let current = self.rollout.current();
        let serving = self.runner.version().to_string();
        let running = current.as_ref().filter(|r| r.is_running() && r.candidate != serving);
        if let Some(r) = running {
            if self.trial.as_ref().is_none_or(|t| t.rollout != r.id) {
                self.drop_trial();
                telemetry::version_loading(&r.candidate, &serving);
                let candidate = Candidate::Loading(self.load(&r.candidate, settings));
                self.trial = Some(Trial { rollout: r.id.clone(), version: r.candidate.clone(), candidate });
            }
            return;
        }
        let promoted = |t: &Trial<L>| {
            current
                .as_ref()
                .is_some_and(|r| r.id == t.rollout && matches!(r.phase, Phase::Promoted { .. }) && t.version != serving)
        };
        if self.trial.as_ref().is_some_and(|t| !promoted(t)) {
            self.drop_trial();
        }
    }

    /// Admits a loaded candidate, or tells the rollout it cannot run.
    async fn admit_candidate(&mut self) {
        let Some(trial) = self.trial.as_mut() else { return };
        let Candidate::Loading(task) = &trial.candidate else { return };
        if !task.is_finished() {
            return;
        }
        let Candidate::Loading(task) = std::mem::replace(&mut trial.candidate, Candidate::Failed) else { return };
        let (id, version) = (trial.rollout.clone(), trial.version.clone());
        let loaded = task.await.unwrap_or_else(|e| Err(ModelError::Torch(format!("loading task: {e}"))));
        match loaded.and_then(|runner| self.admit(runner)) {
            Ok(runner) => {
                telemetry::candidate_ready(&self.runner.metadata().name, &version);
                if let Some(trial) = self.trial.as_mut() {
                    trial.candidate = Candidate::Ready(runner);
                }
            }
            Err(e) => {
                telemetry::version_refused(&self.runner.metadata().name, &version, self.runner.version(), &e);
                self.rollout.fail(&id, &format!("candidate version {version} cannot serve: {e}"));
            }
        }
    }

    fn drop_trial(&mut self) {
        if let Some(Trial { candidate: Candidate::Ready(runner), .. }) = self.trial.take() {
            drop_off_runtime(runner);
        }
    }

    /// The promoted candidate, warm, if it is `version`.
    fn take_promoted(&mut self, version: &str) -> Option<L::Runner> {
        if !self.trial.as_ref().is_some_and(|t| t.version == version && matches!(t.candidate, Candidate::Ready(_))) {
            return None;
        }
        match self.trial.take()?.candidate {
            Candidate::Ready(runner) => Some(runner),
            _ => None,
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
        self.follow_rollout(&settings);
        self.admit_candidate().await;
        if settings.model_version != self.runner.version()
            && let Some(runner) = self.take_promoted(&settings.model_version)
        {
            self.swap_in(runner, &settings).await;
        }
        if settings.intra_op_threads != self.threads && self.runner.set_threads(settings.intra_op_threads).await.is_ok()
        {
            self.threads = settings.intra_op_threads;
        }
        if self.loading.as_ref().is_some_and(|(_, task)| task.is_finished())
            && let Some((version, task)) = self.loading.take()
        {
            let loaded = task.await.unwrap_or_else(|e| Err(ModelError::Torch(format!("loading task: {e}"))));
            match loaded.and_then(|runner| self.admit(runner)) {
                Ok(runner) if version == settings.model_version => self.swap_in(runner, &settings).await,
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
            self.loading = Some((want.clone(), self.load(want, &settings)));
        }
        settings
    }

    /// Starts loading `version` (warmed up at the batch size in force) on a task.
    fn load(&self, version: &str, settings: &Settings) -> Loading<L> {
        let config = ModelConfig {
            version: version.to_string(),
            intra_op_threads: settings.intra_op_threads,
            warmup_batch_size: self.model.warmup_batch_size.max(settings.max_batch_size),
            ..self.model.clone()
        };
        tokio::spawn(self.loader.load(config))
    }

    /// Makes a loaded, admitted version the serving one.
    async fn swap_in(&mut self, runner: L::Runner, settings: &Settings) {
        let name = self.runner.metadata().name.clone();
        telemetry::version_switched(&name, self.runner.version(), runner.version());
        self.stats.switches.fetch_add(1, Ordering::Relaxed);
        self.stats.set_serving(runner.version());
        drop_off_runtime(std::mem::replace(&mut self.runner, runner));
        // The thread count may have changed while it loaded.
        if self.runner.set_threads(settings.intra_op_threads).await.is_ok() {
            self.threads = settings.intra_op_threads;
        }
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
