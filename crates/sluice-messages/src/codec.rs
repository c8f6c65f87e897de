//! The envelope's byte format, in one place.
//!
//! `[MAGIC, version]` followed by the bincode 2 (standard config) encoding of
//! [`Envelope`]. The version byte comes first so that a reader can refuse a
//! format it does not know before trying to decode it. bincode is
//! unmaintained (its 3.0 release is empty); 2.0.1 is stable, and nothing outside
//! this module knows it is used, so a successor (wincode, postcard) can replace
//! it here alone (docs/decisions.md).

use crate::MessageError;
use crate::envelope::{ENVELOPE_VERSION, Envelope};

/// First byte of every envelope: tells ours apart from stray JSON or garbage.
pub const MAGIC: u8 = 0xE5;
/// Upper bound on what a decoder will allocate for one envelope, so that a
/// corrupt length prefix cannot ask for gigabytes.
pub const MAX_ENVELOPE_BYTES: usize = 16 * 1024 * 1024;

fn config() -> impl bincode::config::Config {
    bincode::config::standard().with_limit::<MAX_ENVELOPE_BYTES>()
}

/// Encodes an envelope. Cannot fail for our types; a failure is a bug.
pub fn encode(envelope: &Envelope) -> Vec<u8> {
    let mut out = Vec::with_capacity(64 + approx_payload_len(envelope));
    out.push(MAGIC);
    out.push(ENVELOPE_VERSION);
    bincode::serde::encode_into_std_write(envelope, &mut out, config())
        .expect("an Envelope always encodes: it holds only strings, numbers and vectors");
    out
}

/// Decodes an envelope, refusing unknown versions and corrupt bytes.
pub fn decode(bytes: &[u8]) -> Result<Envelope, MessageError> {
    match bytes {
        [MAGIC, ENVELOPE_VERSION, body @ ..] => {
            let (envelope, used) = bincode::serde::decode_from_slice(body, config())
                .map_err(|e| MessageError::Undecodable(e.to_string()))?;
            if used != body.len() {
                return Err(MessageError::Undecodable(format!("{} trailing bytes", body.len() - used)));
            }
            Ok(envelope)
        }
        [MAGIC, version, ..] => Err(MessageError::UnknownEnvelopeVersion(*version)),
        _ => Err(MessageError::Undecodable("not a Sluice envelope (bad magic byte)".into())),
    }
}

fn approx_payload_len(envelope: &Envelope) -> usize {
    use crate::envelope::Payload;
    match &envelope.payload {
        Payload::Fetched(w) | Payload::Normalized(w) => w.values.len() * w.precision.width(),
        Payload::Query(q) => q.text.len(),
        Payload::Prediction(_) => 64,
        Payload::Tokens(t) => t.text.len() + t.ids.len() * 4,
        Payload::Intent(i) => i.text.len() + 64 * (1 + i.top.len()),
        Payload::FetchedSeries(s) | Payload::NormalizedSeries(s) => {
            s.history.values.len() * s.history.precision.width()
                + s.steps.iter().map(|s| 16 + s.event_id.len()).sum::<usize>()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Payload, StockWindow, WindowPrecision};
    use chrono::NaiveDate;

    fn sample() -> Envelope {
        Envelope {
            event_id: "e-1".into(),
            traceparent: Some("00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01".into()),
            requested_at_ms: 1,
            updated_at_ms: 2,
            attempt: 0,
            deadline_ms: None,
            payload: Payload::Fetched(StockWindow::new(
                "AAPL",
                NaiveDate::from_ymd_opt(2024, 1, 2).expect("date"),
                2,
                2,
                vec![1.0, -2.5, f32::MAX, 0.0],
            )),
        }
    }

    #[test]
    fn a_window_in_half_precision_travels_in_half_the_bytes() {
        let mut envelope = sample();
        let Payload::Fetched(window) = &mut envelope.payload else { unreachable!() };
        window.values = (0..3150).map(|i| i as f32 / 7.0).collect();
        let full = encode(&envelope).len();
        for precision in [WindowPrecision::Bf16, WindowPrecision::Fp16] {
            let mut half = envelope.clone();
            let Payload::Fetched(window) = &mut half.payload else { unreachable!() };
            window.precision = precision;
            precision.round(&mut window.values);
            let bytes = encode(&half);
            assert!(bytes.len() < full / 2 + 100, "{precision:?}: {} bytes against {full}", bytes.len());
            assert_eq!(decode(&bytes), Ok(half), "{precision:?} reads back as written");
        }
    }

    #[test]
    fn round_trips() {
        let envelope = sample();
        assert_eq!(decode(&encode(&envelope)), Ok(envelope));
    }

    #[test]
    fn window_values_travel_as_bytes() {
        let mut envelope = sample();
        let Payload::Fetched(window) = &mut envelope.payload else { unreachable!() };
        window.values = (0..3150).map(|i| i as f32 * -0.37).chain([f32::INFINITY, f32::MIN_POSITIVE]).collect();
        let bytes = encode(&envelope);
        assert!(bytes.len() < 3152 * 4 + 128, "{} bytes", bytes.len());
        assert_eq!(decode(&bytes), Ok(envelope));
        // The values are last: a byte length that is not a multiple of 4 is
        // refused, not rounded.
        let mut bytes = encode(&sample());
        let prefix = bytes.len() - 17;
        assert_eq!(bytes[prefix], 16);
        bytes[prefix] = 15;
        bytes.pop();
        assert!(matches!(decode(&bytes), Err(MessageError::Undecodable(_))), "{:?}", decode(&bytes));
    }

    #[test]
    fn refuses_unknown_versions() {
        let mut bytes = encode(&sample());
        bytes[1] = ENVELOPE_VERSION + 1;
        assert_eq!(decode(&bytes), Err(MessageError::UnknownEnvelopeVersion(ENVELOPE_VERSION + 1)));
    }

    #[test]
    fn refuses_garbage_without_panicking() {
        let good = encode(&sample());
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "a prefix of {cut} bytes decoded");
        }
        assert!(decode(br#"{"kind":"stock"}"#).is_err());
        let mut huge = vec![MAGIC, ENVELOPE_VERSION];
        huge.extend([0xFF; 32]);
        assert!(decode(&huge).is_err());
        let mut trailing = good;
        trailing.push(0);
        assert!(matches!(decode(&trailing), Err(MessageError::Undecodable(_))));
    }
}
