//! What a model backend implements (as text-embeddings-inference's
//! `backends/core`): everything above it, the stages included, is written and
//! tested against these traits, with a fake backend in the unit tests and
//! libtorch (`sluice-torch`) in production.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::{Batch, ModelConfig, ModelError, ModelMetadata};

/// One model call's result.
#[derive(Debug, Clone)]
pub struct Inference {
    /// `rows x output_width` values, row-major.
    pub outputs: Vec<f32>,
    /// Time spent in the model call.
    pub elapsed: Duration,
    /// The input buffers, handed back so that the caller reuses them.
    pub input: Batch,
}

/// A loaded, warmed-up model version.
pub trait ModelRunner: Send + Sync + 'static {
    fn metadata(&self) -> &Arc<ModelMetadata>;

    /// The version (subdirectory) it serves.
    fn version(&self) -> &str;

    /// `cpu` or `cuda:N`.
    fn device(&self) -> &str;

    /// Runs one call of `rows` samples. Out of memory is
    /// [`ModelError::OutOfMemory`], whatever the device said.
    fn infer(&self, input: Batch, rows: usize) -> impl Future<Output = Result<Inference, ModelError>> + Send;

    /// Changes the backend's CPU threads from the next call on.
    fn set_threads(&self, threads: usize) -> impl Future<Output = Result<(), ModelError>> + Send;
}

/// Loads versions of a model: the one served at start, and another when the
/// `model_version` override changes. Dropping a runner may block (a thread is
/// joined), so callers drop it off the async runtime.
pub trait ModelLoader: Clone + Send + Sync + 'static {
    type Runner: ModelRunner;

    /// Loads `config.version` and warms it up (answers checked against the
    /// outputs' declared ranges).
    fn load(&self, config: ModelConfig) -> impl Future<Output = Result<Self::Runner, ModelError>> + Send + 'static;
}
