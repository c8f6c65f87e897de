//! The batch size a model starts with, by device (the backend measures the
//! autotuned one: `sluice_torch::choose_batch_size`).

use std::time::Duration;

use crate::ModelKind;

/// The choice and how it was made, for the log, `/status` and metrics.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchSizeChoice {
    pub batch_size: usize,
    /// `configured`, `device` or `autotune`.
    pub by: &'static str,
    /// `cpu` or `cuda:N`.
    pub device: String,
    /// Autotune only: (batch size, p99 model call time) for each size tried.
    pub measured: Vec<(usize, Duration)>,
}

/// The default batch size on each device when the configuration leaves it
/// to the device (`max_batch_size = 0`). CPU figures are this project's
/// measurements (docs/benchmarks/batching.md: the stock LSTM's throughput is
/// flat from 64 rows on; the query model's best token budget is reached at
/// 32 rows); the GPU ones are the users' own (256), to be measured.
pub fn device_default(kind: ModelKind, gpu: bool) -> usize {
    match (kind, gpu) {
        (ModelKind::Stock, false) => 64,
        (ModelKind::Stock, true) => 256,
        (ModelKind::Query, false) => 32,
        (ModelKind::Query, true) => 128,
    }
}
