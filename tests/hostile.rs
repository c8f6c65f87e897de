//! Hostile input never panics a stage and always has a reason: property tests
//! feed arbitrary and mutated bytes to the request parser and the envelope
//! decoder (what every stage runs first on what it consumes), and named cases
//! check the reasons for the classic bad inputs.

use chrono::NaiveDate;
use proptest::prelude::*;
use sluice_messages::codec;
use sluice_messages::envelope::{ENVELOPE_VERSION, Envelope, Payload, StockWindow};
use sluice_messages::events::RequestEvent;

fn valid_envelope() -> Vec<u8> {
    codec::encode(&Envelope {
        event_id: "e-1".into(),
        traceparent: None,
        requested_at_ms: 1,
        updated_at_ms: 2,
        attempt: 0,
        deadline_ms: None,
        payload: Payload::Fetched(StockWindow::new(
            "S0001",
            NaiveDate::from_ymd_opt(2024, 5, 31).expect("date"),
            2,
            3,
            vec![0.5, -1.0, 2.0, 3.5, f32::MAX, 0.0],
        )),
    })
}

const VALID_JSON: &str = r#"{"kind":"stock","event_id":"evt-1","symbol":"S0042","as_of":"2024-05-31"}"#;

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn the_request_parser_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = RequestEvent::from_json(&bytes);
    }

    #[test]
    fn the_request_parser_survives_mutated_valid_events(at in 0usize..VALID_JSON.len(), byte in any::<u8>(), cut in 0usize..=VALID_JSON.len()) {
        let mut bytes = VALID_JSON.as_bytes().to_vec();
        bytes[at] = byte;
        let _ = RequestEvent::from_json(&bytes);
        let _ = RequestEvent::from_json(&bytes[..cut]);
    }

    #[test]
    fn the_envelope_decoder_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        let _ = codec::decode(&bytes);
        // The same bytes behind a valid magic byte and version reach bincode.
        let mut framed = vec![codec::MAGIC, ENVELOPE_VERSION];
        framed.extend(&bytes);
        let _ = codec::decode(&framed);
    }

    #[test]
    fn the_envelope_decoder_survives_mutated_valid_envelopes(at in 2usize..60, byte in any::<u8>(), cut in 0usize..80) {
        let mut bytes = valid_envelope();
        let at = at.min(bytes.len() - 1);
        bytes[at] = byte;
        let _ = codec::decode(&bytes);
        let cut = cut.min(bytes.len());
        prop_assert!(codec::decode(&valid_envelope()[..cut]).is_err() || cut == valid_envelope().len());
    }
}

fn reason(json: &str) -> &'static str {
    RequestEvent::from_json(json.as_bytes()).map(|_| "accepted").unwrap_or_else(|e| e.reason().as_str())
}

#[test]
fn classic_bad_requests_are_refused_with_their_reasons() {
    let cases = [
        // SQL and shell metacharacters in a symbol or an id.
        (
            r#"{"kind":"stock","event_id":"e1","symbol":"S1'; DROP TABLE features;--","as_of":"2024-05-31"}"#,
            "invalid_field",
        ),
        (r#"{"kind":"stock","event_id":"e1","symbol":"$(rm -rf /)","as_of":"2024-05-31"}"#, "invalid_field"),
        (r#"{"kind":"stock","event_id":"e1; rm -rf /","symbol":"S0001","as_of":"2024-05-31"}"#, "invalid_field"),
        (r#"{"kind":"stock","event_id":"e1","symbol":"S0001`id`","as_of":"2024-05-31"}"#, "invalid_field"),
        // Wrong types.
        (r#"{"kind":"stock","event_id":42,"symbol":"S0001","as_of":"2024-05-31"}"#, "invalid_event"),
        (r#"{"kind":"stock","event_id":"e1","symbol":["S0001"],"as_of":"2024-05-31"}"#, "invalid_event"),
        (r#"{"kind":"stock","event_id":"e1","symbol":"S0001","as_of":20240531}"#, "invalid_event"),
        (r#"{"kind":"query","event_id":"q1","text":null}"#, "invalid_event"),
        // NaN and Inf are not JSON; huge numbers are (the normalizer refuses them).
        (
            r#"{"kind":"stock","event_id":"e1","symbol":"S0001","as_of":"2024-05-31","window":[[NaN]]}"#,
            "malformed_json",
        ),
        (
            r#"{"kind":"stock","event_id":"e1","symbol":"S0001","as_of":"2024-05-31","window":[[Infinity]]}"#,
            "malformed_json",
        ),
        // Unknown kinds and versions of things.
        (r#"{"kind":"bond","event_id":"e1"}"#, "invalid_event"),
        (r#"[]"#, "invalid_event"),
        ("", "malformed_json"),
        ("\u{feff}{}", "malformed_json"),
    ];
    for (json, want) in cases {
        assert_eq!(reason(json), want, "{json}");
    }
}

#[test]
fn envelopes_from_unknown_versions_and_lying_lengths_are_refused() {
    let mut future = valid_envelope();
    future[1] = 9;
    assert_eq!(codec::decode(&future).expect_err("future").reason(), "unknown_envelope_version");
    // A length prefix that claims far more than the bytes (or the 16 MiB
    // limit) must fail, not allocate.
    let mut lying = vec![codec::MAGIC, ENVELOPE_VERSION, 3, b'e', b'-', b'1', 0];
    lying.extend([0xFF; 16]);
    assert_eq!(codec::decode(&lying).expect_err("lying").reason(), "undecodable_envelope");
}
