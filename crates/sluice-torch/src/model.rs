//! One loaded model, used from one thread.

use std::cell::RefCell;
use std::path::Path;

use sluice_model::{Batch, ModelConfig, ModelError, ModelKind, ModelMetadata, Precision};
use tch::{CModule, Device, Kind, TchError, Tensor};

use crate::device;

/// libtorch's errors as the model contract's: out of memory (CUDA's or the CPU
/// allocator's) is recognised here, once, by its message, the only place it
/// can be; everything else is [`ModelError::Torch`].
pub(crate) fn model_error(e: &TchError) -> ModelError {
    let message = e.to_string();
    let lower = message.to_ascii_lowercase();
    let oom = ["out of memory", "not enough memory", "can't allocate memory", "cannot allocate memory"];
    if oom.iter().any(|m| lower.contains(m)) { ModelError::OutOfMemory(message) } else { ModelError::Torch(message) }
}

/// `?` on libtorch results, through [`model_error`].
trait OrModelError<T> {
    fn or_model(self) -> Result<T, ModelError>;
}

impl<T> OrModelError<T> for Result<T, TchError> {
    fn or_model(self) -> Result<T, ModelError> {
        self.map_err(|e| model_error(&e))
    }
}

/// A TorchScript model on its device, with its metadata.
#[derive(Debug)]
pub struct Model {
    module: CModule,
    device: Device,
    metadata: ModelMetadata,
    precision: Precision,
    /// CUDA only: page-locked host buffers, one per model input, allocated
    /// once (grown when a batch needs more) and reused, so that each batch
    /// goes to the GPU with one asynchronous copy.
    pinned: RefCell<Vec<Tensor>>,
    /// The version's directory (its reference files).
    dir: std::path::PathBuf,
}

impl Model {
    /// Loads `model.pt` and `metadata.json` of `config.version` onto the chosen
    /// device, in evaluation mode, and sets libtorch's CPU threads for the
    /// calling thread (call it on the thread that will run the model).
    pub fn load(config: &ModelConfig) -> Result<Self, ModelError> {
        let dir = config.version_dir(&config.version);
        let metadata = ModelMetadata::load(&dir)?;
        if config.tf32 && std::env::var_os(device::TF32_SWITCH).is_none() {
            tracing::warn!("tf32 is asked for but was not switched on at process start (sluice_model::allow_tf32)");
        }
        let device = device::select(config.device)?;
        if config.precision == Precision::Fp16 && device == Device::Cpu {
            return Err(ModelError::Device(
                "precision = \"fp16\" (autocast) needs a CUDA device; use \"bf16\" on the CPU".into(),
            ));
        }
        if device != Device::Cpu && config.cudnn_benchmark {
            tch::Cuda::cudnn_set_benchmark(true);
        }
        // On a GPU the CPU side only copies inputs in and answers out: libtorch's
        // intra-op threads would compete with librdkafka for nothing.
        set_threads(if device == Device::Cpu { config.threads() } else { 1 });
        let path = dir.join("model.pt");
        if !Path::new(&path).exists() {
            return Err(ModelError::Read { path, message: "no such file".into() });
        }
        let mut module = CModule::load_on_device(&path, device).or_model()?;
        module.set_eval();
        if config.precision == Precision::Bf16 {
            // Casts floating-point weights only; token ids stay integers.
            module.to(device, Kind::BFloat16, false);
        }
        Ok(Self { module, device, metadata, precision: config.precision, pinned: RefCell::new(Vec::new()), dir })
    }

    /// Sets libtorch's CPU threads for the calling thread (the model's).
    pub fn set_threads(&self, threads: usize) {
        if self.device == Device::Cpu {
            set_threads(threads);
        }
    }

    pub fn metadata(&self) -> &ModelMetadata {
        &self.metadata
    }

    /// `cpu` or `cuda:N`.
    pub fn device_name(&self) -> String {
        device::name(self.device)
    }

    /// Runs the model once on a batch of `rows` samples and returns `rows x
    /// output_width` values, row-major. Gradients are off (tch 0.24 exposes no
    /// InferenceMode guard; no_grad is the nearest it offers).
    pub fn forward(&self, batch: &Batch, rows: usize) -> Result<Vec<f32>, ModelError> {
        let inputs = match batch {
            Batch::Windows(input) => {
                let row_len = self.metadata.sample_len();
                if rows == 0 || self.metadata.kind != ModelKind::Stock || input.len() != rows * row_len {
                    return Err(ModelError::InputShape { got: input.len(), rows, row_len });
                }
                let shape = [rows as i64, self.metadata.days() as i64, self.metadata.features() as i64];
                let mut x = self.to_device(0, &Tensor::f_from_slice(input).or_model()?.f_view(shape).or_model()?)?;
                if self.precision == Precision::Bf16 {
                    x = x.f_to_kind(Kind::BFloat16).or_model()?;
                }
                vec![x]
            }
            Batch::Tokens { ids, mask, len } => {
                let max_length = self.metadata.tokenizer.as_ref().map_or(0, |t| t.max_length);
                if rows == 0 || *len == 0 || *len > max_length || ids.len() != rows * len || mask.len() != ids.len() {
                    return Err(ModelError::InputShape { got: ids.len(), rows, row_len: *len });
                }
                let shape = [rows as i64, *len as i64];
                vec![
                    self.to_device(0, &Tensor::f_from_slice(ids).or_model()?.f_view(shape).or_model()?)?,
                    self.to_device(1, &Tensor::f_from_slice(mask).or_model()?.f_view(shape).or_model()?)?,
                ]
            }
        };
        let autocast = self.precision == Precision::Fp16;
        let y = tch::no_grad(|| tch::autocast(autocast, || self.module.forward_ts(&inputs))).or_model()?;
        let width = self.metadata.output_width();
        if y.size() != [rows as i64, width as i64] {
            return Err(ModelError::OutputShape { got: y.size(), rows, outputs: width });
        }
        let y = y.f_to_device(Device::Cpu).or_model()?.f_to_kind(Kind::Float).or_model()?.f_contiguous().or_model()?;
        let mut out = vec![0f32; rows * width];
        y.f_copy_data(&mut out, rows * width).or_model()?;
        Ok(out)
    }

    /// Moves input `index` to the model's device. On CUDA it goes through a
    /// reused page-locked buffer with a non-blocking copy; the copy has ended
    /// by the time `forward` returns, since reading the output back waits for
    /// everything queued before it on the stream.
    fn to_device(&self, index: usize, host: &Tensor) -> Result<Tensor, ModelError> {
        if self.device == Device::Cpu {
            return Ok(host.shallow_clone());
        }
        let numel = host.numel() as i64;
        let mut pinned = self.pinned.borrow_mut();
        while pinned.len() <= index {
            pinned.push(Tensor::f_empty([0], (host.kind(), Device::Cpu)).or_model()?);
        }
        if pinned[index].numel() < host.numel() || pinned[index].kind() != host.kind() {
            // Grown to a power of two, so that a slowly growing batch size
            // does not allocate page-locked memory (slow) at every step.
            let capacity = (numel as u64).next_power_of_two() as i64;
            pinned[index] = Tensor::f_empty([capacity], (host.kind(), Device::Cpu))
                .or_model()?
                .f_pin_memory(self.device)
                .or_model()?;
        }
        let mut staging = pinned[index].f_narrow(0, 0, numel).or_model()?.f_view(host.size().as_slice()).or_model()?;
        staging.f_copy_(host).or_model()?;
        staging.f_to_device_(self.device, host.kind(), true, false).or_model()
    }

    /// Runs a full batch (and a batch of one) so that the first real batch
    /// does not pay for lazy initialisation and graph optimisation, and checks
    /// every answer, and the answers to the reference inputs the model ships,
    /// against the outputs' declared ranges: a version that answers outside
    /// them is refused before it serves anything.
    pub fn warm_up(&self, batch_size: usize) -> Result<(), ModelError> {
        let width = self.metadata.output_width();
        let check = |outputs: &[f32], what: &str| match outputs
            .chunks_exact(width)
            .find_map(|row| self.metadata.invalid_value(row))
        {
            Some((output, value, min, max)) => Err(ModelError::WarmUp(format!(
                "on {what} the model answered {output} = {value}, outside its declared range {min}..={max}"
            ))),
            None => Ok(()),
        };
        for rows in [batch_size.max(1), 1] {
            check(&self.forward(&Batch::sample(&self.metadata, rows), rows)?, "the warm-up batch")?;
        }
        if let Some(reference) = self.metadata.load_reference(&self.dir)? {
            let len = self.metadata.sample_len();
            for chunk in reference.inputs.chunks(len * 64) {
                let rows = chunk.len() / len;
                check(&self.forward(&Batch::Windows(chunk.to_vec()), rows)?, "its reference inputs")?;
            }
        }
        Ok(())
    }
}

fn set_threads(threads: usize) {
    tch::set_num_threads(threads.max(1) as i32);
    tracing::info!(threads, "libtorch CPU intra-op threads");
}
