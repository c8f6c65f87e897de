//! One loaded model, used from one thread.

use std::path::Path;

use tch::{CModule, Device, Kind, Tensor};

use crate::{ModelConfig, ModelError, ModelMetadata, device};

/// A TorchScript model on its device, with its metadata.
#[derive(Debug)]
pub struct Model {
    module: CModule,
    device: Device,
    metadata: ModelMetadata,
}

impl Model {
    /// Loads `model.pt` and `metadata.json` of `config.version` onto the chosen
    /// device, in evaluation mode, and sets libtorch's CPU threads for the
    /// calling thread (call it on the thread that will run the model).
    pub fn load(config: &ModelConfig) -> Result<Self, ModelError> {
        let dir = config.version_dir(&config.version);
        let metadata = ModelMetadata::load(&dir)?;
        let device = device::select(config.device)?;
        if device == Device::Cpu {
            set_threads(config.threads());
        }
        let path = dir.join("model.pt");
        if !Path::new(&path).exists() {
            return Err(ModelError::Read { path, message: "no such file".into() });
        }
        let mut module = CModule::load_on_device(&path, device)?;
        module.set_eval();
        Ok(Self { module, device, metadata })
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
        match self.device {
            Device::Cuda(n) => format!("cuda:{n}"),
            _ => "cpu".into(),
        }
    }

    /// Runs the model once on `rows` samples laid end to end in `input`, and
    /// returns `rows x outputs` values, row-major. Gradients are off (tch 0.24
    /// exposes no InferenceMode guard; no_grad is the nearest it offers).
    pub fn forward(&self, input: &[f32], rows: usize) -> Result<Vec<f32>, ModelError> {
        let row_len = self.metadata.sample_len();
        if rows == 0 || input.len() != rows * row_len {
            return Err(ModelError::InputShape { got: input.len(), rows, row_len });
        }
        let shape = [rows as i64, self.metadata.days() as i64, self.metadata.features() as i64];
        let x = Tensor::f_from_slice(input)?.f_view(shape)?.f_to_device(self.device)?;
        let y = tch::no_grad(|| self.module.forward_ts(&[x]))?;
        let outputs = self.metadata.outputs.len();
        if y.size() != [rows as i64, outputs as i64] {
            return Err(ModelError::OutputShape { got: y.size(), rows, outputs });
        }
        let y = y.f_to_device(Device::Cpu)?.f_to_kind(Kind::Float)?.f_contiguous()?;
        let mut out = vec![0f32; rows * outputs];
        y.f_copy_data(&mut out, rows * outputs)?;
        Ok(out)
    }

    /// Runs a full batch of zeros (and a batch of one) so that the first real
    /// batch does not pay for lazy initialisation and graph optimisation.
    pub fn warm_up(&self, batch_size: usize) -> Result<(), ModelError> {
        let row_len = self.metadata.sample_len();
        for rows in [batch_size.max(1), 1] {
            self.forward(&vec![0.0; rows * row_len], rows)?;
        }
        Ok(())
    }
}

fn set_threads(threads: usize) {
    tch::set_num_threads(threads.max(1) as i32);
    tracing::info!(threads, "libtorch CPU intra-op threads");
}
