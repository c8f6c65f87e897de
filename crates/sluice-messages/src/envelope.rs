//! The envelope every inter-stage message travels in.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// The envelope format this build writes and reads. Bump it when [`Envelope`]
/// changes shape; a reader refuses other versions (dead letter, never a panic).
pub const ENVELOPE_VERSION: u8 = 1;

/// One event on its way between stages.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Envelope {
    /// The producer's event id, kept end to end: the idempotency key at the sinks.
    pub event_id: String,
    /// W3C `traceparent` of the request, when the producer sent a valid one
    /// (the request's Kafka header). Each record's own hop is in its
    /// `traceparent` header, a descendant of this one (see [`crate::trace`]).
    pub traceparent: Option<String>,
    /// When the request entered Sluice (the Kafka timestamp of the request, ms).
    pub requested_at_ms: i64,
    /// When the last stage wrote this envelope (ms).
    pub updated_at_ms: i64,
    /// How many times this event has been re-attempted (0 on the first pass).
    pub attempt: u32,
    pub payload: Payload,
}

/// What an envelope carries; the variant says how far the event has come.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Payload {
    /// Raw history, from the fetcher.
    Fetched(StockWindow),
    /// z-scored history, from the normalizer.
    Normalized(StockWindow),
    /// A text query, passed along by the fetcher.
    Query(QueryText),
    /// The model's answer, from the inferrer.
    Prediction(StockPrediction),
    /// A query's token ids, from the normalizer.
    Tokens(QueryTokens),
    /// The query model's answer, from the inferrer.
    Intent(QueryIntent),
}

impl Payload {
    /// A short name for logs and dead-letter details.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Fetched(_) => "fetched",
            Self::Normalized(_) => "normalized",
            Self::Query(_) => "query",
            Self::Prediction(_) => "prediction",
            Self::Tokens(_) => "tokens",
            Self::Intent(_) => "intent",
        }
    }
}

/// A history window: `rows` days x `cols` features, row-major, oldest day first.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockWindow {
    pub symbol: String,
    pub as_of: NaiveDate,
    pub rows: u32,
    pub cols: u32,
    pub values: Vec<f32>,
}

/// A text query in flight.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryText {
    pub text: String,
}

/// The model's answer for one stock window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockPrediction {
    pub symbol: String,
    pub as_of: NaiveDate,
    pub predicted_return: f32,
    pub confidence: f32,
    pub model_name: String,
    pub model_version: String,
    /// Size of the model batch that computed it (1 for one-at-a-time; 0 when
    /// it came from the prediction cache).
    pub batch_size: u32,
    /// Whether the answer came from the prediction cache.
    pub cached: bool,
    pub inferred_at_ms: i64,
}

/// A query as the model reads it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryTokens {
    /// The text as received (the sink saves it).
    pub text: String,
    /// Token ids, special tokens included, truncated to the model's max length.
    pub ids: Vec<u32>,
}

/// One label and its probability.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LabelScore {
    pub label: String,
    pub score: f32,
}

/// The query model's answer for one query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryIntent {
    pub text: String,
    /// The most probable label, and its probability (softmax of the logits).
    pub label: String,
    pub confidence: f32,
    /// The best three labels, most probable first.
    pub top: Vec<LabelScore>,
    pub model_name: String,
    pub model_version: String,
    /// Rows in the model call that answered it (0 when answered from the cache).
    pub batch_size: u32,
    /// Tokens per row in that call (padded length; 0 when cached).
    pub padded_length: u32,
    pub cached: bool,
    pub inferred_at_ms: i64,
}
