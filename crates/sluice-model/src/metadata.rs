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
    /// The event kind it serves.
    pub kind: ModelKind,
    /// One sample's shape, without the batch dimension: `[days, features]`
    /// (stock) or `[max_length]` (query).
    pub input_shape: Vec<usize>,
    /// Per-feature z-score statistics, applied by the normalizer (stock).
    #[serde(default)]
    pub normalization: Option<Normalization>,
    /// The tokenizer the normalizer applies (query).
    #[serde(default)]
    pub tokenizer: Option<TokenizerSpec>,
    /// The classes, in the order of the logits (query).
    #[serde(default)]
    pub labels: Vec<String>,
    /// One entry per output column, in order (a query model has one, `logits`,
    /// one column per label).
    pub outputs: Vec<OutputSpec>,
    /// Reference inputs and outputs exported with the model, for checking a runtime (stock).
    #[serde(default)]
    pub reference: Option<Reference>,
    /// Reference phrases with their token ids and logits (query).
    #[serde(default)]
    pub reference_phrases: Option<PhraseReference>,
}

/// The event kind a model serves; `kind` in `metadata.json`, and the names
/// `inferrer.serve` lists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ModelKind {
    /// A window of days x features in, a prediction (return, confidence) out.
    Stock,
    /// Token ids in, an intent (label, confidence) out.
    Query,
}

impl ModelKind {
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::Stock => "stock",
            Self::Query => "query",
        }
    }
}

/// `tokenizer.json` (Hugging Face format) beside the model, and how to apply it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenizerSpec {
    pub file: String,
    /// Sequences are truncated to this many tokens (special tokens included).
    pub max_length: usize,
    /// The id that pads a batch's shorter sequences (masked out).
    pub pad_id: u32,
}

/// A JSON file of [`ReferencePhrase`]s.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PhraseReference {
    pub file: String,
    pub count: usize,
}

/// One held-out phrase as the exporter saw it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReferencePhrase {
    pub text: String,
    /// The true intent.
    pub label: String,
    /// Token ids (truncated, unpadded).
    pub input_ids: Vec<u32>,
    pub logits: Vec<f32>,
    /// The label the model picked.
    pub top1: String,
}

/// Per-feature mean and standard deviation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// What one output column means, and the values it may take.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub name: String,
    pub meaning: String,
    /// The least valid value (inclusive); absent: no lower bound. A stock
    /// model's `confidence` is always within 0..=1 (the prediction schema's
    /// promise): its bounds default to those and may only narrow them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub min: Option<f32>,
    /// The greatest valid value (inclusive); absent: no upper bound.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max: Option<f32>,
}

/// Outputs whose range the output records promise whatever the metadata says
/// (`schemas/prediction.schema.json`): (kind, output, min, max).
const PROMISED_RANGES: [(ModelKind, &str, f32, f32); 1] = [(ModelKind::Stock, "confidence", 0.0, 1.0)];

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
        if self.outputs.is_empty() {
            return Err("outputs must name at least one output".into());
        }
        match self.kind {
            ModelKind::Stock if self.input_shape.len() != 2 || self.input_shape.contains(&0) => {
                return Err(format!("input_shape must be [days, features], got {:?}", self.input_shape));
            }
            ModelKind::Stock => {}
            ModelKind::Query => {
                let Some(tokenizer) = &self.tokenizer else {
                    return Err("a query model needs a tokenizer".into());
                };
                if self.input_shape != [tokenizer.max_length] || tokenizer.max_length < 2 {
                    return Err(format!(
                        "input_shape must be [tokenizer.max_length] with max_length >= 2, got {:?} and {}",
                        self.input_shape, tokenizer.max_length
                    ));
                }
                if self.labels.is_empty() || self.outputs.len() != 1 {
                    return Err("a query model needs labels and exactly one output (the logits)".into());
                }
            }
        }
        for (i, output) in self.outputs.iter().enumerate() {
            let (min, max) = (output.min.unwrap_or(f32::NEG_INFINITY), output.max.unwrap_or(f32::INFINITY));
            if output.min.is_some_and(|m| !m.is_finite()) || output.max.is_some_and(|m| !m.is_finite()) || min > max {
                return Err(format!("outputs[{i}] ({}): min and max must be finite numbers, min <= max", output.name));
            }
            for (kind, name, least, most) in PROMISED_RANGES {
                if self.kind == kind
                    && output.name == name
                    && (min < least && output.min.is_some() || max > most && output.max.is_some())
                {
                    return Err(format!(
                        "outputs[{i}] ({name}): the range {min}..={max} goes beyond {least}..={most}, which the prediction records promise"
                    ));
                }
            }
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

    /// Features per day (stock; 0 for a query model).
    pub fn features(&self) -> usize {
        self.input_shape.get(1).copied().unwrap_or(0)
    }

    /// Values in one sample: `days * features` (stock), `max_length` (query).
    pub fn sample_len(&self) -> usize {
        self.input_shape.iter().product()
    }

    /// Columns of the model's output: one per output, or one per label.
    pub fn output_width(&self) -> usize {
        if self.labels.is_empty() { self.outputs.len() } else { self.labels.len() }
    }

    /// Reads the reference phrases, if the model ships them.
    pub fn load_phrases(&self, dir: &Path) -> Result<Vec<ReferencePhrase>, ModelError> {
        let Some(reference) = &self.reference_phrases else { return Ok(Vec::new()) };
        let path = dir.join(&reference.file);
        let text = std::fs::read_to_string(&path)
            .map_err(|e| ModelError::Read { path: path.clone(), message: e.to_string() })?;
        let phrases: Vec<ReferencePhrase> = serde_json::from_str(&text)
            .map_err(|e| ModelError::Metadata { path: path.clone(), message: e.to_string() })?;
        if phrases.len() != reference.count {
            let message = format!("{} phrases, metadata says {}", phrases.len(), reference.count);
            return Err(ModelError::Metadata { path, message });
        }
        Ok(phrases)
    }

    /// The valid range of output `index` (inclusive; infinite where unbounded),
    /// with the bounds the output records promise. A model with labels has one
    /// output, whose range applies to every column.
    pub fn output_range(&self, index: usize) -> (f32, f32) {
        let Some(output) = self.outputs.get(index) else { return (f32::NEG_INFINITY, f32::INFINITY) };
        let (mut min, mut max) = (output.min.unwrap_or(f32::NEG_INFINITY), output.max.unwrap_or(f32::INFINITY));
        for (kind, name, least, most) in PROMISED_RANGES {
            if self.kind == kind && output.name == name {
                (min, max) = (min.max(least), max.min(most));
            }
        }
        (min, max)
    }

    /// The first value of one answer row (`output_width` values) that is not
    /// finite or outside its output's range: (output name, value, min, max).
    pub fn invalid_value(&self, row: &[f32]) -> Option<(&str, f32, f32, f32)> {
        row.iter().enumerate().find_map(|(column, &value)| {
            let index = if self.labels.is_empty() { column } else { 0 };
            let (min, max) = self.output_range(index);
            let name = self.outputs.get(index).map_or("output", |o| o.name.as_str());
            (!(value.is_finite() && (min..=max).contains(&value))).then_some((name, value, min, max))
        })
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
