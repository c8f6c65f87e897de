//! The batch size a model starts with: chosen by device, or tuned on the
//! device to a latency target (measured here, on the model).

use std::time::{Duration, Instant};

use sluice_model::{Batch, BatchSizeChoice, ModelConfig, ModelError, ModelKind, device_default};

use crate::Model;

/// Picks the batch size `config`'s model starts with. `configured` is the
/// configuration's `max_batch_size` (0: by device); `kind` says which
/// defaults apply. With `config.autotune_p99_ms`, the model is loaded here (on
/// the calling thread: call it from a blocking task) and timed at 1, 2, 4, ...
/// rows up to the configured size (512 when by device); the largest size whose
/// p99 call time meets the target wins, 1 if none does.
pub fn choose_batch_size(
    config: &ModelConfig,
    configured: usize,
    kind: ModelKind,
) -> Result<BatchSizeChoice, ModelError> {
    if config.autotune_p99_ms == 0 {
        // No need to load the model: the device decides.
        let device = crate::device::select(config.device)?;
        let (batch_size, by) = match configured {
            0 => (device_default(kind, device != tch::Device::Cpu), "device"),
            n => (n, "configured"),
        };
        return Ok(BatchSizeChoice { batch_size, by, device: crate::device::name(device), measured: Vec::new() });
    }
    let model = Model::load(config)?;
    let device = model.device_name();
    let target = Duration::from_millis(config.autotune_p99_ms);
    let ceiling = if configured == 0 { 512 } else { configured };
    let mut measured = Vec::new();
    let mut best = 1;
    let mut rows = 1;
    while rows <= ceiling {
        let p99 = p99_call_time(&model, rows)?;
        measured.push((rows, p99));
        if p99 > target {
            // Call time grows with the batch: larger sizes would miss too.
            break;
        }
        best = rows;
        rows *= 2;
    }
    Ok(BatchSizeChoice { batch_size: best, by: "autotune", device, measured })
}

/// The p99 of up to 100 calls of `rows` rows (at least 10, at most about 2 s
/// of calls), after a warm-up call.
fn p99_call_time(model: &Model, rows: usize) -> Result<Duration, ModelError> {
    let batch = Batch::sample(model.metadata(), rows);
    model.forward(&batch, rows)?;
    let started = Instant::now();
    let mut times = Vec::with_capacity(100);
    while times.len() < 100 && (times.len() < 10 || started.elapsed() < Duration::from_secs(2)) {
        let call = Instant::now();
        model.forward(&batch, rows)?;
        times.push(call.elapsed());
    }
    times.sort();
    Ok(times[(times.len() * 99).div_ceil(100) - 1])
}
