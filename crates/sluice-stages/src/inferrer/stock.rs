//! The stock task: normalised windows in, (predicted return, confidence) out.

use std::path::Path;
use std::sync::Arc;

use chrono::NaiveDate;
use sluice_control::Settings;
use sluice_control::cache::CacheKey;
use sluice_control::rollout::Tally;
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Header, Payload, StockPrediction, StockSeries, StockWindow, WindowPrecision};
use sluice_model::{Batch, ModelConfig, ModelError, ModelKind, ModelMetadata, Precision};

use super::{Answer, Task};
use crate::StageError;

/// Serves a stock model: `forward(x: [N, days, features]) -> [N, outputs]`,
/// with outputs named `predicted_return` and `confidence` among them.
#[derive(Debug)]
pub struct StockTask;

/// The outputs a stock model must have.
const OUTPUTS: [&str; 2] = ["predicted_return", "confidence"];

/// One window the model is asked about: a window that travelled alone, or a
/// step of a backfill's series, formed from the series in place (the series
/// is shared by its steps, never copied per step).
#[derive(Debug)]
pub enum StockRow {
    Window(StockWindow),
    Step { series: Arc<StockSeries>, step: usize },
}

impl StockRow {
    /// The window's values, row-major (empty for a step its series does not hold).
    pub fn values(&self) -> &[f32] {
        match self {
            Self::Window(w) => &w.values,
            Self::Step { series, step } => series.step_values(&series.steps[*step]).unwrap_or_default(),
        }
    }

    /// (rows, columns) of the window.
    fn shape(&self) -> (usize, usize) {
        match self {
            Self::Window(w) => (w.rows as usize, w.cols as usize),
            Self::Step { series, .. } => (series.window as usize, series.history.cols as usize),
        }
    }

    fn precision(&self) -> WindowPrecision {
        match self {
            Self::Window(w) => w.precision,
            Self::Step { series, .. } => series.history.precision,
        }
    }

    fn symbol(&self) -> &str {
        match self {
            Self::Window(w) => &w.symbol,
            Self::Step { series, .. } => &series.history.symbol,
        }
    }

    fn date(&self) -> NaiveDate {
        match self {
            Self::Window(w) => w.as_of,
            Self::Step { series, step } => series.steps[*step].as_of,
        }
    }
}

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
        Reason::DeadlineExceeded,
    ];
    type Row = StockRow;

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

    fn accept(header: &Header, payload: Payload, _: &ModelMetadata) -> Result<Vec<(Header, StockRow)>, StageError> {
        match payload {
            Payload::Normalized(w) => Ok(vec![(header.clone(), StockRow::Window(w))]),
            Payload::NormalizedSeries(series) => {
                let series = Arc::new(series);
                Ok((0..series.steps.len())
                    .map(|step| {
                        (header.of_event(&series.steps[step].event_id), StockRow::Step { series: series.clone(), step })
                    })
                    .collect())
            }
            other => Err(StageError::UnexpectedPayload { expected: "normalized", got: other.kind() }),
        }
    }

    fn check_input(row: &StockRow, metadata: &ModelMetadata, config: &ModelConfig) -> Result<(), StageError> {
        let (rows, cols) = row.shape();
        if rows != metadata.days() || row.values().len() != metadata.sample_len() {
            let (want_rows, want_cols) = (metadata.days(), metadata.features());
            return Err(StageError::WindowShape { rows, cols, want_rows, want_cols });
        }
        if admits(row.precision(), config) {
            return Ok(());
        }
        Err(StageError::LossyInput {
            input: format!("{:?}", row.precision()).to_lowercase(),
            model: format!("{:?}", config.precision).to_lowercase(),
        })
    }

    fn original(row: &StockRow) -> Option<Payload> {
        match row {
            StockRow::Window(_) => None,
            StockRow::Step { series, step } => series.step_window(&series.steps[*step]).map(Payload::Normalized),
        }
    }

    fn cache_key(row: &StockRow, model: &str, version: &str) -> CacheKey {
        CacheKey::of(model, version, row.values())
    }

    fn length(_: &StockRow) -> usize {
        1
    }

    fn max_tokens(_: &Settings) -> usize {
        usize::MAX
    }

    fn assemble(rows: &[&StockRow], _: &ModelMetadata, recycled: Option<Batch>) -> Batch {
        let mut buffer = recycled.map(Batch::into_windows).unwrap_or_default();
        buffer.clear();
        for row in rows {
            buffer.extend_from_slice(row.values());
        }
        Batch::Windows(buffer)
    }

    fn answer(
        row: &StockRow,
        answer: &Answer,
        metadata: &ModelMetadata,
        version: &str,
        inferred_at_ms: i64,
    ) -> Payload {
        let value = |name: &str| metadata.output_index(name).map_or(f32::NAN, |i| answer.values[i]);
        Payload::Prediction(StockPrediction {
            symbol: row.symbol().to_string(),
            as_of: row.date(),
            predicted_return: value("predicted_return"),
            confidence: value("confidence"),
            model_name: metadata.name.clone(),
            model_version: version.to_string(),
            batch_size: answer.call_rows,
            cached: answer.cached,
            inferred_at_ms,
        })
    }

    /// The symbol: a canary follows a stock, every window of it.
    fn canary_key<'a>(_: &'a Header, row: &'a StockRow) -> &'a [u8] {
        row.symbol().as_bytes()
    }

    /// The absolute difference of the predicted return.
    fn compare(tally: &mut Tally, serving: (&ModelMetadata, &[f32]), candidate: (&ModelMetadata, &[f32])) {
        let value = |(metadata, values): (&ModelMetadata, &[f32])| {
            metadata.output_index("predicted_return").map_or(f32::NAN, |i| values[i])
        };
        tally.stock(value(serving), value(candidate));
    }
}
