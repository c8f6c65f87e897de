//! Builds each stage from the configuration and runs it on the Kafka runtime.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use sluice_control::Settings;
use sluice_control::cache::PredictionCache;
use sluice_control::controller::{Controller, VersionCheck};
use sluice_control::keys::KeyLayout;
use sluice_control::link::RedisLink;
use sluice_control::store::OverrideStore;
use sluice_kafka::{BatchPolicy, KafkaConfig, RunOptions, StageStatus, run_stage};
use sluice_model::{ModelMetadata, ModelWorker, QueryTokenizer};
use sluice_postgres::history::PgHistory;
use sluice_postgres::sink::PgPredictions;
use sluice_stages::fetcher::{HistorySource, SyntheticSource, WindowShape};
use sluice_stages::{Fetcher, Inferrer, InferrerStats, Normalizer, QueryInferrer, Writer, WriterStats};
use tokio::sync::watch;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{ServedKind, SluiceConfig, SourceKind};

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
        }
    }

    /// The stage runtimes `kinds` stand for: `inferrer` becomes one per served kind.
    pub fn expand(kinds: &[Self], config: &SluiceConfig) -> Vec<Self> {
        let serves = |kind| config.inferrer.serve.contains(&kind);
        kinds
            .iter()
            .flat_map(|kind| match kind {
                Self::Inferrer => [
                    serves(ServedKind::Stock).then_some(Self::Inferrer),
                    serves(ServedKind::Query).then_some(Self::QueryInferrer),
                ],
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
    /// The stock model's settings (and the writer's `min_confidence`).
    pub settings: watch::Receiver<Settings>,
    /// The query model's, in a process that serves queries.
    pub query_settings: Option<watch::Receiver<Settings>>,
    pub cache: Arc<PredictionCache>,
}

/// The override store the configuration names (Redis, or in process).
pub fn override_store(config: &SluiceConfig) -> anyhow::Result<(OverrideStore, Option<Arc<RedisLink>>)> {
    let c = &config.control;
    let keys = KeyLayout::new(&c.prefix, &c.pipeline);
    if c.redis_url.is_empty() {
        return Ok((OverrideStore::memory(keys), None));
    }
    let link = Arc::new(RedisLink::new(&c.redis_url)?);
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
    query_model: bool,
    tune: bool,
) -> anyhow::Result<sluice_model::BatchSizeChoice> {
    let autotune_p99_ms = if tune { model.autotune_p99_ms } else { 0 };
    let model = sluice_model::ModelConfig { autotune_p99_ms, ..model.clone() };
    tokio::task::spawn_blocking(move || sluice_model::choose_batch_size(&model, configured, query_model))
        .await?
        .context("choosing the batch size")
}

/// [`batch_size_choice`], logged and exported (`sluice_model_batch_size_chosen`).
async fn starting_batch_size(
    model: &sluice_model::ModelConfig,
    configured: usize,
    query_model: bool,
    tune: bool,
) -> anyhow::Result<usize> {
    let name = model_name(model);
    let choice = batch_size_choice(model, configured, query_model, tune).await?;
    let measured: Vec<String> =
        choice.measured.iter().map(|(rows, p99)| format!("{rows}: {:.2} ms", p99.as_secs_f64() * 1e3)).collect();
    tracing::info!(
        model = name,
        batch_size = choice.batch_size,
        by = choice.by,
        device = choice.device,
        p99_by_batch_size = measured.join(", "),
        "batch size chosen"
    );
    metrics::gauge!("sluice_model_batch_size_chosen", "model" => name, "by" => choice.by).set(choice.batch_size as f64);
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
        Controller::new(store.clone(), &name, base, versions, Duration::from_millis(config.control.reconcile_ms))
            .on_cache_clear(Arc::new(move || clear.clear_local()))
    };
    let stock = &config.inferrer.model;
    let max_batch_size = starting_batch_size(stock, config.inferrer.batch.max_batch_size, false, tune).await?;
    let base = Settings { max_batch_size, ..config.base_settings() };
    let settings = follow(stock, base).start(shutdown.clone()).await;
    let query_settings = if query {
        let model = &config.inferrer.query.model;
        let max_batch_size = starting_batch_size(model, config.inferrer.query.batch.max_batch_size, true, tune).await?;
        let base = Settings { max_batch_size, ..config.query_base_settings() };
        // The stock model's controller reports refusals in the shared hash.
        Some(follow(model, base).leave_all_scope_reports().start(shutdown).await)
    } else {
        None
    };
    Ok(Control { settings, query_settings, cache })
}

/// The inferrer's batch policy, following the live settings.
fn inferrer_policy(mut settings: watch::Receiver<Settings>) -> watch::Receiver<BatchPolicy> {
    let policy = |s: &Settings| BatchPolicy { max_batch_size: s.max_batch_size, max_wait_ms: s.max_wait_ms };
    let (tx, rx) = watch::channel(policy(&settings.borrow_and_update()));
    tokio::spawn(async move {
        while settings.changed().await.is_ok() {
            let next = policy(&settings.borrow_and_update());
            tx.send_if_modified(|current| std::mem::replace(current, next) != next);
        }
    });
    rx
}

/// Counters the demo and the status page report.
#[derive(Debug, Default)]
pub struct Stats {
    pub writer: Arc<WriterStats>,
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

async fn run(
    kind: StageKind,
    config: &SluiceConfig,
    kafka: &KafkaConfig,
    status: Arc<StageStatus>,
    shutdown: CancellationToken,
    control: Control,
    stats: Arc<Stats>,
) -> anyhow::Result<()> {
    let topics = &config.topics;
    let options = |input: &str, policy: watch::Receiver<BatchPolicy>| RunOptions {
        input_topic: input.to_string(),
        dead_letter_topic: topics.dead_letters.clone(),
        group_id: format!("{}-{}", kafka.group_prefix, kind.name()),
        client_id: format!("sluice-{}-{}", kind.name(), std::process::id()),
        policy,
        drain_timeout: Duration::from_millis(config.runtime.drain_timeout_ms),
        queue_capacity: config.runtime.queue_capacity,
        queue_max_bytes: config.runtime.queue_max_bytes,
    };
    let model = &config.inferrer.model;
    let model_dir = model.version_dir(&model.version);
    let metadata = || {
        ModelMetadata::load(&model_dir).with_context(|| {
            format!("configuration keys `inferrer.model.dir` and `.version` ({})", model_dir.display())
        })
    };
    match kind {
        StageKind::Fetcher => {
            let metadata = metadata()?;
            let shape = WindowShape { days: metadata.days(), features: metadata.features() };
            let source: Box<dyn HistorySource> = match config.fetcher.source {
                SourceKind::Synthetic => Box::new(SyntheticSource::new(config.fetcher.synthetic.clone())),
                // One pool per stage process; the first connection is made lazily.
                SourceKind::Postgres => Box::new(PgHistory::new(config.postgres.pool()?)),
            };
            let stage =
                Fetcher::new(source, shape, &topics.fetched).with_max_request_bytes(config.fetcher.max_request_bytes);
            status.set_warmed_up();
            run_stage(kafka, options(&topics.requests, config.fetcher.batch.fixed()), stage, status, shutdown).await?;
        }
        StageKind::Normalizer => {
            let metadata = metadata()?;
            let stats =
                metadata.normalization.as_ref().context("the model's metadata has no normalization statistics")?;
            let mut stage = Normalizer::new(stats, metadata.days(), &topics.normalized);
            if config.normalizer.tokenize_queries {
                let query = &config.inferrer.query.model;
                let dir = query.version_dir(&query.version);
                let tokenizer = ModelMetadata::load(&dir)
                    .and_then(|m| QueryTokenizer::load(&dir, &m))
                    .with_context(|| format!("configuration keys `inferrer.query.model.dir` and `.version` ({}); or set `normalizer.tokenize_queries = false`", dir.display()))?;
                stage = stage.with_queries(tokenizer, config.normalizer.max_query_bytes, &topics.tokenized);
            }
            status.set_warmed_up();
            run_stage(kafka, options(&topics.fetched, config.normalizer.batch.fixed()), stage, status, shutdown)
                .await?;
        }
        StageKind::Inferrer => {
            let settings = control.settings.borrow().clone();
            let worker = start_worker(model, &settings).await?;
            let stage = Inferrer::new(
                worker,
                model.clone(),
                control.settings.clone(),
                Some(control.cache.clone()),
                &topics.inferred,
                stats.inferrer.clone(),
            )?;
            status.set_warmed_up();
            let policy = inferrer_policy(control.settings.clone());
            run_stage(kafka, options(&topics.normalized, policy), stage, status, shutdown).await?;
        }
        StageKind::QueryInferrer => {
            let query = &config.inferrer.query.model;
            let settings = control.query_settings.clone().context("the query model's settings are not followed")?;
            let current = settings.borrow().clone();
            let worker = start_worker(query, &current).await?;
            let stage = QueryInferrer::new(
                worker,
                query.clone(),
                settings.clone(),
                Some(control.cache.clone()),
                &topics.inferred,
                stats.query_inferrer.clone(),
            )?;
            status.set_warmed_up();
            let policy = inferrer_policy(settings);
            run_stage(kafka, options(&topics.tokenized, policy), stage, status, shutdown).await?;
        }
        StageKind::Writer => {
            let w = &config.writer;
            let mut stage =
                Writer::new(control.settings.clone(), w.file.as_deref(), &topics.predictions, stats.writer.clone())?;
            if w.postgres {
                stage = stage.with_sink(Box::new(PgPredictions::new(config.postgres.pool()?)));
            }
            status.set_warmed_up();
            run_stage(kafka, options(&topics.inferred, w.batch.fixed()), stage, status, shutdown).await?;
        }
    }
    Ok(())
}

/// Starts `model` at the version the overrides ask for, if it is installed. An
/// overridden version that cannot load must not crash-loop the stage: the
/// configured one serves, and the error says so.
async fn start_worker(model: &sluice_model::ModelConfig, settings: &Settings) -> anyhow::Result<ModelWorker> {
    let wanted = sluice_model::ModelConfig {
        version: settings.model_version.clone(),
        intra_op_threads: settings.intra_op_threads,
        warmup_batch_size: model.warmup_batch_size.max(settings.max_batch_size),
        ..model.clone()
    };
    let failed = match ModelWorker::start(wanted).await {
        Ok(worker) => return Ok(worker),
        Err(e) if settings.model_version != model.version => e,
        Err(e) => {
            return Err(e)
                .with_context(|| format!("loading model version {} from {}", model.version, model.dir.display()));
        }
    };
    tracing::error!(version = settings.model_version, error = %failed, serving = model.version, "the overridden model version failed to load; serving the configured one");
    ModelWorker::start(model.clone())
        .await
        .with_context(|| format!("loading model version {} from {}", model.version, model.dir.display()))
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
