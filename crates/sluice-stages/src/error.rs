use chrono::NaiveDate;
use sluice_messages::MessageError;
use sluice_messages::dead_letter::Reason;
use sluice_model::ModelError;
use thiserror::Error;

/// Why a stage could not process an event (poison: dead letter) or a batch.
#[derive(Debug, Clone, Error, PartialEq)]
pub enum StageError {
    /// The input could not be read (bad JSON, bad envelope, bad field).
    #[error(transparent)]
    Message(#[from] MessageError),
    /// A request larger than `fetcher.max_request_bytes`, refused unread.
    #[error("the request is {bytes} bytes; at most {max} are accepted (fetcher.max_request_bytes)")]
    RequestTooLarge { bytes: usize, max: usize },
    /// The history source has no such symbol.
    #[error("unknown symbol {0}")]
    UnknownSymbol(String),
    /// Fewer trading days of history than the model's window.
    #[error("{symbol} has {have} trading days of history up to {as_of}; the model needs {need}")]
    InsufficientHistory { symbol: String, as_of: NaiveDate, have: usize, need: usize },
    /// A window (inline or fetched) of the wrong shape.
    #[error("window is {rows} x {cols}; the model needs {want_rows} x {want_cols}")]
    WindowShape { rows: usize, cols: usize, want_rows: usize, want_cols: usize },
    /// One day of stored history whose features are not the model's number.
    #[error("{symbol}'s history row of {date} holds {bytes} bytes ({} features); the model needs {want} features", .bytes / 4)]
    HistoryRow { symbol: String, date: NaiveDate, bytes: usize, want: usize },
    /// A window rounded to a lower precision than the model computes in.
    #[error(
        "the window travelled in {input}, the model computes in {model}; set inferrer.model.accept_lossy_inputs = true to serve it"
    )]
    LossyInput { input: String, model: String },
    /// NaN or infinity in the input (or produced by normalising it).
    #[error("non-finite {what} at day {day}, feature {feature}")]
    NonFiniteInput { what: &'static str, day: usize, feature: usize },
    /// NaN or infinity in the model's answer.
    #[error("the model returned a non-finite {output} ({value})")]
    NonFinitePrediction { output: String, value: f32 },
    /// An answer outside the range its output declares (`metadata.json`).
    #[error("the model returned {output} = {value}, outside its declared range {min}..={max}")]
    OutOfRange { output: String, value: f32, min: f32, max: f32 },
    /// A query with nothing but white space.
    #[error("the query text is empty")]
    EmptyText,
    /// A query longer than `normalizer.max_query_bytes`.
    #[error("the query text is {bytes} bytes; at most {max} are accepted")]
    TextTooLong { bytes: usize, max: usize },
    /// A token sequence the query model cannot take.
    #[error("{got} tokens; the query model takes 1 to {max}")]
    TokenCount { got: usize, max: usize },
    /// An event kind this deployment does not process yet.
    #[error("{kind} events are not served by this deployment: {why}")]
    UnsupportedKind { kind: &'static str, why: &'static str },
    /// An envelope with a payload this stage does not take.
    #[error("expected a {expected} payload, got {got}")]
    UnexpectedPayload { expected: &'static str, got: &'static str },
    /// The model failed (the whole batch).
    #[error(transparent)]
    Model(#[from] ModelError),
    /// Past its deadline when its batch was cut: not computed.
    #[error("{late_ms} ms past {by} when its batch was cut: not computed (a replay computes it)")]
    DeadlineExceeded { late_ms: i64, by: &'static str },
    /// A sink refuses this row and would refuse it again (bad data).
    #[error("{sink} refused the row: {message}")]
    SinkRefused { sink: &'static str, message: String },
}

impl StageError {
    /// The bounded dead-letter reason (also a metric label).
    pub fn reason(&self) -> Reason {
        match self {
            Self::Message(e) => e.reason(),
            Self::RequestTooLarge { .. } => Reason::RequestTooLarge,
            Self::UnknownSymbol(_) => Reason::UnknownSymbol,
            Self::InsufficientHistory { .. } => Reason::InsufficientHistory,
            Self::WindowShape { .. } | Self::HistoryRow { .. } => Reason::InvalidWindowShape,
            Self::LossyInput { .. } => Reason::LossyInput,
            Self::NonFiniteInput { .. } => Reason::NonFiniteInput,
            Self::NonFinitePrediction { .. } => Reason::NonFinitePrediction,
            Self::OutOfRange { .. } => Reason::PredictionOutOfRange,
            Self::UnsupportedKind { .. } => Reason::UnsupportedKind,
            Self::EmptyText => Reason::EmptyText,
            Self::TokenCount { .. } => Reason::InvalidTokenCount,
            Self::TextTooLong { .. } => Reason::TextTooLong,
            Self::UnexpectedPayload { .. } => Reason::UnexpectedPayload,
            Self::Model(_) => Reason::ModelError,
            Self::SinkRefused { .. } => Reason::SinkRefused,
            Self::DeadlineExceeded { .. } => Reason::DeadlineExceeded,
        }
    }
}
