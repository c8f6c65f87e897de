//! One loaded model, used from one thread.

use std::cell::RefCell;
use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use crate::{ModelConfig, ModelError, ModelMetadata, Precision, device};

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
        let mut module = CModule::load_on_device(&path, device)?;
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
                if rows == 0 || self.metadata.kind != "stock" || input.len() != rows * row_len {
                    return Err(ModelError::InputShape { got: input.len(), rows, row_len });
                }
                let shape = [rows as i64, self.metadata.days() as i64, self.metadata.features() as i64];
                let mut x = self.to_device(0, &Tensor::f_from_slice(input)?.f_view(shape)?)?;
                if self.precision == Precision::Bf16 {
                    x = x.f_to_kind(Kind::BFloat16)?;
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
                    self.to_device(0, &Tensor::f_from_slice(ids)?.f_view(shape)?)?,
                    self.to_device(1, &Tensor::f_from_slice(mask)?.f_view(shape)?)?,
                ]
            }
        };
        let autocast = self.precision == Precision::Fp16;
        let y = tch::no_grad(|| tch::autocast(autocast, || self.module.forward_ts(&inputs)))?;
        let width = self.metadata.output_width();
        if y.size() != [rows as i64, width as i64] {
            return Err(ModelError::OutputShape { got: y.size(), rows, outputs: width });
        }
        let y = y.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
        let mut out = vec![0f32; rows * width];
        y.f_copy_data(&mut out, rows * width)?;
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
            pinned.push(Tensor::f_empty([0], (host.kind(), Device::Cpu))?);
        }
        if pinned[index].numel() < host.numel() || pinned[index].kind() != host.kind() {
            // Grown to a power of two, so that a slowly growing batch size
            // does not allocate page-locked memory (slow) at every step.
            let capacity = (numel as u64).next_power_of_two() as i64;
            pinned[index] = Tensor::f_empty([capacity], (host.kind(), Device::Cpu))?.f_pin_memory(self.device)?;
        }
        let mut staging = pinned[index].f_narrow(0, 0, numel)?.f_view(host.size().as_slice())?;
        staging.f_copy_(host)?;
        Ok(staging.f_to_device_(self.device, host.kind(), true, false)?)
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
            check(&self.forward(&self.sample_batch(rows), rows)?, "the warm-up batch")?;
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

    /// A batch of `rows` placeholder inputs of the model's shape (query models:
    /// 16 tokens of padding, a typical short question), for warm-up and tuning.
    pub fn sample_batch(&self, rows: usize) -> Batch {
        match &self.metadata.tokenizer {
            Some(t) => {
                let len = t.max_length.min(16);
                Batch::Tokens { ids: vec![i64::from(t.pad_id); rows * len], mask: vec![1; rows * len], len }
            }
            None => Batch::Windows(vec![0.0; rows * self.metadata.sample_len()]),
        }
    }
}

/// One batch's input. Its buffers go to the model thread and come back with the
/// answer, so that the caller reuses them from batch to batch.
#[derive(Debug, Clone, PartialEq)]
pub enum Batch {
    /// Windows (`days x features` each) laid end to end.
    Windows(Vec<f32>),
    /// Token ids and attention mask, each `rows x len`, row-major, padded.
    Tokens { ids: Vec<i64>, mask: Vec<i64>, len: usize },
}

impl Batch {
    /// Pads `sequences` to `len` (at least the longest) with `pad_id`, mask 0 on
    /// padding, into `ids` and `mask` (cleared first: their memory is reused).
    pub fn tokens(sequences: &[&[u32]], len: usize, pad_id: u32, mut ids: Vec<i64>, mut mask: Vec<i64>) -> Self {
        let len = sequences.iter().map(|s| s.len()).max().unwrap_or(0).max(len);
        ids.clear();
        mask.clear();
        ids.reserve(sequences.len() * len);
        mask.reserve(sequences.len() * len);
        for sequence in sequences {
            ids.extend(sequence.iter().map(|&id| i64::from(id)));
            ids.extend(std::iter::repeat_n(i64::from(pad_id), len - sequence.len()));
            mask.extend(std::iter::repeat_n(1, sequence.len()));
            mask.extend(std::iter::repeat_n(0, len - sequence.len()));
        }
        Self::Tokens { ids, mask, len }
    }

    /// The bytes of its input tensors.
    pub fn bytes(&self) -> usize {
        match self {
            Self::Windows(values) => values.len() * 4,
            Self::Tokens { ids, mask, .. } => (ids.len() + mask.len()) * 8,
        }
    }

    /// The windows buffer back (empty if this is a token batch).
    pub fn into_windows(self) -> Vec<f32> {
        match self {
            Self::Windows(values) => values,
            Self::Tokens { .. } => Vec::new(),
        }
    }

    /// The id and mask buffers back (empty if this is a window batch).
    pub fn into_tokens(self) -> (Vec<i64>, Vec<i64>) {
        match self {
            Self::Tokens { ids, mask, .. } => (ids, mask),
            Self::Windows(_) => (Vec::new(), Vec::new()),
        }
    }
}

fn set_threads(threads: usize) {
    tch::set_num_threads(threads.max(1) as i32);
    tracing::info!(threads, "libtorch CPU intra-op threads");
}

#[cfg(test)]
mod tests {
    use super::Batch;

    #[test]
    fn pads_to_the_longest_or_further_with_a_mask() {
        let a: &[u32] = &[101, 7, 102];
        let b: &[u32] = &[101, 102];
        let Batch::Tokens { ids, mask, len } = Batch::tokens(&[a, b], 0, 0, vec![9; 40], Vec::new()) else {
            panic!("tokens")
        };
        assert_eq!(len, 3);
        assert_eq!(ids, vec![101, 7, 102, 101, 102, 0]);
        assert_eq!(mask, vec![1, 1, 1, 1, 1, 0]);
        let Batch::Tokens { ids, len, .. } = Batch::tokens(&[b], 4, 5, Vec::new(), Vec::new()) else {
            panic!("tokens")
        };
        assert_eq!((ids, len), (vec![101, 102, 5, 5], 4));
    }
}
