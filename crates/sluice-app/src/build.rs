//! Each section of the configuration builds the stage it configures (Vector's
//! `SourceConfig::build`): what it needs from the process comes in a
//! [`Context`], and what it gives back, a [`Built`] stage with its batch
//! policy, the launcher runs on the Kafka runtime the same way for all.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use anyhow::Context as _;
use sluice_control::Settings;
use sluice_core::Stage;
use sluice_kafka::{BatchPolicy, KafkaConfig, KafkaRuntimeError, RunOptions, StageStatus, run_stage};
use sluice_model::{ModelConfig, ModelMetadata, ModelRunner, QueryTokenizer};
use sluice_postgres::history::PgHistory;
use sluice_postgres::sink::PgPredictions;
use sluice_stages::fetcher::{HistorySource, SyntheticSource, WindowShape};
use sluice_stages::{Fetcher, Inferrer, Normalizer, QueryInferrer, Writer};
use sluice_torch::{ModelWorker, TorchLoader};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::config::{FetcherConfig, InferrerConfig, NormalizerConfig, SluiceConfig, SourceKind, WriterConfig};
use crate::launch::{Control, StageKind, Stats};

/// What building a stage may use of its process.
#[derive(Debug)]
pub struct Context<'a> {
    pub config: &'a SluiceConfig,
    pub control: &'a Control,
    pub stats: &'a Stats,
}

type Run = Box<
    dyn FnOnce(
            KafkaConfig,
            RunOptions,
            Arc<StageStatus>,
            CancellationToken,
        ) -> Pin<Box<dyn Future<Output = Result<(), KafkaRuntimeError>> + Send>>
        + Send,
>;

/// A stage built from its configuration, and how it batches.
pub struct Built {
    pub policy: watch::Receiver<BatchPolicy>,
    /// A model stage's live latency target (ms; 0: off).
    pub latency_target: Option<watch::Receiver<u64>>,
    /// A model stage's live `bulk_share`; the others keep `lanes.bulk_share`.
    pub bulk_share: Option<watch::Receiver<u64>>,
    run: Run,
}

impl std::fmt::Debug for Built {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Built").field("policy", &*self.policy.borrow()).finish_non_exhaustive()
    }
}

impl Built {
    fn new<S: Stage>(stage: S, policy: watch::Receiver<BatchPolicy>) -> Self {
        let run: Run = Box::new(move |kafka, options, status, shutdown| {
            Box::pin(async move { run_stage(&kafka, options, stage, status, shutdown).await })
        });
        Self { policy, latency_target: None, bulk_share: None, run }
    }

    /// A model stage: its policy follows the live settings, and so does its
    /// latency target.
    fn model<S: Stage>(stage: S, settings: &watch::Receiver<Settings>) -> Self {
        let policy = |s: &Settings| BatchPolicy { max_batch_size: s.max_batch_size, max_wait_ms: s.max_wait_ms };
        Self {
            latency_target: Some(follow(settings.clone(), |s| s.latency_target_ms)),
            bulk_share: Some(follow(settings.clone(), |s| s.bulk_share)),
            ..Self::new(stage, follow(settings.clone(), policy))
        }
    }

    /// Runs it on the Kafka runtime until `shutdown` (see `sluice_kafka::run_stage`).
    pub async fn run(
        self,
        kafka: KafkaConfig,
        options: RunOptions,
        status: Arc<StageStatus>,
        shutdown: CancellationToken,
    ) -> Result<(), KafkaRuntimeError> {
        (self.run)(kafka, options, status, shutdown).await
    }
}

impl SluiceConfig {
    /// Builds the stage `kind` from its section.
    pub async fn build(&self, kind: StageKind, cx: &Context<'_>) -> anyhow::Result<Built> {
        match kind {
            StageKind::Fetcher => self.fetcher.build(cx),
            StageKind::Normalizer => self.normalizer.build(cx),
            StageKind::Inferrer => self.inferrer.build_stock(cx).await,
            StageKind::QueryInferrer => self.inferrer.build_query(cx).await,
            StageKind::Writer => self.writer.build(cx),
            StageKind::ShadowWriter => self.writer.build_shadow(cx),
        }
    }

    /// The stock model's `metadata.json`, which every stage reads (shape,
    /// normalisation), not only the inferrer.
    fn stock_metadata(&self) -> anyhow::Result<ModelMetadata> {
        let model = &self.inferrer.model;
        let dir = model.version_dir(&model.version);
        ModelMetadata::load(&dir)
            .with_context(|| format!("configuration keys `inferrer.model.dir` and `.version` ({})", dir.display()))
    }
}

impl FetcherConfig {
    fn build(&self, cx: &Context<'_>) -> anyhow::Result<Built> {
        let metadata = cx.config.stock_metadata()?;
        let shape = WindowShape { days: metadata.days(), features: metadata.features() };
        let source: Box<dyn HistorySource> = match self.source {
            SourceKind::Synthetic => Box::new(SyntheticSource::new(self.synthetic.clone())),
            // One pool per stage process; the first connection is made lazily.
            SourceKind::Postgres => Box::new(PgHistory::new(cx.config.postgres.pool()?)),
        };
        let fetched = &cx.config.topics.fetched;
        let mut stage = Fetcher::new(source, shape, fetched).with_max_request_bytes(self.max_request_bytes);
        if cx.config.lanes.enabled {
            stage = stage.with_bulk_output(&cx.config.lanes.twin(fetched));
        }
        Ok(Built::new(stage, self.batch.fixed()))
    }
}

impl NormalizerConfig {
    fn build(&self, cx: &Context<'_>) -> anyhow::Result<Built> {
        let metadata = cx.config.stock_metadata()?;
        let stats = metadata.normalization.as_ref().context("the model's metadata has no normalization statistics")?;
        let topics = &cx.config.topics;
        let mut stage =
            Normalizer::new(stats, metadata.days(), &topics.normalized).with_precision(self.window_precision);
        if self.tokenize_queries {
            let query = &cx.config.inferrer.query.model;
            let dir = query.version_dir(&query.version);
            let tokenizer = ModelMetadata::load(&dir).and_then(|m| QueryTokenizer::load(&dir, &m)).with_context(|| {
                format!(
                    "configuration keys `inferrer.query.model.dir` and `.version` ({}); or set `normalizer.tokenize_queries = false`",
                    dir.display()
                )
            })?;
            stage = stage.with_queries(tokenizer, self.max_query_bytes, &topics.tokenized);
        }
        Ok(Built::new(stage, self.batch.fixed()))
    }
}

impl InferrerConfig {
    async fn build_stock(&self, cx: &Context<'_>) -> anyhow::Result<Built> {
        let settings = cx.control.settings.clone();
        let current = settings.borrow().clone();
        let worker = start_worker(&self.model, &current).await?;
        let stage = Inferrer::new(
            TorchLoader,
            worker,
            self.model.clone(),
            settings.clone(),
            Some(cx.control.cache.clone()),
            &cx.config.topics.inferred,
            cx.stats.inferrer.clone(),
        )?
        .with_decode_threads(self.decode_threads)
        .with_rollout(cx.control.rollout.clone(), &cx.config.topics.inferred_shadow);
        Ok(Built::model(stage, &settings))
    }

    async fn build_query(&self, cx: &Context<'_>) -> anyhow::Result<Built> {
        let settings = cx.control.query_settings.clone().context("the query model's settings are not followed")?;
        let current = settings.borrow().clone();
        let worker = start_worker(&self.query.model, &current).await?;
        let stage = QueryInferrer::new(
            TorchLoader,
            worker,
            self.query.model.clone(),
            settings.clone(),
            Some(cx.control.cache.clone()),
            &cx.config.topics.inferred,
            cx.stats.query_inferrer.clone(),
        )?
        .with_decode_threads(self.decode_threads)
        .with_rollout(cx.control.query_rollout.clone(), &cx.config.topics.inferred_shadow);
        Ok(Built::model(stage, &settings))
    }
}

impl WriterConfig {
    fn build(&self, cx: &Context<'_>) -> anyhow::Result<Built> {
        let config = cx.config;
        let mut stage = Writer::new(
            cx.control.writer_settings.clone(),
            self.file.as_deref(),
            &config.topics.predictions,
            cx.stats.writer.clone(),
        )?;
        if self.postgres {
            stage = stage.with_sink(Box::new(PgPredictions::new(config.postgres.pool()?)));
        }
        Ok(Built::new(stage, self.batch.fixed()))
    }

    /// A rollout's shadow answers: as JSON to `topics.predictions_shadow`,
    /// and to PostgreSQL's shadow tables when the writer saves there.
    fn build_shadow(&self, cx: &Context<'_>) -> anyhow::Result<Built> {
        let (settings, topic) = (cx.control.writer_settings.clone(), &cx.config.topics.predictions_shadow);
        let mut stage = Writer::shadow(settings, topic, cx.stats.shadow_writer.clone());
        if self.postgres {
            stage = stage.with_sink(Box::new(PgPredictions::shadow(cx.config.postgres.pool()?)));
        }
        Ok(Built::new(stage, self.batch.fixed()))
    }
}

/// `part` of the live settings, as a receiver of its own that changes only
/// when that part does.
fn follow<T>(mut settings: watch::Receiver<Settings>, part: fn(&Settings) -> T) -> watch::Receiver<T>
where
    T: Copy + PartialEq + Send + Sync + 'static,
{
    let (tx, rx) = watch::channel(part(&settings.borrow_and_update()));
    tokio::spawn(async move {
        while settings.changed().await.is_ok() {
            let next = part(&settings.borrow_and_update());
            tx.send_if_modified(|current| std::mem::replace(current, next) != next);
        }
    });
    rx
}

/// Starts `model` at the version the overrides ask for, if it is installed. An
/// overridden version that cannot load must not crash-loop the stage: the
/// configured one serves, and the error says so.
async fn start_worker(model: &ModelConfig, settings: &Settings) -> anyhow::Result<ModelWorker> {
    let wanted = ModelConfig {
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
    let worker = ModelWorker::start(model.clone())
        .await
        .with_context(|| format!("loading model version {} from {}", model.version, model.dir.display()))?;
    tracing::info!(version = worker.version(), "serving the configured model version");
    Ok(worker)
}
