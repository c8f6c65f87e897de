use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the model is and how to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// A directory holding `model.pt` (TorchScript) and `metadata.json`.
    pub dir: PathBuf,
    /// `auto` (CUDA when a GPU is usable, else CPU), `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// libtorch intra-op threads on CPU; 0 picks half the cores (at least 1),
    /// leaving the rest to librdkafka and the other stages of the process.
    pub intra_op_threads: usize,
    /// Batch size of the warm-up run made before the stage reports ready
    /// (the inferrer sets it to its `max_batch_size`).
    pub warmup_batch_size: usize,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self { dir: PathBuf::new(), device: DeviceChoice::Auto, intra_op_threads: 0, warmup_batch_size: 64 }
    }
}

/// Which device runs the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DeviceChoice {
    Auto,
    Cpu,
    Cuda,
}
