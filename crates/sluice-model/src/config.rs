use std::path::PathBuf;

use serde::{Deserialize, Serialize};

/// Where the model is and how to run it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ModelConfig {
    /// The model's directory: one subdirectory per version, each holding
    /// `model.pt` (TorchScript) and `metadata.json`.
    pub dir: PathBuf,
    /// The version to serve (a subdirectory of `dir`); Redis can switch it.
    /// A number is taken as its digits: versions are usually numbered
    /// directories, and `SLUICE_INFERRER__MODEL__VERSION=2` reads as a number.
    #[serde(deserialize_with = "version_name")]
    pub version: String,
    /// `auto` (CUDA when a GPU is usable, else CPU), `cpu` or `cuda`.
    pub device: DeviceChoice,
    /// libtorch intra-op threads on CPU; 0 picks half the cores (at least 1),
    /// leaving the rest to librdkafka and the other stages of the process.
    pub intra_op_threads: usize,
    /// Batch size of the warm-up run made before the stage reports ready
    /// (the inferrer sets it to its `max_batch_size`).
    pub warmup_batch_size: usize,
    /// A model call whose input tensors are larger than this many bytes is
    /// treated as out of memory before it is made: split, and the row cap
    /// lowered (0: no budget; libtorch's own out-of-memory errors do the same).
    pub memory_budget_bytes: u64,
    /// When not 0: at start, the batch size is tuned to the largest power of
    /// two whose p99 model call time stays within this many milliseconds
    /// (measured on the device, up to the configured `max_batch_size`, or 512
    /// when that is left to the device).
    pub autotune_p99_ms: u64,
    /// `fp32`; `bf16` (weights and float inputs in bfloat16, CPU or GPU); or
    /// `fp16` (autocast to half precision, CUDA only).
    pub precision: Precision,
    /// CUDA only: let cuDNN try its algorithms on the first call of each
    /// input shape and keep the fastest (shapes repeat: batch sizes are capped).
    pub cudnn_benchmark: bool,
    /// CUDA only: allow TF32 in float32 matrix products (Ampere and later;
    /// faster, about 3 decimal digits). Applies to the whole process.
    pub tf32: bool,
    /// Serve inputs that travelled in a lower precision than the model
    /// computes in (bf16 or fp16 windows for an fp32 model): off, they are
    /// dead letters (`lossy_input`), so that rounding is never silent.
    pub accept_lossy_inputs: bool,
}

/// The number format the model computes in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Precision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl Default for ModelConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            version: "1".into(),
            device: DeviceChoice::Auto,
            intra_op_threads: 0,
            warmup_batch_size: 64,
            memory_budget_bytes: 0,
            autotune_p99_ms: 0,
            precision: Precision::Fp32,
            cudnn_benchmark: false,
            tf32: false,
            accept_lossy_inputs: false,
        }
    }
}

impl ModelConfig {
    /// The directory of `version`.
    pub fn version_dir(&self, version: &str) -> PathBuf {
        self.dir.join(version)
    }

    /// Whether `version` is installed (has a metadata file).
    pub fn has_version(&self, version: &str) -> bool {
        self.version_dir(version).join("metadata.json").is_file()
    }

    /// libtorch CPU threads to use: the configured number, or half the cores.
    pub fn threads(&self) -> usize {
        match self.intra_op_threads {
            0 => std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1)),
            n => n,
        }
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

/// A version name given as a string or as a whole number.
pub fn version_name<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<String, D::Error> {
    struct Name;

    impl serde::de::Visitor<'_> for Name {
        type Value = String;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("a version name (a string, or a whole number)")
        }

        fn visit_str<E: serde::de::Error>(self, text: &str) -> Result<String, E> {
            Ok(text.to_string())
        }

        fn visit_u64<E: serde::de::Error>(self, n: u64) -> Result<String, E> {
            Ok(n.to_string())
        }

        fn visit_i64<E: serde::de::Error>(self, n: i64) -> Result<String, E> {
            Ok(n.to_string())
        }
    }

    deserializer.deserialize_any(Name)
}
