//! The thread that owns a model, and the async handle that feeds it.
//!
//! libtorch calls block for milliseconds; on a dedicated OS thread they never
//! stall the async runtime, and the stage can accumulate the next batch while
//! this one runs.

use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Instant;

use sluice_model::{Batch, Inference, ModelConfig, ModelError, ModelMetadata, ModelRunner};
use tokio::sync::{mpsc, oneshot};

use crate::Model;

enum Job {
    Infer {
        input: Batch,
        rows: usize,
        reply: oneshot::Sender<Result<Inference, ModelError>>,
    },
    /// libtorch's CPU threads are a per-thread setting: only the model thread
    /// can change its own.
    Threads(usize),
}

/// Handle to the model thread. Dropping it stops the thread.
#[derive(Debug)]
pub struct ModelWorker {
    jobs: Option<mpsc::Sender<Job>>,
    metadata: Arc<ModelMetadata>,
    device: String,
    version: String,
    thread: Option<JoinHandle<()>>,
}

impl ModelWorker {
    /// Starts the thread, loads the model there and warms it up; returns once
    /// the model has answered a full warm-up batch.
    pub async fn start(config: ModelConfig) -> Result<Self, ModelError> {
        let version = config.version.clone();
        let (ready_tx, ready_rx) = oneshot::channel();
        let (jobs_tx, jobs_rx) = mpsc::channel::<Job>(2);
        let thread = std::thread::Builder::new()
            .name("sluice-model".into())
            .spawn(move || serve(&config, ready_tx, jobs_rx))
            .map_err(|e| ModelError::Torch(format!("spawning the model thread: {e}")))?;
        let (metadata, device) = ready_rx.await.map_err(|_| ModelError::WorkerGone)??;
        Ok(Self { jobs: Some(jobs_tx), metadata: Arc::new(metadata), device, version, thread: Some(thread) })
    }

    async fn send(&self, job: Job) -> Result<(), ModelError> {
        let jobs = self.jobs.as_ref().ok_or(ModelError::WorkerGone)?;
        jobs.send(job).await.map_err(|_| ModelError::WorkerGone)
    }
}

impl ModelRunner for ModelWorker {
    fn metadata(&self) -> &Arc<ModelMetadata> {
        &self.metadata
    }

    fn version(&self) -> &str {
        &self.version
    }

    fn device(&self) -> &str {
        &self.device
    }

    /// Runs one batch of `rows` samples on the model thread.
    async fn infer(&self, input: Batch, rows: usize) -> Result<Inference, ModelError> {
        let (reply, answer) = oneshot::channel();
        self.send(Job::Infer { input, rows, reply }).await?;
        answer.await.map_err(|_| ModelError::WorkerGone)?
    }

    /// libtorch's CPU threads are a per-thread setting: only the model thread
    /// can change its own.
    async fn set_threads(&self, threads: usize) -> Result<(), ModelError> {
        self.send(Job::Threads(threads)).await
    }
}

impl Drop for ModelWorker {
    fn drop(&mut self) {
        self.jobs.take();
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn serve(
    config: &ModelConfig,
    ready: oneshot::Sender<Result<(ModelMetadata, String), ModelError>>,
    mut jobs: mpsc::Receiver<Job>,
) {
    let started = Instant::now();
    let model = match Model::load(config).and_then(|m| m.warm_up(config.warmup_batch_size).map(|()| m)) {
        Ok(model) => model,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    tracing::info!(
        model = model.metadata().name,
        version = config.version,
        device = model.device_name(),
        warmup_batch = config.warmup_batch_size,
        took_ms = started.elapsed().as_millis() as u64,
        "model loaded and warmed up"
    );
    if ready.send(Ok((model.metadata().clone(), model.device_name()))).is_err() {
        return;
    }
    while let Some(job) = jobs.blocking_recv() {
        match job {
            Job::Infer { input, rows, reply } => {
                let started = Instant::now();
                let result =
                    model.forward(&input, rows).map(|outputs| Inference { outputs, elapsed: started.elapsed(), input });
                let _ = reply.send(result);
            }
            Job::Threads(n) => model.set_threads(n),
        }
    }
}
