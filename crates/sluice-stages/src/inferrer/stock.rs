//! The stock task: normalised windows in, (predicted return, confidence) out.

use std::path::Path;

use sluice_control::Settings;
use sluice_control::cache::CacheKey;
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Payload, StockPrediction, StockWindow, WindowPrecision};
use sluice_model::{Batch, ModelConfig, ModelError, ModelKind, ModelMetadata, Precision};

use super::{Answer, Task};
use crate::StageError;

/// Serves a stock model: `forward(x: [N, days, features]) -> [N, outputs]`,
/// with outputs named `predicted_return` and `confidence` among them.
#[derive(Debug)]
pub struct StockTask;

/// The outputs a stock model must have.
const OUTPUTS: [&str; 2] = ["predicted_return", "confidence"];

/// Whether a model run as `config` says may take windows that travelled in
/// `window`: windows that give it the very inputs it would make of `f32` ones
/// (`f32`, or the model's own precision; rounding to bf16 through fp16, or
/// the other way, does not), or any when `accept_lossy_inputs` says so. The
/// configuration and the inferrer both ask this.
pub fn admits(window: WindowPrecision, config: &ModelConfig) -> bool {
    config.accept_lossy_inputs
        || matches!(
            (window, config.precision),
            (WindowPrecision::Fp32, _)
                | (WindowPrecision::Bf16, Precision::Bf16)
                | (WindowPrecision::Fp16, Precision::Fp16)
        )
}

impl Task for StockTask {
    const STAGE: &'static str = "inferrer";
    const KIND: ModelKind = ModelKind::Stock;
    const DEAD_LETTER_REASONS: &'static [Reason] = &[
        Reason::UnknownEnvelopeVersion,
        Reason::UndecodableEnvelope,
        Reason::UnexpectedPayload,
        Reason::InvalidWindowShape,
        Reason::LossyInput,
        Reason::ModelError,
        Reason::NonFinitePrediction,
        Reason::PredictionOutOfRange,
    ];
    type Row = StockWindow;

    fn check(metadata: &ModelMetadata, dir: &Path) -> Result<(), ModelError> {
        match OUTPUTS.iter().find(|name| metadata.output_index(name).is_none()) {
            Some(name) => Err(ModelError::Metadata {
                path: dir.join("metadata.json"),
                message: format!("the model has no output named {name:?}"),
            }),
            None => Ok(()),
        }
    }

    fn same_input(
        config: &ModelConfig,
        serving: (&ModelMetadata, &str),
        new: (&ModelMetadata, &str),
    ) -> Result<(), ModelError> {
        let (a, b) = (serving.0, new.0);
        if a.input_shape != b.input_shape || a.normalization != b.normalization {
            return Err(ModelError::Metadata {
                path: config.version_dir(new.1).join("metadata.json"),
                message: format!(
                    "input shape {:?} or normalisation differs from the serving version {} ({:?}): a different input is a new model, not a version",
                    b.input_shape, serving.1, a.input_shape
                ),
            });
        }
        Ok(())
    }

    fn accept(payload: Payload, metadata: &ModelMetadata) -> Result<StockWindow, StageError> {
        match payload {
            Payload::Normalized(w) if w.values.len() == metadata.sample_len() && w.rows as usize == metadata.days() => {
                Ok(w)
            }
            Payload::Normalized(w) => Err(StageError::WindowShape {
                rows: w.rows as usize,
                cols: w.cols as usize,
                want_rows: metadata.days(),
                want_cols: metadata.features(),
            }),
            other => Err(StageError::UnexpectedPayload { expected: "normalized", got: other.kind() }),
        }
    }

    fn check_input(row: &StockWindow, config: &ModelConfig) -> Result<(), StageError> {
        if admits(row.precision, config) {
            return Ok(());
        }
        Err(StageError::LossyInput {
            input: format!("{:?}", row.precision).to_lowercase(),
            model: format!("{:?}", config.precision).to_lowercase(),
        })
    }

    fn cache_key(row: &StockWindow, model: &str, version: &str) -> CacheKey {
        CacheKey::of(model, version, &row.values)
    }

    fn length(_: &StockWindow) -> usize {
        1
    }

    fn max_tokens(_: &Settings) -> usize {
        usize::MAX
    }

    fn assemble(rows: &[&StockWindow], _: &ModelMetadata, recycled: Option<Batch>) -> Batch {
        let mut buffer = recycled.map(Batch::into_windows).unwrap_or_default();
        buffer.clear();
        for row in rows {
            buffer.extend_from_slice(&row.values);
        }
        Batch::Windows(buffer)
    }

    fn answer(
        row: StockWindow,
        answer: &Answer,
        metadata: &ModelMetadata,
        version: &str,
        inferred_at_ms: i64,
    ) -> Payload {
        let value = |name: &str| metadata.output_index(name).map_or(f32::NAN, |i| answer.values[i]);
        Payload::Prediction(StockPrediction {
            symbol: row.symbol,
            as_of: row.as_of,
            predicted_return: value("predicted_return"),
            confidence: value("confidence"),
            model_name: metadata.name.clone(),
            model_version: version.to_string(),
            batch_size: answer.call_rows,
            cached: answer.cached,
            inferred_at_ms,
        })
    }
}
