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
