//! Helpers every stage uses: decoding an input, encoding an output.

use std::sync::Arc;

use sluice_core::{Incoming, Output};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Header, Payload};

use crate::{StageError, telemetry};

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
/// onto `outputs`: undecodable, or past its deadline in a batch cut at `cut`
/// (not computed, counted for `stage`).
pub(crate) fn decode_or_dead(
    source: usize,
    input: &Incoming,
    outputs: &mut Vec<Output>,
    stage: &'static str,
    cut: Cut,
) -> Option<(Header, Payload)> {
    let (header, payload) = match decode(source, input) {
        Ok(envelope) => envelope.into_parts(),
        Err(dead) => {
            outputs.push(dead);
            return None;
        }
    };
    if let Some(late) = cut.late(&header) {
        outputs.push(too_late(source, &late, stage, payload.event_kind(), header.event_id));
        return None;
    }
    Some((header, payload))
}

/// The dead letter of input `source`, an event of `kind` past its deadline
/// (not computed), counted for `stage`.
pub(crate) fn too_late(
    source: usize,
    late: &StageError,
    stage: &'static str,
    kind: &'static str,
    event_id: String,
) -> Output {
    telemetry::deadline_exceeded(stage, kind);
    dead_letter(source, late, Some(event_id))
}

/// When a batch was cut, and what makes an event in it too late to compute.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Cut {
    pub now_ms: i64,
    /// A model stage's live `max_age_ms` (0: none), counted from the request
    /// on an event's first pass: a replay is computed whatever its age.
    pub max_age_ms: u64,
}

impl Cut {
    /// A batch cut now; `max_age_ms` as in [`Cut::max_age_ms`].
    pub(crate) fn now(max_age_ms: u64) -> Self {
        Self { now_ms: sluice_messages::now_ms(), max_age_ms }
    }

    /// Why `header`'s event is not to be computed, if it is past its deadline.
    pub(crate) fn late(&self, header: &Header) -> Option<StageError> {
        if let Some(deadline) = header.deadline_ms
            && self.now_ms > deadline
        {
            return Some(StageError::DeadlineExceeded {
                late_ms: self.now_ms - deadline,
                by: "the request's deadline",
            });
        }
        let aged = header.requested_at_ms.saturating_add(self.max_age_ms as i64);
        if self.max_age_ms > 0 && header.attempt == 0 && self.now_ms > aged {
            return Some(StageError::DeadlineExceeded { late_ms: self.now_ms - aged, by: "the model's max_age_ms" });
        }
        None
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
