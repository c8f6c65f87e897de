//! Sluice's model runtime: a TorchScript model plus its metadata file, loaded
//! through libtorch (`tch`), owned by one dedicated thread and fed whole batches.
//!
//! - [`metadata`]: what ships next to `model.pt` (shape, normalisation
//!   statistics, the meaning of each output).
//! - [`Model`]: load, pick the device, warm up, run one batch (synchronous).
//! - [`Batch`]: a batch's input: stock windows, or padded token ids and masks.
//! - [`QueryTokenizer`]: a query model's `tokenizer.json`.
//! - [`ModelWorker`]: the thread that owns a [`Model`], and its async handle.
//! - [`choose_batch_size`]: the batch size by device, or tuned to a latency target.

mod config;
mod device;
mod error;
pub mod metadata;
mod model;
mod tokenizer;
mod tune;
mod worker;

pub use config::{DeviceChoice, ModelConfig, Precision};
pub use device::allow_tf32;
pub use error::ModelError;
pub use metadata::ModelMetadata;
pub use model::{Batch, Model};
pub use tokenizer::QueryTokenizer;
pub use tune::{BatchSizeChoice, choose_batch_size};
pub use worker::{Inference, ModelWorker};
