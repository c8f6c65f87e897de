//! Synthetic request events for the demo, `sluice produce --synthetic` and the
//! tests: valid stock events for the synthetic source's symbols, with a chosen
//! share of invalid ones of every kind, and banking text queries, each
//! labelled with what the pipeline must make of it.

use chrono::{Datelike, Days, NaiveDate, Weekday};

use crate::fetcher::SyntheticSource;

/// What the pipeline must do with a generated event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Expected {
    /// One prediction, for `symbol` as of `as_of`.
    Prediction { symbol: String, as_of: NaiveDate },
    /// A dead letter with this reason.
    DeadLetter { reason: &'static str },
    /// One intent for this query text.
    Intent { text: String },
}

/// One generated event: its id, its JSON, and the expected outcome.
#[derive(Debug, Clone)]
pub struct GeneratedEvent {
    pub event_id: String,
    pub json: Vec<u8>,
    pub expected: Expected,
}

/// Generates `count` events named `{prefix}-{i}`. Every `invalid_every`-th
/// event (0: none) is invalid, cycling through the kinds of invalid input.
pub fn generate(prefix: &str, count: usize, invalid_every: usize, universe: usize) -> Vec<GeneratedEvent> {
    (0..count).map(|i| event(prefix, i, invalid_every, universe.max(1))).collect()
}

/// A weekday in 2024 that depends on `i`, so that events spread over dates.
/// 199 days against 5,000 symbols: (symbol, date) pairs repeat only every
/// 40,000 events or so, so that generated streams are not cache hits.
fn as_of(i: usize) -> NaiveDate {
    let start = NaiveDate::from_ymd_opt(2024, 3, 1).expect("a valid date");
    let mut day = start.checked_add_days(Days::new((i % 199) as u64)).expect("in range");
    while matches!(day.weekday(), Weekday::Sat | Weekday::Sun) {
        day = day.pred_opt().expect("in range");
    }
    day
}

fn event(prefix: &str, i: usize, invalid_every: usize, universe: usize) -> GeneratedEvent {
    let event_id = format!("{prefix}-{i:07}");
    let symbol = SyntheticSource::symbol(i % universe);
    let date = as_of(i);
    let invalid = invalid_every > 0 && i % invalid_every == invalid_every - 1;
    let (json, expected) = if invalid {
        invalid_event(&event_id, &symbol, date, i / invalid_every)
    } else {
        (
            format!(r#"{{"kind":"stock","event_id":"{event_id}","symbol":"{symbol}","as_of":"{date}"}}"#),
            Expected::Prediction { symbol, as_of: date },
        )
    };
    GeneratedEvent { event_id, json: json.into_bytes(), expected }
}

/// The kinds of invalid input, in turn.
fn invalid_event(id: &str, symbol: &str, date: NaiveDate, n: usize) -> (String, Expected) {
    let dead = |reason| Expected::DeadLetter { reason };
    match n % 8 {
        0 => (format!(r#"{{"kind":"stock","event_id":"{id}","symbol":"{symbol}","as_of":"#), dead("malformed_json")),
        1 => (format!(r#"{{"kind":"stock","event_id":"{id}","as_of":"{date}"}}"#), dead("invalid_event")),
        2 => (
            format!(r#"{{"kind":"stock","event_id":"{id}","symbol":"ZZZZ","as_of":"{date}"}}"#),
            dead("unknown_symbol"),
        ),
        3 => (
            format!(r#"{{"kind":"stock","event_id":"{id}","symbol":"{symbol}","as_of":"2020-01-10"}}"#),
            dead("insufficient_history"),
        ),
        4 => (
            format!(r#"{{"kind":"stock","event_id":"{id}","symbol":"{symbol}; rm -rf /","as_of":"{date}"}}"#),
            dead("invalid_field"),
        ),
        5 => (
            format!(
                r#"{{"kind":"stock","event_id":"{id}","symbol":"{symbol}","as_of":"{date}","window":[[1.0,2.0]]}}"#
            ),
            dead("invalid_window_shape"),
        ),
        6 => {
            // 1e300 is a valid JSON number but no f32: the normalizer refuses it.
            let row = format!("[{}]", vec!["1e300"; 105].join(","));
            let window = format!("[{}]", vec![row; 30].join(","));
            (
                format!(
                    r#"{{"kind":"stock","event_id":"{id}","symbol":"{symbol}","as_of":"{date}","window":{window}}}"#
                ),
                dead("non_finite_input"),
            )
        }
        _ => {
            // Over the normalizer's default max_query_bytes (4096).
            let text = "please tell me my balance ".repeat(200);
            (format!(r#"{{"kind":"query","event_id":"{id}","text":"{text}"}}"#), dead("text_too_long"))
        }
    }
}

/// Banking questions in several wordings, for query events.
const QUERIES: [&str; 12] = [
    "what is my current account balance",
    "send 200 euros to my landlord",
    "I would like to apply for a personal loan",
    "I lost my debit card yesterday",
    "please freeze my credit card right now",
    "how do I change the PIN of my card",
    "I want to open a savings account",
    "close my checking account please",
    "there is a charge on my statement I do not recognise",
    "what are your mortgage rates at the moment",
    "what is the dollar to euro exchange rate today",
    "I moved, please update my home address",
];

/// `count` query events named `{prefix}-q{i}`, cycling through a dozen banking
/// questions: from the thirteenth on, every text is a repeat (a cache hit).
pub fn generate_queries(prefix: &str, count: usize) -> Vec<GeneratedEvent> {
    (0..count)
        .map(|i| {
            let event_id = format!("{prefix}-q{i:07}");
            let text = QUERIES[i % QUERIES.len()].to_string();
            let json = format!(r#"{{"kind":"query","event_id":"{event_id}","text":"{text}"}}"#);
            GeneratedEvent { event_id, json: json.into_bytes(), expected: Expected::Intent { text } }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_messages::events::RequestEvent;

    #[test]
    fn valid_events_parse_and_invalid_ones_cycle_through_the_kinds() {
        let events = generate("t", 160, 10, 50);
        let invalid: Vec<_> = events.iter().filter(|e| matches!(e.expected, Expected::DeadLetter { .. })).collect();
        assert_eq!(invalid.len(), 16);
        let reasons: std::collections::BTreeSet<_> = invalid
            .iter()
            .map(|e| match e.expected {
                Expected::DeadLetter { reason } => reason,
                _ => unreachable!(),
            })
            .collect();
        assert_eq!(reasons.len(), 8, "{reasons:?}");
        for e in events.iter().filter(|e| matches!(e.expected, Expected::Prediction { .. })) {
            let parsed = RequestEvent::from_json(&e.json).expect("valid events parse");
            assert_eq!(parsed.event_id(), e.event_id);
        }
        for e in generate_queries("q", 30) {
            assert!(matches!(RequestEvent::from_json(&e.json).expect("queries parse"), RequestEvent::Query(_)));
        }
        // Events that the fetcher's parser refuses are refused for the stated reason.
        for e in &invalid {
            if let (Err(err), Expected::DeadLetter { reason }) = (RequestEvent::from_json(&e.json), &e.expected) {
                assert_eq!(err.reason(), *reason, "{}", String::from_utf8_lossy(&e.json));
            }
        }
    }
}
