//! Helpers every stage uses: decoding an input, encoding an output.

use std::sync::Arc;

use sluice_kafka::{Incoming, Output};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload};

use crate::StageError;

/// A dead letter for input `source`.
pub(crate) fn dead_letter(source: usize, error: &StageError, event_id: Option<String>) -> Output {
    Output::DeadLetter { source, reason: error.reason(), detail: error.to_string(), event_id }
}

/// Decodes input `source`'s envelope, or returns its dead letter.
pub(crate) fn decode(source: usize, input: &Incoming) -> Result<Envelope, Output> {
    codec::decode(&input.payload).map_err(|e| dead_letter(source, &StageError::from(e), None))
}

/// Wraps `payload` in a copy of `envelope`'s headers and addresses it to `topic`,
/// keyed like the input (or by event id when the input had no key).
pub(crate) fn forward(
    source: usize,
    input: &Incoming,
    topic: &Arc<str>,
    envelope: &Envelope,
    payload: Payload,
) -> Output {
    let next = Envelope {
        event_id: envelope.event_id.clone(),
        traceparent: envelope.traceparent.clone(),
        requested_at_ms: envelope.requested_at_ms,
        updated_at_ms: sluice_messages::now_ms(),
        attempt: envelope.attempt,
        payload,
    };
    send(source, input, topic, &next)
}

/// Addresses an encoded envelope to `topic`.
pub(crate) fn send(source: usize, input: &Incoming, topic: &Arc<str>, envelope: &Envelope) -> Output {
    let key = input.key.clone().unwrap_or_else(|| envelope.event_id.as_bytes().to_vec());
    Output::Send { source, topic: topic.clone(), key: Some(key), payload: codec::encode(envelope) }
}
