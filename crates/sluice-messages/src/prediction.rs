//! The records on the `predictions` output topic (JSON; schema in
//! `schemas/prediction.schema.json`) and in the JSON-lines file sink.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::envelope::LabelScore;

/// One stock prediction as consumers of Sluice see it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PredictionRecord {
    pub event_id: String,
    /// Always `stock` ([`IntentRecord`] has `query`).
    pub kind: String,
    pub symbol: String,
    pub as_of: NaiveDate,
    pub predicted_return: f32,
    pub confidence: f32,
    pub model: ModelRef,
    /// Size of the model batch that computed this prediction; 0 when it came
    /// from the prediction cache.
    pub batch_size: u32,
    /// Whether the answer came from the prediction cache.
    pub cached: bool,
    pub requested_at_ms: i64,
    /// When the model (or the cache) answered.
    pub inferred_at_ms: i64,
    pub written_at_ms: i64,
}

/// The model that answered.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ModelRef {
    pub name: String,
    pub version: String,
}

/// One query's intent as consumers of Sluice see it (same topic, `kind: query`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IntentRecord {
    pub event_id: String,
    /// Always `query`.
    pub kind: String,
    pub text: String,
    pub label: String,
    pub confidence: f32,
    /// The best three labels with their probabilities, most probable first.
    pub top: Vec<LabelScore>,
    pub model: ModelRef,
    pub batch_size: u32,
    pub cached: bool,
    pub requested_at_ms: i64,
    pub inferred_at_ms: i64,
    pub written_at_ms: i64,
}
