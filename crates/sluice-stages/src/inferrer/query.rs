//! The query task: token ids in, an intent out. Each call is padded to its
//! own longest sequence, not to the model's maximum: short queries do not pay
//! for long ones.

use std::path::Path;

use sluice_control::Settings;
use sluice_control::cache::CacheKey;
use sluice_control::rollout::Tally;
use sluice_messages::dead_letter::Reason;
use sluice_messages::envelope::{Header, LabelScore, Payload, QueryIntent, QueryTokens};
use sluice_model::{Batch, ModelConfig, ModelError, ModelKind, ModelMetadata};

use super::{Answer, Task};
use crate::StageError;

/// Labels reported with each answer, best first.
const TOP: usize = 3;

/// Serves a query model: `forward(input_ids, attention_mask: [N, L]) ->
/// [N, labels]` logits.
#[derive(Debug)]
pub struct QueryTask;

impl Task for QueryTask {
    const STAGE: &'static str = "query-inferrer";
    const KIND: ModelKind = ModelKind::Query;
    const DEAD_LETTER_REASONS: &'static [Reason] = &[
        Reason::UnknownEnvelopeVersion,
        Reason::UndecodableEnvelope,
        Reason::UnexpectedPayload,
        Reason::InvalidTokenCount,
        Reason::ModelError,
        Reason::NonFinitePrediction,
        Reason::PredictionOutOfRange,
        Reason::DeadlineExceeded,
    ];
    type Row = QueryTokens;

    fn check(metadata: &ModelMetadata, dir: &Path) -> Result<(), ModelError> {
        if metadata.tokenizer.is_none() {
            return Err(ModelError::Metadata {
                path: dir.join("metadata.json"),
                message: "the query stage needs a query model with a tokenizer".into(),
            });
        }
        Ok(())
    }

    /// The normalizer tokenizes with the configured version's tokenizer: a
    /// new version must read the same token ids. Its labels may change.
    fn same_input(
        config: &ModelConfig,
        serving: (&ModelMetadata, &str),
        new: (&ModelMetadata, &str),
    ) -> Result<(), ModelError> {
        let tokenizer = |(metadata, version): (&ModelMetadata, &str)| {
            let file = metadata.tokenizer.as_ref().map(|t| t.file.clone()).unwrap_or_default();
            std::fs::read(config.version_dir(version).join(file)).ok()
        };
        if serving.0.tokenizer != new.0.tokenizer || tokenizer(serving) != tokenizer(new) {
            return Err(ModelError::Metadata {
                path: config.version_dir(new.1).join("metadata.json"),
                message: format!(
                    "its tokenizer differs from the serving version {}'s: a different input is a new model, not a version",
                    serving.1
                ),
            });
        }
        Ok(())
    }

    fn accept(
        header: &Header,
        payload: Payload,
        metadata: &ModelMetadata,
    ) -> Result<Vec<(Header, QueryTokens)>, StageError> {
        let max_length = metadata.tokenizer.as_ref().map_or(0, |t| t.max_length);
        match payload {
            Payload::Tokens(t) if (1..=max_length).contains(&t.ids.len()) => Ok(vec![(header.clone(), t)]),
            Payload::Tokens(t) => Err(StageError::TokenCount { got: t.ids.len(), max: max_length }),
            other => Err(StageError::UnexpectedPayload { expected: "tokens", got: other.kind() }),
        }
    }

    /// The token ids: the text as the tokenizer normalised and truncated it,
    /// that is what the model sees.
    fn cache_key(row: &QueryTokens, model: &str, version: &str) -> CacheKey {
        CacheKey::of_tokens(model, version, &row.ids)
    }

    fn length(row: &QueryTokens) -> usize {
        row.ids.len()
    }

    fn max_tokens(settings: &Settings) -> usize {
        settings.max_batch_tokens
    }

    fn assemble(rows: &[&QueryTokens], metadata: &ModelMetadata, recycled: Option<Batch>) -> Batch {
        let (ids, mask) = recycled.map(Batch::into_tokens).unwrap_or_default();
        let sequences: Vec<&[u32]> = rows.iter().map(|r| &r.ids[..]).collect();
        let pad_id = metadata.tokenizer.as_ref().map_or(0, |t| t.pad_id);
        Batch::tokens(&sequences, 0, pad_id, ids, mask)
    }

    fn answer(
        row: &QueryTokens,
        answer: &Answer,
        metadata: &ModelMetadata,
        version: &str,
        inferred_at_ms: i64,
    ) -> Payload {
        let ranked = ranked(&answer.values);
        let label = |index: usize| metadata.labels.get(index).cloned().unwrap_or_default();
        Payload::Intent(QueryIntent {
            text: row.text.clone(),
            label: label(ranked[0].0),
            confidence: ranked[0].1,
            top: ranked
                .iter()
                .take(TOP)
                .map(|(index, score)| LabelScore { label: label(*index), score: *score })
                .collect(),
            model_name: metadata.name.clone(),
            model_version: version.to_string(),
            batch_size: answer.call_rows,
            padded_length: answer.padded_length,
            cached: answer.cached,
            inferred_at_ms,
        })
    }

    /// The event id: a query's text may repeat, its event does not.
    fn canary_key<'a>(header: &'a Header, _: &'a QueryTokens) -> &'a [u8] {
        header.event_id.as_bytes()
    }

    /// Whether both gave the same label (by name: a version may order its labels otherwise).
    fn compare(tally: &mut Tally, serving: (&ModelMetadata, &[f32]), candidate: (&ModelMetadata, &[f32])) {
        let label = |(metadata, logits): (&ModelMetadata, &[f32])| {
            metadata.labels.get(ranked(logits)[0].0).cloned().unwrap_or_default()
        };
        tally.query(label(serving) == label(candidate));
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_labels_by_softmax() {
        let ranked = ranked(&[1.0, 3.0, 2.0, 3.0]);
        assert_eq!(ranked.iter().map(|r| r.0).collect::<Vec<_>>(), vec![1, 3, 2, 0], "ties keep label order");
        let sum: f32 = ranked.iter().map(|r| r.1).sum();
        assert!((sum - 1.0).abs() < 1e-6);
        assert!((ranked[0].1 - 3f32.exp() / (1f32.exp() + 2f32.exp() + 2.0 * 3f32.exp())).abs() < 1e-6);
    }
}
