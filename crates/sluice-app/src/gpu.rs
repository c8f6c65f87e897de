//! GPU memory and utilisation from NVML (the NVIDIA driver's management
//! library, loaded at run time), for `/metrics` and `/status` in a process
//! whose models may run on CUDA. On a machine without an NVIDIA driver NVML
//! does not load and nothing is reported.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use nvml_wrapper::Nvml;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

/// One GPU at the last reading.
#[derive(Debug, Clone, Serialize)]
pub struct GpuReading {
    pub index: u32,
    pub name: String,
    pub memory_used_bytes: u64,
    pub memory_total_bytes: u64,
    pub utilization_percent: u32,
}

/// The latest readings, refreshed every few seconds.
#[derive(Debug, Default)]
pub struct GpuMonitor {
    readings: Mutex<Vec<GpuReading>>,
}

impl GpuMonitor {
    /// Starts reading every `interval` until `shutdown`; `None` when NVML
    /// cannot be loaded (no NVIDIA driver).
    pub fn start(interval: Duration, shutdown: CancellationToken) -> Option<Arc<Self>> {
        let nvml = match Nvml::init() {
            Ok(nvml) => nvml,
            Err(e) => {
                tracing::debug!(error = %e, "NVML unavailable: no GPU statistics");
                return None;
            }
        };
        let monitor = Arc::new(Self::default());
        let reporting = monitor.clone();
        tokio::spawn(async move {
            loop {
                let readings = tokio::task::block_in_place(|| read(&nvml));
                for r in &readings {
                    crate::telemetry::gpu(r.index, r.memory_used_bytes, r.memory_total_bytes, r.utilization_percent);
                }
                *reporting.readings.lock().unwrap_or_else(std::sync::PoisonError::into_inner) = readings;
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(interval) => {}
                }
            }
        });
        Some(monitor)
    }

    pub fn readings(&self) -> Vec<GpuReading> {
        self.readings.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }
}

fn read(nvml: &Nvml) -> Vec<GpuReading> {
    let count = nvml.device_count().unwrap_or(0);
    (0..count)
        .filter_map(|index| {
            let device = nvml.device_by_index(index).ok()?;
            let memory = device.memory_info().ok()?;
            Some(GpuReading {
                index,
                name: device.name().unwrap_or_default(),
                memory_used_bytes: memory.used,
                memory_total_bytes: memory.total,
                utilization_percent: device.utilization_rates().map_or(0, |u| u.gpu),
            })
        })
        .collect()
}
