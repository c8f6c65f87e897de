//! The query inferrer: token ids in, intents out.
//!
//! What the cache does not answer is sorted by length and cut into model calls
//! of at most `max_batch_size` rows and `max_batch_tokens` padded tokens (rows
//! x the call's longest sequence), each padded to its own longest sequence,
//! not to the model's maximum: short queries do not pay for long ones.

use std::sync::Arc;
use std::time::Duration;

use sluice_control::Settings;
use sluice_control::cache::{CacheKey, PredictionCache};
use sluice_kafka::{BatchFailure, Incoming, Output, Stage};
use sluice_messages::envelope::{LabelScore, Payload, QueryIntent};
use sluice_model::{Batch, ModelConfig, ModelError, ModelWorker};
use tokio::sync::watch;

use super::answers::Answers;
use super::served::{RowAnswer, ServedModel};
use super::{InferrerStats, accept};
use crate::StageError;
use crate::common::{dead_letter, forward};

/// Labels reported with each answer, best first.
const TOP: usize = 3;

/// The query inferrer stage.
#[derive(Debug)]
pub struct QueryInferrer {
    served: ServedModel,
    cache: Option<Arc<PredictionCache>>,
    output: Arc<str>,
    /// Reused across model calls: padded ids and attention mask.
    buffers: (Vec<i64>, Vec<i64>),
}

impl QueryInferrer {
    /// The dead-letter reasons this stage gives (docs/instrumentation.md).
    pub const DEAD_LETTER_REASONS: &[&str] = &[
        "unknown_envelope_version",
        "undecodable_envelope",
        "unexpected_payload",
        "invalid_token_count",
        "model_error",
        "non_finite_prediction",
        "prediction_out_of_range",
    ];

    /// Takes a started (warmed-up) query model worker, the configuration it was
    /// started from, its live settings, and the prediction cache if there is one.
    pub fn new(
        worker: ModelWorker,
        model: ModelConfig,
        settings: watch::Receiver<Settings>,
        cache: Option<Arc<PredictionCache>>,
        output_topic: &str,
        stats: Arc<InferrerStats>,
    ) -> Result<Self, ModelError> {
        let metadata = worker.metadata();
        if metadata.kind != "query" || metadata.tokenizer.is_none() {
            return Err(ModelError::Metadata {
                path: model.version_dir(worker.version()).join("metadata.json"),
                message: format!(
                    "the query inferrer needs a query model with a tokenizer, not kind {:?}",
                    metadata.kind
                ),
            });
        }
        Ok(Self {
            served: ServedModel::new(worker, model, settings, compatible, stats),
            cache,
            output: output_topic.into(),
            buffers: (Vec::new(), Vec::new()),
        })
    }
}

/// A new version must read the same token ids: the normalizer tokenizes with
/// the configured version's tokenizer. Its labels may change.
fn compatible(config: &ModelConfig, serving: &ModelWorker, new: &ModelWorker) -> Result<(), ModelError> {
    let (a, b) = (serving.metadata(), new.metadata());
    let tokenizer = |worker: &ModelWorker| {
        let file = worker.metadata().tokenizer.as_ref().map(|t| t.file.clone()).unwrap_or_default();
        std::fs::read(config.version_dir(worker.version()).join(file)).ok()
    };
    if b.kind != "query" || a.tokenizer != b.tokenizer || tokenizer(serving) != tokenizer(new) {
        return Err(ModelError::Metadata {
            path: config.version_dir(new.version()).join("metadata.json"),
            message: format!(
                "its tokenizer differs from the serving version {}'s: a different input is a new model, not a version",
                serving.version()
            ),
        });
    }
    Ok(())
}

/// The softmax of `logits` as (label index, probability), most probable first.
fn ranked(logits: &[f32]) -> Vec<(usize, f32)> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    let mut ranked: Vec<(usize, f32)> = exp.into_iter().map(|e| e / sum).enumerate().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
    ranked
}

/// Cuts rows (sorted by length, shortest first) into model calls of at most
/// `max_rows` rows and `max_tokens` padded tokens; a row longer than the token
/// budget still gets a call of its own. Returns the calls as index ranges.
fn calls(lengths: &[usize], max_rows: usize, max_tokens: usize) -> Vec<std::ops::Range<usize>> {
    let mut calls = Vec::new();
    let mut start = 0;
    for (i, &len) in lengths.iter().enumerate() {
        // Sorted: this row is the longest of the call it would join.
        let rows = i - start + 1;
        if i > start && (rows > max_rows || rows * len > max_tokens) {
            calls.push(start..i);
            start = i;
        }
    }
    if start < lengths.len() {
        calls.push(start..lengths.len());
    }
    calls
}

impl Stage for QueryInferrer {
    fn name(&self) -> &'static str {
        "query-inferrer"
    }

    fn dead_letter_reasons(&self) -> &'static [&'static str] {
        Self::DEAD_LETTER_REASONS
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        let settings = self.served.follow_settings().await;
        let worker = &self.served.worker;
        let metadata = worker.metadata().clone();
        let version = worker.version().to_string();
        let (max_length, pad_id) = metadata.tokenizer.as_ref().map_or((0, 0), |t| (t.max_length, t.pad_id));
        let (rows, mut outputs) = accept(batch, |payload| match payload {
            Payload::Tokens(t) if (1..=max_length).contains(&t.ids.len()) => None,
            Payload::Tokens(t) => Some(StageError::TokenCount { got: t.ids.len(), max: max_length }),
            other => Some(StageError::UnexpectedPayload { expected: "tokens", got: other.kind() }),
        });
        if rows.is_empty() {
            return Ok(outputs);
        }
        let ids = |row: usize| match &rows[row].1.payload {
            Payload::Tokens(t) => &t.ids[..],
            _ => &[],
        };

        let cache = self.cache.as_deref().filter(|_| settings.cache_enabled);
        let ttl = Duration::from_secs(settings.cache_ttl_s);
        let width = metadata.output_width();
        let key = |row: usize| CacheKey::of_tokens(&metadata.name, &version, ids(row));
        let valid = |values: &[f32]| values.len() == width && metadata.invalid_value(values).is_none();
        let mut answers =
            Answers::look_up(cache, &metadata.name, &version, rows.len(), key, valid, ttl, &self.served.stats).await;

        // Model calls over what is left, shortest sequences first; a call that
        // fails is split until only what fails alone is left.
        let groups = &answers.to_compute;
        let mut order: Vec<usize> = (0..groups.len()).collect();
        order.sort_by_key(|g| ids(groups[*g].rows[0]).len());
        let lengths: Vec<usize> = order.iter().map(|g| ids(groups[*g].rows[0]).len()).collect();
        let mut computed: Vec<Option<Result<RowAnswer, ModelError>>> = vec![None; groups.len()];
        for call in calls(&lengths, settings.max_batch_size, settings.max_batch_tokens) {
            let members = &order[call];
            let buffers = &mut self.buffers;
            let results = self
                .served
                .infer_rows(members.len(), width, |range, recycled| {
                    let (ids_buffer, mask_buffer) =
                        recycled.map(Batch::into_tokens).unwrap_or_else(|| std::mem::take(buffers));
                    let sequences: Vec<&[u32]> = members[range].iter().map(|g| ids(groups[*g].rows[0])).collect();
                    Batch::tokens(&sequences, 0, pad_id, ids_buffer, mask_buffer)
                })
                .await
                .map_err(|e| BatchFailure { retryable: false, message: StageError::from(e).to_string() })?;
            for (g, result) in members.iter().zip(results) {
                computed[*g] = Some(result);
            }
        }
        let computed = computed.into_iter().map(|c| c.expect("every group is in one call")).collect();
        answers.fill(cache, &metadata.name, &version, computed, valid, ttl, &self.served.stats).await;

        let inferred_at_ms = sluice_messages::now_ms();
        for ((i, envelope), answer) in rows.into_iter().zip(answers.rows) {
            let answer = match answer {
                Some(Ok(answer)) => answer,
                Some(Err(e)) => {
                    outputs.push(dead_letter(i, &StageError::Model(e), Some(envelope.event_id)));
                    continue;
                }
                None => unreachable!("every row is answered or failed"),
            };
            if let Some(bad) = answer.values.iter().find(|v| !v.is_finite()) {
                let e = StageError::NonFinitePrediction { output: "logits", value: *bad };
                outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                continue;
            }
            if let Some((output, value, min, max)) = metadata.invalid_value(&answer.values) {
                let e = StageError::OutOfRange { output: output.to_string(), value, min, max };
                outputs.push(dead_letter(i, &e, Some(envelope.event_id)));
                continue;
            }
            let Payload::Tokens(tokens) = &envelope.payload else { unreachable!("only token rows are kept") };
            let ranked = ranked(&answer.values);
            let label = |index: usize| metadata.labels.get(index).cloned().unwrap_or_default();
            let intent = QueryIntent {
                text: tokens.text.clone(),
                label: label(ranked[0].0),
                confidence: ranked[0].1,
                top: ranked
                    .iter()
                    .take(TOP)
                    .map(|(index, score)| LabelScore { label: label(*index), score: *score })
                    .collect(),
                model_name: metadata.name.clone(),
                model_version: version.clone(),
                batch_size: answer.call_rows,
                padded_length: answer.padded_length,
                cached: answer.cached,
                inferred_at_ms,
            };
            outputs.push(forward(i, &batch[i], &self.output, &envelope, Payload::Intent(intent)));
        }
        Ok(outputs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn calls_respect_rows_and_padded_tokens() {
        // Sorted lengths; 4 rows at most, 40 padded tokens at most.
        let lengths = [3, 5, 8, 9, 10, 12, 30, 60];
        let cut = calls(&lengths, 4, 40);
        assert_eq!(cut, vec![0..4, 4..6, 6..7, 7..8]);
        for call in &cut {
            let padded = call.len() * lengths[call.end - 1];
            assert!(call.len() <= 4 && (padded <= 40 || call.len() == 1), "{call:?}: {padded} tokens");
        }
        assert_eq!(calls(&[], 4, 40), Vec::<std::ops::Range<usize>>::new());
        assert_eq!(calls(&[200], 4, 40), vec![0..1], "a row over the budget still gets a call");
    }

    #[test]
    fn ranks_labels_by_softmax() {
        let ranked = ranked(&[1.0, 3.0, 2.0, 3.0]);
        assert_eq!(ranked.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 3, 2, 0], "ties keep label order");
        let sum: f32 = ranked.iter().map(|r| r.1).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!((ranked[0].1 - 3f32.exp() / (1f32.exp() + 2f32.exp() + 2.0 * 3f32.exp())).abs() < 1e-6);
    }
}
