//! Builds each stage from the configuration and runs it on the Kafka runtime.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context as _;
use clap::ValueEnum;
use sluice_control::Settings;
use sluice_control::cache::PredictionCache;
use sluice_control::controller::{Controller, VersionCheck};
use sluice_control::keys::KeyLayout;
use sluice_control::link::RedisLink;
use sluice_control::rollout::{RolloutLink, RolloutStore, follow};
use sluice_control::store::OverrideStore;
use sluice_control::store::Scope;
use sluice_kafka::{KafkaConfig, Lanes, RunOptions, StageStatus};
use sluice_model::{ModelKind, ModelMetadata};
use sluice_stages::{InferrerStats, WriterStats};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::build::Context;
use crate::config::SluiceConfig;
use crate::{gpu, observe};

/// Lets cuBLAS use TF32 (`tf32 = true`): call first thing in `main`, before
/// any other thread exists.
pub use sluice_torch::allow_tf32;

/// The four stages. The inferrer runs one consumer per kind it serves
/// (`inferrer.serve`): `Inferrer` for stock windows and `QueryInferrer` for
/// query tokens, each with its own consumer group and batcher.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StageKind {
    Fetcher,
    Normalizer,
    Inferrer,
    Writer,
    /// Started by `inferrer` when it serves queries; not a command-line name.
    #[value(skip)]
    QueryInferrer,
    /// Started by `writer`: a rollout's shadow answers, as JSON to
    /// `topics.predictions_shadow` (and to the shadow tables when the writer
    /// saves to PostgreSQL); not a command-line name.
    #[value(skip)]
    ShadowWriter,
}

impl StageKind {
    pub const ALL: [Self; 4] = [Self::Fetcher, Self::Normalizer, Self::Inferrer, Self::Writer];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fetcher => "fetcher",
            Self::Normalizer => "normalizer",
            Self::Inferrer => "inferrer",
            Self::Writer => "writer",
            Self::QueryInferrer => "query-inferrer",
            Self::ShadowWriter => "shadow-writer",
        }
    }

    /// Its consumer group: `{kafka.group_prefix}-{name}`, one per stage (and
    /// per model kind), so that each scales on its own.
    pub fn group_id(self, kafka: &KafkaConfig) -> String {
        format!("{}-{}", kafka.group_prefix, self.name())
    }

    /// The topic it reads.
    pub fn input_topic(self, config: &SluiceConfig) -> &str {
        let topics = &config.topics;
        match self {
            Self::Fetcher => &topics.requests,
            Self::Normalizer => &topics.fetched,
            Self::Inferrer => &topics.normalized,
            Self::QueryInferrer => &topics.tokenized,
            Self::Writer => &topics.inferred,
            Self::ShadowWriter => &topics.inferred_shadow,
        }
    }

    /// The stage runtimes `kinds` stand for: `inferrer` becomes one per
    /// served kind, and `writer` also writes shadow answers.
    pub fn expand(kinds: &[Self], config: &SluiceConfig) -> Vec<Self> {
        let serves = |kind| config.inferrer.serve.contains(&kind);
        kinds
            .iter()
            .flat_map(|kind| match kind {
                Self::Inferrer => [
                    serves(ModelKind::Stock).then_some(Self::Inferrer),
                    serves(ModelKind::Query).then_some(Self::QueryInferrer),
                ],
                Self::Writer => [Some(Self::Writer), Some(Self::ShadowWriter)],
                other => [Some(*other), None],
            })
            .flatten()
            .collect()
    }
}

/// The control plane of one process: live settings and the prediction cache,
/// shared by its stages.
#[derive(Debug, Clone)]
pub struct Control {
    /// The stock model's settings.
    pub settings: watch::Receiver<Settings>,
    /// The writer's (`min_confidence`: the shared scope and the writer's).
    pub writer_settings: watch::Receiver<Settings>,
    /// The query model's, in a process that serves queries.
    pub query_settings: Option<watch::Receiver<Settings>>,
    pub cache: Arc<PredictionCache>,
    /// The stock model's rollout and the query model's, followed in a
    /// process that runs the models.
    pub rollout: RolloutLink,
    pub query_rollout: RolloutLink,
}

/// The override store the configuration names (Redis, or in process).
pub fn override_store(config: &SluiceConfig) -> anyhow::Result<(OverrideStore, Option<Arc<RedisLink>>)> {
    let c = &config.control;
    let keys = KeyLayout::new(&c.prefix, &c.pipeline);
    if c.redis_url.is_empty() {
        return Ok((OverrideStore::memory(keys), None));
    }
    let link = Arc::new(RedisLink::new(c.redis_url.expose())?);
    Ok((OverrideStore::Redis { link: link.clone(), keys }, Some(link)))
}

/// The name overrides and cache keys use for a model: its metadata's name.
pub fn model_name(model: &sluice_model::ModelConfig) -> String {
    ModelMetadata::load(&model.version_dir(&model.version))
        .map(|m| m.name)
        .unwrap_or_else(|_| model.dir.file_name().map_or_else(|| "model".into(), |n| n.to_string_lossy().into_owned()))
}

/// The batch size a model starts with: the configured one, the device's
/// default (`max_batch_size = 0`), or, with `autotune_p99_ms` in a process
/// that runs the model (`tune`), the largest that meets the latency target,
/// measured now.
pub async fn batch_size_choice(
    model: &sluice_model::ModelConfig,
    configured: usize,
    kind: ModelKind,
    tune: bool,
) -> anyhow::Result<sluice_model::BatchSizeChoice> {
    let autotune_p99_ms = if tune { model.autotune_p99_ms } else { 0 };
    let model = sluice_model::ModelConfig { autotune_p99_ms, ..model.clone() };
    tokio::task::spawn_blocking(move || sluice_torch::choose_batch_size(&model, configured, kind))
        .await?
        .context("choosing the batch size")
}

/// [`batch_size_choice`], logged and exported (`sluice_model_batch_size_chosen`).
async fn starting_batch_size(
    model: &sluice_model::ModelConfig,
    configured: usize,
    kind: ModelKind,
    tune: bool,
) -> anyhow::Result<usize> {
    let choice = batch_size_choice(model, configured, kind, tune).await?;
    crate::telemetry::batch_size_chosen(&model_name(model), &choice);
    Ok(choice.batch_size)
}

/// Starts following overrides (reading them once first): the stock model's
/// scope, and the query model's too when `query` is set. `tune`: this process
/// runs the models (their batch sizes may be tuned on the device first).
pub async fn start_control(
    config: &SluiceConfig,
    query: bool,
    tune: bool,
    shutdown: CancellationToken,
) -> anyhow::Result<Control> {
    let (store, link) = override_store(config)?;
    let cache = Arc::new(PredictionCache::new(config.cache.lru.clone(), link.map(|l| (l, store.keys().clone()))));
    let follow = |model: &sluice_model::ModelConfig, base: Settings| {
        let model = model.clone();
        let name = model_name(&model);
        let versions: VersionCheck = Arc::new(move |v| model.has_version(v));
        let clear = cache.clone();
        Controller::new(
            store.clone(),
            name.as_str(),
            base,
            versions,
            Duration::from_millis(config.control.reconcile_ms),
        )
        .on_cache_clear(Arc::new(move || clear.clear_local()))
    };
    let stock = &config.inferrer.model;
    let max_batch_size =
        starting_batch_size(stock, config.inferrer.batch.max_batch_size, ModelKind::Stock, tune).await?;
    let base = Settings { max_batch_size, ..config.base_settings() };
    let settings = follow(stock, base.clone()).start(shutdown.clone()).await;
    // The writer follows its own scope; the stock model's controller reports
    // refusals in the shared hash.
    let reconcile = Duration::from_millis(config.control.reconcile_ms);
    let writer_settings = Controller::new(store.clone(), Scope::Writer, base, Arc::new(|_: &str| false), reconcile)
        .leave_all_scope_reports()
        .start(shutdown.clone())
        .await;
    let query_settings = if query {
        let model = &config.inferrer.query.model;
        let max_batch_size =
            starting_batch_size(model, config.inferrer.query.batch.max_batch_size, ModelKind::Query, tune).await?;
        let base = Settings { max_batch_size, ..config.query_base_settings() };
        // The stock model's controller reports refusals in the shared hash.
        Some(follow(model, base).leave_all_scope_reports().start(shutdown.clone()).await)
    } else {
        None
    };
    let rollouts = RolloutStore::beside(&store);
    // Without Redis, the configuration may start a rollout: this process's alone.
    for (key, rollout, model) in config.rollouts().into_iter().filter(|_| tune && !rollouts.is_shared()) {
        if let Some(r) = rollout.rollout(key, &model_name(model), model)? {
            rollouts.replace(None, &r).await?;
        }
    }
    let rollout_of = async |model: &sluice_model::ModelConfig, runs: bool| {
        if runs {
            follow::follow(rollouts.clone(), &model_name(model), shutdown.clone()).await
        } else {
            RolloutLink::none()
        }
    };
    let rollout = rollout_of(stock, tune).await;
    let query_rollout = rollout_of(&config.inferrer.query.model, tune && query).await;
    Ok(Control { settings, writer_settings, query_settings, cache, rollout, query_rollout })
}

/// Counters the demo and the status page report.
#[derive(Debug, Default)]
pub struct Stats {
    pub writer: Arc<WriterStats>,
    pub shadow_writer: Arc<WriterStats>,
    pub inferrer: Arc<InferrerStats>,
    pub query_inferrer: Arc<InferrerStats>,
}

/// A stage running in this process.
#[derive(Debug)]
pub struct Launched {
    pub kind: StageKind,
    pub status: Arc<StageStatus>,
    pub task: JoinHandle<anyhow::Result<()>>,
}

/// Starts `kind` on its own task. A stage that fails cancels `shutdown`, so
/// that the other stages of the process stop (and drain) too.
pub fn spawn_stage(
    kind: StageKind,
    config: Arc<SluiceConfig>,
    kafka: KafkaConfig,
    shutdown: CancellationToken,
    control: Control,
    stats: Arc<Stats>,
) -> Launched {
    let status = Arc::new(StageStatus::default());
    let task_status = status.clone();
    let task = tokio::spawn(async move {
        // However this task ends (error, panic, or a normal drain), the other
        // stages of the process must not keep running half a pipeline.
        let _stop_the_others = shutdown.clone().drop_guard();
        run(kind, &config, &kafka, task_status, shutdown.clone(), control, stats)
            .await
            .with_context(|| format!("stage {}", kind.name()))
    });
    Launched { kind, status, task }
}

/// Builds `kind` from its section of the configuration and runs it on the
/// Kafka runtime, under its consumer group and input topic.
async fn run(
    kind: StageKind,
    config: &SluiceConfig,
    kafka: &KafkaConfig,
    status: Arc<StageStatus>,
    shutdown: CancellationToken,
    control: Control,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let cx = Context { config, control: &control, stats: &stats };
    let built = config.build(kind, &cx).await?;
    status.set_warmed_up();
    let options = RunOptions {
        input_topic: kind.input_topic(config).to_string(),
        dead_letter_topic: config.topics.dead_letters.clone(),
        group_id: kind.group_id(kafka),
        client_id: format!("sluice-{}-{}", kind.name(), std::process::id()),
        policy: built.policy.clone(),
        drain_timeout: Duration::from_millis(config.runtime.drain_timeout_ms),
        queue_capacity: config.runtime.queue_capacity,
        queue_max_bytes: config.runtime.queue_max_bytes,
        prepare_next_batch: config.runtime.prepare_next_batch,
        throughput_window: Duration::from_millis(config.runtime.throughput_window_ms),
        stall_after: Duration::from_millis(config.runtime.stall_after_ms),
        latency_target: built.latency_target.clone(),
        lanes: config.lanes.enabled.then(|| Lanes {
            suffix: config.lanes.bulk_suffix.clone(),
            twinned: config.topics.laned().map(String::clone).to_vec(),
            bulk_share: built.bulk_share.clone().unwrap_or_else(|| watch::channel(config.lanes.bulk_share).1),
        }),
    };
    built.run(kafka.clone(), options, status, shutdown).await?;
    Ok(())
}

/// Cancels `shutdown` on SIGTERM or SIGINT (Ctrl-C).
pub fn cancel_on_signals(shutdown: CancellationToken) {
    tokio::spawn(async move {
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(term) => term,
            Err(e) => {
                tracing::error!(error = %e, "cannot listen for SIGTERM");
                return;
            }
        };
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: draining"),
            _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT: draining"),
            () = shutdown.cancelled() => return,
        }
        shutdown.cancel();
    });
}

/// Waits for every stage; returns the first failure.
pub async fn join(stages: Vec<Launched>) -> anyhow::Result<()> {
    let mut first_error = None;
    for stage in stages {
        let result = stage.task.await.map_err(anyhow::Error::from).and_then(|r| r);
        if let Err(e) = result {
            tracing::error!(stage = stage.kind.name(), error = format!("{e:#}"), "stage failed");
            first_error.get_or_insert(e);
        }
    }
    first_error.map_or(Ok(()), Err)
}

/// Runs `kinds` (the stages named on the command line; `inferrer` stands for
/// one stage per served model kind) in this process until SIGTERM or a
/// failure, with the metrics and health server.
pub async fn run_stages(kinds: &[StageKind], config: SluiceConfig) -> anyhow::Result<()> {
    let metrics = observe::init_metrics()?;
    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let kafka = config.kafka.clone();
    let info = config.shown();
    let listen = config.observe.listen;
    let config = Arc::new(config);
    let stats = Arc::new(Stats::default());
    let kinds = StageKind::expand(kinds, &config);
    let runs_models = kinds.iter().any(|k| matches!(k, StageKind::Inferrer | StageKind::QueryInferrer));
    let needs_postgres = kinds.iter().any(|k| match k {
        StageKind::Fetcher => config.fetcher.source == crate::config::SourceKind::Postgres,
        StageKind::Writer | StageKind::ShadowWriter => config.writer.postgres,
        _ => false,
    });
    let control =
        start_control(&config, kinds.contains(&StageKind::QueryInferrer), runs_models, shutdown.clone()).await?;
    let stages: Vec<_> = kinds
        .iter()
        .map(|k| spawn_stage(*k, config.clone(), kafka.clone(), shutdown.clone(), control.clone(), stats.clone()))
        .collect();
    let mut settings = vec![
        (model_name(&config.inferrer.model), control.settings.clone()),
        ("writer".to_string(), control.writer_settings.clone()),
    ];
    let (mut models, mut rollouts) = (Vec::new(), Vec::new());
    if kinds.contains(&StageKind::Inferrer) {
        models.push((model_name(&config.inferrer.model), stats.inferrer.clone()));
        rollouts.push((model_name(&config.inferrer.model), control.rollout.clone()));
    }
    if let Some(query) = &control.query_settings {
        settings.push((model_name(&config.inferrer.query.model), query.clone()));
        models.push((model_name(&config.inferrer.query.model), stats.query_inferrer.clone()));
        rollouts.push((model_name(&config.inferrer.query.model), control.query_rollout.clone()));
    }
    let health = observe::Health {
        metrics,
        stages: stages.iter().map(|s| (s.kind.name(), s.status.clone())).collect(),
        info,
        settings,
        cache: (!models.is_empty()).then(|| control.cache.clone()),
        models,
        rollouts,
        gpu: runs_models.then(|| gpu::GpuMonitor::start(Duration::from_secs(5), shutdown.clone())).flatten(),
        postgres: needs_postgres.then(|| config.postgres.pool()).transpose()?,
    };
    if let Err(e) = observe::serve(listen, health, shutdown.clone()).await {
        shutdown.cancel();
        let _ = join(stages).await;
        return Err(e);
    }
    join(stages).await.context("sluice stopped on an error")
}
