//! The envelope every inter-stage message travels in.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// The envelope format this build writes and reads. Bump it when [`Envelope`]
/// changes shape; a reader refuses other versions (dead letter, never a panic).
///
/// Version 2: window values travel as little-endian bytes (version 1 wrote
/// them as a sequence of floats).
pub const ENVELOPE_VERSION: u8 = 2;

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
    /// How many times this event has been replayed from the dead-letter
    /// topic (`sluice dlq replay` counts it up; 0 on the first pass).
    pub attempt: u32,
    pub payload: Payload,
}

/// An envelope's fields but its payload: what a stage keeps of an input to
/// send the event on with another payload. Not a wire format of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Header {
    pub event_id: String,
    pub traceparent: Option<String>,
    pub requested_at_ms: i64,
    pub attempt: u32,
}

impl Envelope {
    /// The first envelope of event `event_id` (no trace, not replayed),
    /// requested and written now.
    pub fn new(event_id: &str, payload: Payload) -> Self {
        let now = crate::now_ms();
        Self {
            event_id: event_id.to_string(),
            traceparent: None,
            requested_at_ms: now,
            updated_at_ms: now,
            attempt: 0,
            payload,
        }
    }

    /// The header and the payload, to turn the payload into the next one.
    pub fn into_parts(self) -> (Header, Payload) {
        let Self { event_id, traceparent, requested_at_ms, updated_at_ms: _, attempt, payload } = self;
        (Header { event_id, traceparent, requested_at_ms, attempt }, payload)
    }

    /// The envelope of `payload` under `header`, written now.
    pub fn from_parts(header: &Header, payload: Payload) -> Self {
        Self {
            event_id: header.event_id.clone(),
            traceparent: header.traceparent.clone(),
            requested_at_ms: header.requested_at_ms,
            updated_at_ms: crate::now_ms(),
            attempt: header.attempt,
            payload,
        }
    }
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
    #[serde(with = "f32_le_bytes")]
    pub values: Vec<f32>,
}

/// A window's values as one byte string (4 little-endian bytes each) rather
/// than a sequence of floats: bincode writes and reads a sequence element by
/// element, which cost about 5 µs to encode and 7 µs to decode a 30 × 105
/// window, four times per event; bytes are a copy each way.
mod f32_le_bytes {
    use serde::de::{Error, Visitor};
    use serde::{Deserializer, Serializer};

    pub fn serialize<S: Serializer>(values: &[f32], serializer: S) -> Result<S::Ok, S::Error> {
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        serializer.serialize_bytes(&bytes)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Vec<f32>, D::Error> {
        deserializer.deserialize_bytes(Floats)
    }

    struct Floats;

    impl Visitor<'_> for Floats {
        type Value = Vec<f32>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("window values as little-endian f32 bytes")
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Vec<f32>, E> {
            if !bytes.len().is_multiple_of(4) {
                return Err(E::invalid_length(bytes.len(), &"a multiple of 4 bytes"));
            }
            Ok(bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect())
        }
    }
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
