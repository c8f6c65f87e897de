use thiserror::Error;

use crate::dead_letter::Reason;

/// Why a message could not be read. Every variant is poison (retrying the same
/// bytes gives the same answer): it goes to the dead-letter topic under
/// [`MessageError::reason`].
#[derive(Debug, Clone, Error, PartialEq)]
pub enum MessageError {
    /// The bytes are not JSON at all.
    #[error("malformed JSON: {0}")]
    MalformedJson(String),
    /// Bytes that are not UTF-8 (JSON must be): nothing in them can be trusted.
    #[error("invalid UTF-8 at byte {0}")]
    InvalidUtf8(usize),
    /// JSON, but not one of our events: missing field, wrong type, unknown kind.
    #[error("not a valid event: {0}")]
    InvalidEvent(String),
    /// A field that parsed but breaks a rule (length, characters, shape).
    #[error("invalid field `{field}`: {reason}")]
    InvalidField { field: &'static str, reason: String },
    /// An envelope from a newer (or unknown) Sluice.
    #[error("unknown envelope version {0} (this build reads version {current})", current = crate::envelope::ENVELOPE_VERSION)]
    UnknownEnvelopeVersion(u8),
    /// Bytes that are not an envelope, or a truncated or corrupt one.
    #[error("undecodable envelope: {0}")]
    Undecodable(String),
}

impl MessageError {
    /// The bounded dead-letter reason (also a metric label).
    pub fn reason(&self) -> Reason {
        match self {
            Self::MalformedJson(_) => Reason::MalformedJson,
            Self::InvalidUtf8(_) => Reason::InvalidUtf8,
            Self::InvalidEvent(_) => Reason::InvalidEvent,
            Self::InvalidField { .. } => Reason::InvalidField,
            Self::UnknownEnvelopeVersion(_) => Reason::UnknownEnvelopeVersion,
            Self::Undecodable(_) => Reason::UndecodableEnvelope,
        }
    }
}
