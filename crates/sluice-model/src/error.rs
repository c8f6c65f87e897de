use std::path::PathBuf;

use thiserror::Error;

/// What can go wrong with a model. `Clone`, so that one failure can be reported
/// to every item of the batch it hit.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum ModelError {
    /// A file is missing or unreadable: fatal, fix the deployment.
    #[error("reading {path}: {message}")]
    Read { path: PathBuf, message: String },
    /// `metadata.json` is not valid, or contradicts itself.
    #[error("model metadata {path}: {message}")]
    Metadata { path: PathBuf, message: String },
    /// The requested device cannot be used.
    #[error("device: {0}")]
    Device(String),
    /// Input of the wrong size for the model: a bug in the caller.
    #[error("input of {got} values is not {rows} x {row_len}")]
    InputShape { got: usize, rows: usize, row_len: usize },
    /// The tokenizer refused a text.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The backend failed to load or run the model.
    #[error("libtorch: {0}")]
    Torch(String),
    /// The call needed more memory than the device (or the configured
    /// `memory_budget_bytes`) has: the caller splits it and lowers its row cap.
    /// Classified once, where the backend's error is caught.
    #[error("out of memory: {0}")]
    OutOfMemory(String),
    /// The model's output is not `[rows, outputs]`.
    #[error("model returned shape {got:?}, expected [{rows}, {outputs}]")]
    OutputShape { got: Vec<i64>, rows: usize, outputs: usize },
    /// The version answered outside its declared output ranges while warming
    /// up: it is refused (the serving version stays).
    #[error("warm-up: {0}")]
    WarmUp(String),
    /// The model thread is gone (it panicked or the worker was dropped).
    #[error("the model thread has stopped")]
    WorkerGone,
}
