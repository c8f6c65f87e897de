//! The inferrer: runs the model once per batch the runtime cuts (size or
//! deadline from the oldest message), on the model thread, while the runtime
//! accumulates the next batch. Non-finite answers are dead letters.

use std::sync::Arc;

use metrics::histogram;
use sluice_kafka::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::envelope::{Envelope, Payload, StockPrediction};
use sluice_model::{ModelError, ModelMetadata, ModelWorker};

use crate::StageError;
use crate::common::{dead_letter, decode, forward};

/// The inferrer stage.
#[derive(Debug)]
pub struct Inferrer {
    worker: ModelWorker,
    output: Arc<str>,
    return_index: usize,
    confidence_index: usize,
    /// Reused across batches: the model input, `rows x sample_len`.
    input: Vec<f32>,
}

impl Inferrer {
    /// Takes a started (warmed-up) model worker whose outputs include
    /// `predicted_return` and `confidence`.
    pub fn new(worker: ModelWorker, output_topic: &str) -> Result<Self, ModelError> {
        let metadata = worker.metadata().clone();
        let index = |name: &str| {
            metadata.output_index(name).ok_or_else(|| ModelError::Metadata {
                path: "metadata.json".into(),
                message: format!("the model has no output named {name:?}"),
            })
        };
        Ok(Self {
            return_index: index("predicted_return")?,
            confidence_index: index("confidence")?,
            worker,
            output: output_topic.into(),
            input: Vec::new(),
        })
    }

    pub fn metadata(&self) -> &Arc<ModelMetadata> {
        self.worker.metadata()
    }
}

impl Stage for Inferrer {
    fn name(&self) -> &'static str {
        "inferrer"
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let metadata = self.worker.metadata().clone();
        let sample_len = metadata.sample_len();
        let mut outputs = Vec::with_capacity(batch.len());
        // (input index, envelope) of each model row, in row order.
        let mut rows: Vec<(usize, Envelope)> = Vec::with_capacity(batch.len());
        let mut input = std::mem::take(&mut self.input);
        input.clear();
        for (i, incoming) in batch.iter().enumerate() {
            let envelope = match decode(i, incoming) {
                Ok(envelope) => envelope,
                Err(dead) => {
                    outputs.push(dead);
                    continue;
                }
            };
            match &envelope.payload {
                Payload::Normalized(w) if w.values.len() == sample_len && w.rows as usize == metadata.days() => {
                    input.extend_from_slice(&w.values);
                    rows.push((i, envelope));
                }
                Payload::Normalized(w) => {
                    let e = StageError::WindowShape {
                        rows: w.rows as usize,
                        cols: w.cols as usize,
                        want_rows: metadata.days(),
                        want_cols: metadata.features(),
                    };
                    outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                }
                other => {
                    let e = StageError::UnexpectedPayload { expected: "normalized", got: other.kind() };
                    outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                }
            }
        }
        if rows.is_empty() {
            self.input = input;
            return Ok(outputs);
        }

        let n = rows.len();
        let mut inference = self
            .worker
            .infer(input, n)
            .await
            .map_err(|e| BatchFailure { retryable: false, message: StageError::from(e).to_string() })?;
        self.input = std::mem::take(&mut inference.input);
        histogram!("sluice_model_batch_rows").record(n as f64);
        histogram!("sluice_model_inference_seconds").record(inference.elapsed.as_secs_f64());
        let width = metadata.outputs.len();
        let inferred_at_ms = sluice_messages::now_ms();
        for (row, (i, envelope)) in rows.into_iter().enumerate() {
            let values = &inference.outputs[row * width..(row + 1) * width];
            let (predicted_return, confidence) = (values[self.return_index], values[self.confidence_index]);
            let bad = [("predicted_return", predicted_return), ("confidence", confidence)]
                .into_iter()
                .find(|(_, v)| !v.is_finite());
            if let Some((output, value)) = bad {
                let e = StageError::NonFinitePrediction { output, value };
                outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                continue;
            }
            let Payload::Normalized(window) = &envelope.payload else {
                unreachable!("only normalized rows are batched")
            };
            let prediction = StockPrediction {
                symbol: window.symbol.clone(),
                as_of: window.as_of,
                predicted_return,
                confidence,
                model_name: metadata.name.clone(),
                model_version: metadata.version.clone(),
                batch_size: n as u32,
                inferred_at_ms,
            };
            outputs.push(forward(i, &batch[i], &self.output, &envelope, Payload::Prediction(prediction)));
        }
        Ok(outputs)
    }
}
