//! Sluice's model contract, with no engine in it (as text-embeddings-inference's
//! `backends/core`): what a model is and reads, and the traits a backend
//! implements. The stages depend on this crate only; `sluice-torch` is the
//! libtorch backend.
//!
//! - [`metadata`]: what ships next to a model (`metadata.json`: kind, shape,
//!   normalisation statistics, the meaning and range of each output).
//! - [`ModelConfig`]: where a model is and how to run it.
//! - [`Batch`]: a call's input: stock windows, or padded token ids and masks.
//! - [`ModelRunner`] and [`ModelLoader`]: a loaded version, and how versions
//!   are loaded.
//! - [`QueryTokenizer`]: a query model's `tokenizer.json`.
//! - [`device_default`]: the batch size by device.

mod batch;
mod config;
mod error;
pub mod metadata;
mod runner;
mod tokenizer;
mod tune;

pub use batch::Batch;
pub use config::{DeviceChoice, ModelConfig, Precision, version_name};
pub use error::ModelError;
pub use metadata::{ModelKind, ModelMetadata};
pub use runner::{Inference, ModelLoader, ModelRunner};
pub use tokenizer::QueryTokenizer;
pub use tune::{BatchSizeChoice, device_default};
