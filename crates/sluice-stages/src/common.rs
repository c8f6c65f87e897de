//! Helpers every stage uses: decoding an input, encoding an output.

use std::sync::Arc;

use sluice_core::{Incoming, Output};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Header, Payload};

use crate::StageError;

/// A dead letter for input `source`.
pub(crate) fn dead_letter(source: usize, error: &StageError, event_id: Option<String>) -> Output {
    Output::DeadLetter { source, reason: error.reason(), detail: error.to_string(), event_id, original: None }
}

/// A dead letter for one event of input `source` that carries several (a
/// step of a backfill's series), keeping `original`, the event's own
/// envelope, to replay instead of the whole input.
pub(crate) fn dead_letter_of(source: usize, error: &StageError, header: &Header, original: Option<Payload>) -> Output {
    let original = original.map(|payload| codec::encode(&Envelope::from_parts(header, payload)));
    Output::DeadLetter {
        source,
        reason: error.reason(),
        detail: error.to_string(),
        event_id: Some(header.event_id.clone()),
        original,
    }
}

/// Decodes input `source`'s envelope, or returns its dead letter.
pub(crate) fn decode(source: usize, input: &Incoming) -> Result<Envelope, Output> {
    codec::decode(&input.payload).map_err(|e| dead_letter(source, &StageError::from(e), None))
}

/// Input `source`'s header and payload, or `None` with its dead letter pushed
/// onto `outputs`.
pub(crate) fn decode_or_dead(source: usize, input: &Incoming, outputs: &mut Vec<Output>) -> Option<(Header, Payload)> {
    match decode(source, input) {
        Ok(envelope) => Some(envelope.into_parts()),
        Err(dead) => {
            outputs.push(dead);
            None
        }
    }
}

/// Sends `payload` under `header` to `topic`, keyed like the input (or by
/// event id when the input had no key).
pub(crate) fn forward(source: usize, input: &Incoming, topic: &Arc<str>, header: &Header, payload: Payload) -> Output {
    send(source, input, topic, &Envelope::from_parts(header, payload))
}

/// Sends a record that carries several events (a backfill's series) keyed
/// like the input, or with no key where the input had none: each event's
/// answer is then keyed by its own id, as [`forward`] keys one alone.
pub(crate) fn forward_several(
    source: usize,
    input: &Incoming,
    topic: &Arc<str>,
    header: &Header,
    payload: Payload,
) -> Output {
    let payload = codec::encode(&Envelope::from_parts(header, payload));
    Output::Send { source, topic: topic.clone(), key: input.key.clone(), payload }
}

/// Addresses an encoded envelope to `topic`.
pub(crate) fn send(source: usize, input: &Incoming, topic: &Arc<str>, envelope: &Envelope) -> Output {
    let key = input.key.clone().unwrap_or_else(|| envelope.event_id.as_bytes().to_vec());
    Output::Send { source, topic: topic.clone(), key: Some(key), payload: codec::encode(envelope) }
}
