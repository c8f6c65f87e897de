//! Sluice's libtorch backend: a TorchScript model plus its metadata file,
//! loaded through libtorch (`tch`), owned by one dedicated thread and fed
//! whole batches. It implements `sluice_model`'s runner and loader traits;
//! nothing above it knows libtorch.
//!
//! - [`Model`]: load, pick the device, warm up, run one batch (synchronous).
//! - [`ModelWorker`]: the thread that owns a [`Model`], and its async handle.
//! - [`TorchLoader`]: loads versions as workers.
//! - [`choose_batch_size`]: the batch size by device, or tuned to a latency target.

mod device;
mod model;
mod tune;
mod worker;

pub use device::allow_tf32;
pub use model::Model;
pub use tune::choose_batch_size;
pub use worker::ModelWorker;

/// Loads model versions with libtorch, each on a thread of its own.
#[derive(Debug, Clone, Copy, Default)]
pub struct TorchLoader;

impl sluice_model::ModelLoader for TorchLoader {
    type Runner = ModelWorker;

    fn load(
        &self,
        config: sluice_model::ModelConfig,
    ) -> impl std::future::Future<Output = Result<ModelWorker, sluice_model::ModelError>> + Send + 'static {
        ModelWorker::start(config)
    }
}
