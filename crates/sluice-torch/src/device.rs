//! Device selection.

use tch::Device;

use sluice_model::{DeviceChoice, ModelError};

/// Resolves the configured choice to a device.
pub(crate) fn select(choice: DeviceChoice) -> Result<Device, ModelError> {
    match choice {
        DeviceChoice::Cpu => Ok(Device::Cpu),
        DeviceChoice::Auto if !nvidia_driver_present() => Ok(Device::Cpu),
        DeviceChoice::Auto => {
            load_cuda_backend();
            Ok(if tch::Cuda::is_available() { Device::Cuda(0) } else { Device::Cpu })
        }
        DeviceChoice::Cuda => {
            load_cuda_backend();
            if tch::Cuda::is_available() {
                Ok(Device::Cuda(0))
            } else {
                Err(ModelError::Device("device = \"cuda\" but libtorch sees no usable GPU".into()))
            }
        }
    }
}

/// The environment switch libtorch reads when its CUDA context starts.
pub(crate) const TF32_SWITCH: &str = "TORCH_ALLOW_TF32_CUBLAS_OVERRIDE";

/// Lets cuBLAS use TF32 for float32 matrix products in this process (the
/// `tf32` model setting). tch 0.24 has no call for it; libtorch reads an
/// environment switch instead, so this must run at process start, before any
/// other thread exists (the binary calls it first thing in `main`).
#[allow(unsafe_code)]
pub fn allow_tf32() {
    // SAFETY: called before any other thread is started (see above), so no
    // thread reads the environment while it changes.
    unsafe { std::env::set_var(TF32_SWITCH, "1") };
}

/// `cpu` or `cuda:N`.
pub(crate) fn name(device: Device) -> String {
    match device {
        Device::Cuda(n) => format!("cuda:{n}"),
        _ => "cpu".into(),
    }
}

/// Whether an NVIDIA kernel driver is loaded: without one, loading libtorch's
/// CUDA library (over a gigabyte) only costs time and memory.
fn nvidia_driver_present() -> bool {
    std::path::Path::new("/proc/driver/nvidia/version").exists()
}

/// Loads `libtorch_cuda.so` so that libtorch registers its CUDA backend.
///
/// The linker drops `libtorch_cuda.so` under `--as-needed` because no symbol of
/// ours refers to it, and then CUDA reports unavailable even on a GPU machine
/// (tch-rs issue #980). It is found through the rpath set by `rpath.rs`.
#[allow(unsafe_code)]
fn load_cuda_backend() {
    // SAFETY: dlopen with a valid NUL-terminated name; the handle is kept open
    // for the life of the process on purpose (never dlclose'd).
    let handle = unsafe { libc::dlopen(c"libtorch_cuda.so".as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if handle.is_null() {
        tracing::warn!("libtorch_cuda.so could not be loaded; CUDA will be unavailable");
    }
}
