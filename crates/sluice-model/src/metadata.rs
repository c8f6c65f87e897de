//! The metadata file shipped beside a TorchScript model.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::ModelError;

/// `metadata.json`: what the model expects and what it answers. Written by the
/// export script (`deploy/models/export_stock_lstm.py`). Unknown fields are
/// allowed so that exporters can add provenance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelMetadata {
    pub name: String,
    pub version: String,
    /// The event kind it serves (`stock`).
    pub kind: String,
    /// One sample's shape, without the batch dimension: `[days, features]`.
    pub input_shape: Vec<usize>,
    /// Per-feature z-score statistics, applied by the normalizer.
    pub normalization: Option<Normalization>,
    /// One entry per output column, in order.
    pub outputs: Vec<OutputSpec>,
    /// Reference inputs and outputs exported with the model, for checking a runtime.
    #[serde(default)]
    pub reference: Option<Reference>,
}

/// Per-feature mean and standard deviation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// What one output column means.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub name: String,
    pub meaning: String,
}

/// Raw little-endian f32 files, relative to the model directory.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Reference {
    pub inputs: String,
    pub outputs: String,
    pub count: usize,
}

impl ModelMetadata {
    /// Reads and checks `dir/metadata.json`.
    pub fn load(dir: &Path) -> Result<Self, ModelError> {
        let path = dir.join("metadata.json");
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Read { path: path.clone(), message: e.to_string() })?;
        let metadata: Self = serde_json::from_str(&text)
            .map_err(|e| ModelError::Metadata { path: path.clone(), message: e.to_string() })?;
        metadata.check().map_err(|message| ModelError::Metadata { path, message })?;
        Ok(metadata)
    }

    fn check(&self) -> Result<(), String> {
        if self.input_shape.len() != 2 || self.input_shape.contains(&0) {
            return Err(format!("input_shape must be [days, features], got {:?}", self.input_shape));
        }
        if self.outputs.is_empty() {
            return Err("outputs must name at least one output".into());
        }
        if let Some(n) = &self.normalization {
            let features = self.features();
            if n.mean.len() != features || n.std.len() != features {
                return Err(format!(
                    "normalization has {} means and {} stds for {features} features",
                    n.mean.len(),
                    n.std.len()
                ));
            }
            // 1/std must be finite too: the normalizer multiplies by it.
            if let Some(i) = n.std.iter().position(|s| !(s.is_finite() && *s > 0.0 && (1.0 / s).is_finite())) {
                return Err(format!("normalization.std[{i}] = {} is not a positive number", n.std[i]));
            }
            if let Some(i) = n.mean.iter().position(|m| !m.is_finite()) {
                return Err(format!("normalization.mean[{i}] is not finite"));
            }
        }
        Ok(())
    }

    /// Days per window.
    pub fn days(&self) -> usize {
        self.input_shape[0]
    }

    /// Features per day.
    pub fn features(&self) -> usize {
        self.input_shape[1]
    }

    /// Values in one sample (`days * features`).
    pub fn sample_len(&self) -> usize {
        self.days() * self.features()
    }

    /// Index of the output named `name`.
    pub fn output_index(&self, name: &str) -> Option<usize> {
        self.outputs.iter().position(|o| o.name == name)
    }

    /// Reads the reference inputs and outputs, if the model ships them.
    pub fn load_reference(&self, dir: &Path) -> Result<Option<ReferenceData>, ModelError> {
        let Some(reference) = &self.reference else { return Ok(None) };
        let inputs = read_f32(&dir.join(&reference.inputs))?;
        let outputs = read_f32(&dir.join(&reference.outputs))?;
        if inputs.len() != reference.count * self.sample_len() || outputs.len() != reference.count * self.outputs.len()
        {
            return Err(ModelError::Metadata {
                path: dir.join("metadata.json"),
                message: format!("reference files do not hold {} samples", reference.count),
            });
        }
        Ok(Some(ReferenceData { inputs, outputs }))
    }
}

/// Reference samples and the outputs the exporter computed for them.
#[derive(Debug, Clone, PartialEq)]
pub struct ReferenceData {
    /// `count x days x features` values.
    pub inputs: Vec<f32>,
    /// `count x outputs` values.
    pub outputs: Vec<f32>,
}

fn read_f32(path: &PathBuf) -> Result<Vec<f32>, ModelError> {
    let bytes = std::fs::read(path).map_err(|e| ModelError::Read { path: path.clone(), message: e.to_string() })?;
    if bytes.len() % 4 != 0 {
        return Err(ModelError::Read { path: path.clone(), message: "length is not a multiple of 4".into() });
    }
    Ok(bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}
