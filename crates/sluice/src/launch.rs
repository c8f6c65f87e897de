//! Builds each stage from the configuration and runs it on the Kafka runtime.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use clap::ValueEnum;
use sluice_kafka::{BatchPolicy, KafkaConfig, RunOptions, StageStatus, run_stage};
use sluice_model::{ModelMetadata, ModelWorker};
use sluice_stages::fetcher::{SyntheticSource, WindowShape};
use sluice_stages::{Fetcher, Inferrer, Normalizer, Writer, WriterStats};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{SluiceConfig, SourceKind};

/// The four stages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum StageKind {
    Fetcher,
    Normalizer,
    Inferrer,
    Writer,
}

impl StageKind {
    pub const ALL: [Self; 4] = [Self::Fetcher, Self::Normalizer, Self::Inferrer, Self::Writer];

    pub fn name(self) -> &'static str {
        match self {
            Self::Fetcher => "fetcher",
            Self::Normalizer => "normalizer",
            Self::Inferrer => "inferrer",
            Self::Writer => "writer",
        }
    }
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
    writer_stats: Arc<WriterStats>,
) -> Launched {
    let status = Arc::new(StageStatus::default());
    let task_status = status.clone();
    let task = tokio::spawn(async move {
        // However this task ends (error, panic, or a normal drain), the other
        // stages of the process must not keep running half a pipeline.
        let _stop_the_others = shutdown.clone().drop_guard();
        run(kind, &config, &kafka, task_status, shutdown.clone(), writer_stats)
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
    writer_stats: Arc<WriterStats>,
) -> anyhow::Result<()> {
    let topics = &config.topics;
    let options = |input: &str, batch: BatchPolicy| RunOptions {
        input_topic: input.to_string(),
        dead_letter_topic: topics.dead_letters.clone(),
        group_id: format!("{}-{}", kafka.group_prefix, kind.name()),
        client_id: format!("sluice-{}-{}", kind.name(), std::process::id()),
        policy: batch.fixed(),
        drain_timeout: Duration::from_millis(config.runtime.drain_timeout_ms),
        queue_capacity: config.runtime.queue_capacity,
    };
    let model_dir = &config.inferrer.model.dir;
    let metadata = || {
        ModelMetadata::load(model_dir)
            .with_context(|| format!("configuration key `inferrer.model.dir` ({})", model_dir.display()))
    };
    match kind {
        StageKind::Fetcher => {
            let metadata = metadata()?;
            let shape = WindowShape { days: metadata.days(), features: metadata.features() };
            let source = match config.fetcher.source {
                SourceKind::Synthetic => Box::new(SyntheticSource::new(config.fetcher.synthetic.clone())),
            };
            let stage = Fetcher::new(source, shape, &topics.fetched);
            status.set_warmed_up();
            run_stage(kafka, options(&topics.requests, config.fetcher.batch), stage, status, shutdown).await?;
        }
        StageKind::Normalizer => {
            let metadata = metadata()?;
            let stats =
                metadata.normalization.as_ref().context("the model's metadata has no normalization statistics")?;
            let stage = Normalizer::new(stats, metadata.days(), &topics.normalized);
            status.set_warmed_up();
            run_stage(kafka, options(&topics.fetched, config.normalizer.batch), stage, status, shutdown).await?;
        }
        StageKind::Inferrer => {
            let worker = ModelWorker::start(config.inferrer.model.clone())
                .await
                .with_context(|| format!("loading the model from {}", model_dir.display()))?;
            let stage = Inferrer::new(worker, &topics.inferred)?;
            status.set_warmed_up();
            run_stage(kafka, options(&topics.normalized, config.inferrer.batch), stage, status, shutdown).await?;
        }
        StageKind::Writer => {
            let w = &config.writer;
            let stage = Writer::new(w.min_confidence, w.file.as_deref(), &topics.predictions, writer_stats)?;
            status.set_warmed_up();
            run_stage(kafka, options(&topics.inferred, w.batch), stage, status, shutdown).await?;
        }
    }
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
