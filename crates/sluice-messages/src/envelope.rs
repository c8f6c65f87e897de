//! The envelope every inter-stage message travels in.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

/// The envelope format this build writes and reads. Bump it when [`Envelope`]
/// changes shape; a reader refuses other versions (dead letter, never a panic).
///
/// Version 2: window values travel as little-endian bytes (version 1 wrote
/// them as a sequence of floats). Version 3: a window says the number format
/// its values travel in ([`WindowPrecision`]: 4 bytes each, or 2 for bf16 and
/// fp16). Version 4: a backfill's history may travel once for all its steps
/// ([`StockSeries`]). Version 5: an event may carry a deadline
/// ([`Envelope::deadline_ms`]).
pub const ENVELOPE_VERSION: u8 = 5;

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
    /// When the answer stops being wanted (Unix ms), from the request's
    /// `deadline_ms` or `max_age_ms`: a stage that cuts a batch after it does
    /// not compute the event (`deadline_exceeded`). A replay clears it.
    pub deadline_ms: Option<i64>,
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
    pub deadline_ms: Option<i64>,
}

impl Header {
    /// The header of one event of a record that carries several (a step of
    /// a series): this one's trace, time and attempt, under `event_id`.
    pub fn of_event(&self, event_id: &str) -> Self {
        Self { event_id: event_id.to_string(), ..self.clone() }
    }
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
            deadline_ms: None,
            payload,
        }
    }

    /// The header and the payload, to turn the payload into the next one.
    pub fn into_parts(self) -> (Header, Payload) {
        let Self { event_id, traceparent, requested_at_ms, updated_at_ms: _, attempt, deadline_ms, payload } = self;
        (Header { event_id, traceparent, requested_at_ms, attempt, deadline_ms }, payload)
    }

    /// The envelope of `payload` under `header`, written now.
    pub fn from_parts(header: &Header, payload: Payload) -> Self {
        Self {
            event_id: header.event_id.clone(),
            traceparent: header.traceparent.clone(),
            requested_at_ms: header.requested_at_ms,
            updated_at_ms: crate::now_ms(),
            attempt: header.attempt,
            deadline_ms: header.deadline_ms,
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
    /// Raw history of several steps of a backfill, from the fetcher.
    FetchedSeries(StockSeries),
    /// z-scored history of several steps of a backfill, from the normalizer.
    NormalizedSeries(StockSeries),
}

impl Payload {
    /// The kind of event it is on its way to answer: `stock` or `query`.
    pub fn event_kind(&self) -> &'static str {
        match self {
            Self::Query(_) | Self::Tokens(_) | Self::Intent(_) => "query",
            Self::Fetched(_)
            | Self::Normalized(_)
            | Self::Prediction(_)
            | Self::FetchedSeries(_)
            | Self::NormalizedSeries(_) => "stock",
        }
    }

    /// A short name for logs and dead-letter details.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Fetched(_) => "fetched",
            Self::Normalized(_) => "normalized",
            Self::Query(_) => "query",
            Self::Prediction(_) => "prediction",
            Self::Tokens(_) => "tokens",
            Self::Intent(_) => "intent",
            Self::FetchedSeries(_) => "fetched_series",
            Self::NormalizedSeries(_) => "normalized_series",
        }
    }
}

/// A history window: `rows` days x `cols` features, row-major, oldest day first.
#[derive(Debug, Clone, PartialEq)]
pub struct StockWindow {
    pub symbol: String,
    pub as_of: NaiveDate,
    pub rows: u32,
    pub cols: u32,
    /// The number format the values travel in. In memory they are always
    /// `f32`, already rounded to that format ([`WindowPrecision::round`]), so
    /// a window reads back equal to what was written.
    pub precision: WindowPrecision,
    pub values: Vec<f32>,
}

impl StockWindow {
    /// A window whose values travel as `f32`.
    pub fn new(symbol: &str, as_of: NaiveDate, rows: u32, cols: u32, values: Vec<f32>) -> Self {
        Self { symbol: symbol.to_string(), as_of, rows, cols, precision: WindowPrecision::Fp32, values }
    }
}

/// Several steps of one backfill with their history carried once: a step's
/// window is the `window` rows of `history` that end at its `end_row`. A
/// backfill steps every `stride` trading days over windows of 30, so its
/// windows share `1 - stride / 30` of their rows; carried one by one, each
/// row crossed the broker up to `30 / stride` times. The fetcher sends one
/// where steps overlap, and the inferrer forms the windows where the model
/// needs them. Each step is its own event, under its own `event_id`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StockSeries {
    /// Consecutive days of history, oldest first; `as_of` is its last day.
    pub history: StockWindow,
    /// Rows per step's window.
    pub window: u32,
    /// Oldest first.
    pub steps: Vec<SeriesStep>,
}

/// One step of a [`StockSeries`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SeriesStep {
    pub event_id: String,
    pub as_of: NaiveDate,
    /// The history row of `as_of`: the last row of the step's window.
    pub end_row: u32,
}

impl StockSeries {
    /// The values of `step`'s window, if the series holds all of its rows.
    pub fn step_values(&self, step: &SeriesStep) -> Option<&[f32]> {
        let (cols, window) = (self.history.cols as usize, self.window as usize);
        let end = (step.end_row as usize + 1).checked_mul(cols)?;
        let start = end.checked_sub(window * cols)?;
        self.history.values.get(start..end)
    }

    /// `step`'s window on its own, as it would travel without the series.
    pub fn step_window(&self, step: &SeriesStep) -> Option<StockWindow> {
        let values = self.step_values(step)?.to_vec();
        let h = &self.history;
        Some(StockWindow {
            symbol: h.symbol.clone(),
            as_of: step.as_of,
            precision: h.precision,
            rows: self.window,
            cols: h.cols,
            values,
        })
    }
}

/// The number format a window's values travel in between stages.
///
/// `bf16` and `fp16` halve a window's bytes through the broker. Rounding is to
/// nearest, ties to even, as libtorch converts `float32`, so a model that
/// computes in that precision gets the very inputs it would have made of the
/// `f32` window itself (in fp16 autocast: the operations it runs in half
/// precision do; those it keeps in float32 see the rounded values).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowPrecision {
    #[default]
    Fp32,
    Bf16,
    Fp16,
}

impl WindowPrecision {
    /// Bytes per value on the wire.
    pub fn width(self) -> usize {
        match self {
            Self::Fp32 => 4,
            Self::Bf16 | Self::Fp16 => 2,
        }
    }

    /// Rounds `values` in place to what this format holds.
    pub fn round(self, values: &mut [f32]) {
        match self {
            Self::Fp32 => {}
            Self::Bf16 => values.iter_mut().for_each(|v| *v = half::bf16::from_f32(*v).to_f32()),
            Self::Fp16 => values.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32()),
        }
    }

    fn encode(self, values: &[f32]) -> Vec<u8> {
        match self {
            Self::Fp32 => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
            Self::Bf16 => values.iter().flat_map(|v| half::bf16::from_f32(*v).to_le_bytes()).collect(),
            Self::Fp16 => values.iter().flat_map(|v| half::f16::from_f32(*v).to_le_bytes()).collect(),
        }
    }

    fn decode(self, bytes: &[u8]) -> Option<Vec<f32>> {
        if !bytes.len().is_multiple_of(self.width()) {
            return None;
        }
        Some(match self {
            Self::Fp32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Self::Bf16 => bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            Self::Fp16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
        })
    }
}

/// A window's values travel as one byte string in its precision rather than
/// a sequence of floats: bincode writes and reads a sequence element by
/// element, which cost about 5 µs to encode and 7 µs to decode a 30 × 105
/// window, four times per event; bytes are a copy each way.
mod wire {
    use chrono::NaiveDate;
    use serde::de::{Error, Visitor};
    use serde::{Deserialize, Deserializer, Serialize, Serializer};

    use super::{StockWindow, WindowPrecision};

    #[derive(Serialize)]
    struct Written<'a> {
        symbol: &'a str,
        as_of: NaiveDate,
        rows: u32,
        cols: u32,
        precision: WindowPrecision,
        values: Encoded,
    }

    #[derive(Deserialize)]
    struct Read<'a> {
        symbol: String,
        as_of: NaiveDate,
        rows: u32,
        cols: u32,
        precision: WindowPrecision,
        #[serde(borrow)]
        values: Bytes<'a>,
    }

    struct Encoded(Vec<u8>);

    impl Serialize for Encoded {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            serializer.serialize_bytes(&self.0)
        }
    }

    /// The values' bytes as read: borrowed from the record where the decoder
    /// allows it (ours does), so that they are converted to `f32` straight
    /// from the record, without a copy first (about 1 µs a window).
    enum Bytes<'a> {
        Borrowed(&'a [u8]),
        Owned(Vec<u8>),
    }

    impl Bytes<'_> {
        fn as_slice(&self) -> &[u8] {
            match self {
                Self::Borrowed(bytes) => bytes,
                Self::Owned(bytes) => bytes,
            }
        }
    }

    impl<'de: 'a, 'a> Deserialize<'de> for Bytes<'a> {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            deserializer.deserialize_bytes(BytesVisitor(std::marker::PhantomData))
        }
    }

    struct BytesVisitor<'a>(std::marker::PhantomData<&'a ()>);

    impl<'de: 'a, 'a> Visitor<'de> for BytesVisitor<'a> {
        type Value = Bytes<'a>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("window values as little-endian bytes")
        }

        fn visit_borrowed_bytes<E: Error>(self, bytes: &'de [u8]) -> Result<Bytes<'a>, E> {
            Ok(Bytes::Borrowed(bytes))
        }

        fn visit_bytes<E: Error>(self, bytes: &[u8]) -> Result<Bytes<'a>, E> {
            Ok(Bytes::Owned(bytes.to_vec()))
        }
    }

    impl Serialize for StockWindow {
        fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
            Written {
                symbol: &self.symbol,
                as_of: self.as_of,
                rows: self.rows,
                cols: self.cols,
                precision: self.precision,
                values: Encoded(self.precision.encode(&self.values)),
            }
            .serialize(serializer)
        }
    }

    impl<'de> Deserialize<'de> for StockWindow {
        fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
            let Read { symbol, as_of, rows, cols, precision, values } = Read::deserialize(deserializer)?;
            let bytes = values.as_slice();
            let values = precision.decode(bytes).ok_or_else(|| {
                D::Error::invalid_length(bytes.len(), &format!("a multiple of {} bytes", precision.width()).as_str())
            })?;
            Ok(StockWindow { symbol, as_of, rows, cols, precision, values })
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
