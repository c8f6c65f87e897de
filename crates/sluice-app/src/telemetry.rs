//! The application's own metrics and logs, in one place (names and labels:
//! docs/instrumentation.md).

use metrics::gauge;
use sluice_model::BatchSizeChoice;

/// The batch size a model starts with, and how it was chosen.
pub(crate) fn batch_size_chosen(model: &str, choice: &BatchSizeChoice) {
    let measured: Vec<String> =
        choice.measured.iter().map(|(rows, p99)| format!("{rows}: {:.2} ms", p99.as_secs_f64() * 1e3)).collect();
    tracing::info!(
        model,
        batch_size = choice.batch_size,
        by = choice.by,
        device = choice.device,
        p99_by_batch_size = measured.join(", "),
        "batch size chosen"
    );
    gauge!("sluice_model_batch_size_chosen", "model" => model.to_string(), "by" => choice.by)
        .set(choice.batch_size as f64);
}

/// One NVML reading of GPU `index`.
pub(crate) fn gpu(index: u32, memory_used_bytes: u64, memory_total_bytes: u64, utilization_percent: u32) {
    let gpu = index.to_string();
    gauge!("sluice_gpu_memory_used_bytes", "gpu" => gpu.clone()).set(memory_used_bytes as f64);
    gauge!("sluice_gpu_memory_total_bytes", "gpu" => gpu.clone()).set(memory_total_bytes as f64);
    gauge!("sluice_gpu_utilization_ratio", "gpu" => gpu).set(f64::from(utilization_percent) / 100.0);
}
