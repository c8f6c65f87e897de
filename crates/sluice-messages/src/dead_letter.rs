//! Dead letters: events a stage could not process, with the reason and where
//! they came from, so that nothing is lost and each can be replayed after a fix.

use base64::Engine;
use serde::{Deserialize, Serialize};

/// One record on the dead-letter topic (JSON; schema in
/// `schemas/dead_letter.schema.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// The stage that refused the event (`fetcher`, `normalizer`, ...).
    pub stage: String,
    /// A bounded, machine-readable reason, e.g. `insufficient_history`.
    pub reason: String,
    /// A human-readable explanation.
    pub detail: String,
    /// Where the refused message was read.
    pub source: SourceCoordinates,
    /// The event id, when it could be read.
    pub event_id: Option<String>,
    /// The original message key (UTF-8, lossy), if any.
    pub key: Option<String>,
    /// The original message value, base64 (standard alphabet, padded); only
    /// its first 64 KiB when `payload_truncated`.
    pub payload_base64: String,
    /// Size of the original message value.
    pub payload_bytes: u64,
    /// Whether `payload_base64` holds only the start of the original value.
    pub payload_truncated: bool,
    pub dead_at_ms: i64,
}

/// Why an event is a dead letter: a bounded set, so that a typo does not
/// compile, and each is also a metric label. `docs/instrumentation.md` lists
/// them with the stages that give them (a unit test of sluice-stages checks
/// the list against this enum).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Reason {
    /// A request over `fetcher.max_request_bytes`.
    RequestTooLarge,
    MalformedJson,
    InvalidUtf8,
    InvalidEvent,
    InvalidField,
    UnknownSymbol,
    InsufficientHistory,
    InvalidWindowShape,
    /// A window in a lower precision than the model computes in.
    LossyInput,
    NonFiniteInput,
    EmptyText,
    TextTooLong,
    InvalidTokenCount,
    UnsupportedKind,
    UnexpectedPayload,
    UnknownEnvelopeVersion,
    UndecodableEnvelope,
    ModelError,
    NonFinitePrediction,
    PredictionOutOfRange,
    SinkRefused,
    /// An output larger than the producer may publish (the runtime's own).
    OutputTooLarge,
    /// An event whose deadline had passed when its batch was cut: not computed.
    DeadlineExceeded,
}

impl Reason {
    /// Every reason, in the order of the documentation's table.
    pub const ALL: [Self; 23] = [
        Self::RequestTooLarge,
        Self::MalformedJson,
        Self::InvalidUtf8,
        Self::InvalidEvent,
        Self::InvalidField,
        Self::UnknownSymbol,
        Self::InsufficientHistory,
        Self::InvalidWindowShape,
        Self::LossyInput,
        Self::NonFiniteInput,
        Self::EmptyText,
        Self::TextTooLong,
        Self::InvalidTokenCount,
        Self::UnsupportedKind,
        Self::UnexpectedPayload,
        Self::UnknownEnvelopeVersion,
        Self::UndecodableEnvelope,
        Self::ModelError,
        Self::NonFinitePrediction,
        Self::PredictionOutOfRange,
        Self::SinkRefused,
        Self::OutputTooLarge,
        Self::DeadlineExceeded,
    ];

    /// The name in dead letters and metric labels (snake_case).
    pub const fn as_str(self) -> &'static str {
        match self {
            Self::RequestTooLarge => "request_too_large",
            Self::MalformedJson => "malformed_json",
            Self::InvalidUtf8 => "invalid_utf8",
            Self::InvalidEvent => "invalid_event",
            Self::InvalidField => "invalid_field",
            Self::UnknownSymbol => "unknown_symbol",
            Self::InsufficientHistory => "insufficient_history",
            Self::InvalidWindowShape => "invalid_window_shape",
            Self::LossyInput => "lossy_input",
            Self::NonFiniteInput => "non_finite_input",
            Self::EmptyText => "empty_text",
            Self::TextTooLong => "text_too_long",
            Self::InvalidTokenCount => "invalid_token_count",
            Self::UnsupportedKind => "unsupported_kind",
            Self::UnexpectedPayload => "unexpected_payload",
            Self::UnknownEnvelopeVersion => "unknown_envelope_version",
            Self::UndecodableEnvelope => "undecodable_envelope",
            Self::ModelError => "model_error",
            Self::NonFinitePrediction => "non_finite_prediction",
            Self::PredictionOutOfRange => "prediction_out_of_range",
            Self::SinkRefused => "sink_refused",
            Self::OutputTooLarge => "output_too_large",
            Self::DeadlineExceeded => "deadline_exceeded",
        }
    }

    /// The reason named `name`, if there is one.
    pub fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == name)
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl PartialEq<&str> for Reason {
    fn eq(&self, other: &&str) -> bool {
        self.as_str() == *other
    }
}

impl PartialEq<Reason> for &str {
    fn eq(&self, other: &Reason) -> bool {
        *self == other.as_str()
    }
}

/// Topic, partition and offset of a message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SourceCoordinates {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
}

impl DeadLetter {
    /// The original payload bytes.
    pub fn payload(&self) -> Result<Vec<u8>, base64::DecodeError> {
        base64::engine::general_purpose::STANDARD.decode(&self.payload_base64)
    }

    /// Encodes original bytes for [`DeadLetter::payload_base64`].
    pub fn encode_payload(bytes: &[u8]) -> String {
        base64::engine::general_purpose::STANDARD.encode(bytes)
    }
}
