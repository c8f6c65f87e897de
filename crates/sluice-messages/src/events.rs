//! Request events: the JSON producers publish to the `requests` topic.
//!
//! The JSON Schemas in `schemas/` describe the same rules for producers in other
//! languages; `tests/schemas.rs` keeps the two in step.

use chrono::NaiveDate;
use serde::{Deserialize, Serialize};

use crate::MessageError;

/// Longest accepted event id, in bytes.
pub const MAX_EVENT_ID_LEN: usize = 128;
/// Longest accepted symbol, in bytes.
pub const MAX_SYMBOL_LEN: usize = 16;

/// One event on the `requests` topic; `kind` says which.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum RequestEvent {
    /// Predict this symbol as of this date.
    Stock(StockRequest),
    /// Classify the intent of this text.
    Query(QueryRequest),
}

/// A stock prediction request.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StockRequest {
    pub event_id: String,
    pub symbol: String,
    /// The last trading day of the history window, exactly `YYYY-MM-DD`.
    #[serde(deserialize_with = "strict_date")]
    pub as_of: NaiveDate,
    /// A history window carried inline (rows of features, oldest first) instead
    /// of being fetched. Parsed as f64 so that values outside f32 are caught as
    /// non-finite by the normalizer rather than rejected as bad JSON.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub window: Option<Vec<Vec<f64>>>,
}

/// A text query to classify (processed by a later stage of the project).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    pub event_id: String,
    pub text: String,
}

impl RequestEvent {
    /// Parses and validates one request. Every error says what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self, MessageError> {
        let event: Self = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => MessageError::InvalidEvent(e.to_string()),
            _ => MessageError::MalformedJson(e.to_string()),
        })?;
        event.validate()?;
        Ok(event)
    }

    /// The producer's id for this event.
    pub fn event_id(&self) -> &str {
        match self {
            Self::Stock(s) => &s.event_id,
            Self::Query(q) => &q.event_id,
        }
    }

    /// Checks the rules a JSON parse does not: lengths and characters.
    pub fn validate(&self) -> Result<(), MessageError> {
        validate_event_id(self.event_id())?;
        match self {
            Self::Stock(s) => validate_symbol(&s.symbol),
            Self::Query(q) if q.text.trim().is_empty() => {
                Err(MessageError::InvalidField { field: "text", reason: "empty".into() })
            }
            Self::Query(_) => Ok(()),
        }
    }
}

/// `YYYY-MM-DD` and nothing else: chrono alone also takes `2024-5-31` and
/// `+2024-05-31`, which the JSON Schema refuses.
fn strict_date<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<NaiveDate, D::Error> {
    let text = <std::borrow::Cow<'de, str>>::deserialize(deserializer)?;
    let shaped = text.len() == 10
        && text.bytes().enumerate().all(|(i, b)| if i == 4 || i == 7 { b == b'-' } else { b.is_ascii_digit() });
    if !shaped {
        return Err(serde::de::Error::custom(format!("date {text:?} is not YYYY-MM-DD")));
    }
    NaiveDate::parse_from_str(&text, "%Y-%m-%d").map_err(|e| serde::de::Error::custom(format!("date {text:?}: {e}")))
}

fn validate_event_id(id: &str) -> Result<(), MessageError> {
    let invalid = |reason: String| MessageError::InvalidField { field: "event_id", reason };
    if id.is_empty() || id.len() > MAX_EVENT_ID_LEN {
        return Err(invalid(format!("length {} is outside 1..={MAX_EVENT_ID_LEN}", id.len())));
    }
    if let Some(c) = id.chars().find(|c| !(c.is_ascii_alphanumeric() || "._:-".contains(*c))) {
        return Err(invalid(format!("character {c:?} is not allowed (A-Z a-z 0-9 . _ : -)")));
    }
    Ok(())
}

fn validate_symbol(symbol: &str) -> Result<(), MessageError> {
    let invalid = |reason: String| MessageError::InvalidField { field: "symbol", reason };
    if symbol.is_empty() || symbol.len() > MAX_SYMBOL_LEN {
        return Err(invalid(format!("length {} is outside 1..={MAX_SYMBOL_LEN}", symbol.len())));
    }
    if let Some(c) = symbol.chars().find(|c| !(c.is_ascii_uppercase() || c.is_ascii_digit() || ".-".contains(*c))) {
        return Err(invalid(format!("character {c:?} is not allowed (A-Z 0-9 . -)")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reason(json: &str) -> &'static str {
        RequestEvent::from_json(json.as_bytes()).expect_err("should be refused").reason()
    }

    #[test]
    fn parses_a_stock_event() {
        let event =
            RequestEvent::from_json(br#"{"kind":"stock","event_id":"e-1","symbol":"AAPL","as_of":"2024-05-31"}"#)
                .expect("valid");
        let RequestEvent::Stock(stock) = event else { panic!("not a stock event") };
        assert_eq!(stock.symbol, "AAPL");
        assert_eq!(stock.as_of, NaiveDate::from_ymd_opt(2024, 5, 31).expect("date"));
        assert!(stock.window.is_none());
    }

    #[test]
    fn parses_a_query_event() {
        let event = RequestEvent::from_json(br#"{"kind":"query","event_id":"q-1","text":"what is my balance"}"#)
            .expect("valid");
        assert_eq!(event.event_id(), "q-1");
        assert!(matches!(event, RequestEvent::Query(_)));
    }

    #[test]
    fn refuses_bad_events_with_reasons() {
        assert_eq!(reason("{not json"), "malformed_json");
        assert_eq!(reason(""), "malformed_json");
        assert_eq!(reason(r#"{"kind":"stock","event_id":"e","symbol":"A"}"#), "invalid_event");
        assert_eq!(reason(r#"{"kind":"bond","event_id":"e","symbol":"A","as_of":"2024-01-01"}"#), "invalid_event");
        assert_eq!(reason(r#"{"kind":"stock","event_id":"e","symbol":"A","as_of":"2024-02-30"}"#), "invalid_event");
        assert_eq!(reason(r#"{"kind":"stock","event_id":"e","symbol":"A","as_of":"2024-5-31"}"#), "invalid_event");
        assert_eq!(reason(r#"{"kind":"stock","event_id":"e","symbol":"A","as_of":"+2024-05-31"}"#), "invalid_event");
        assert_eq!(reason(r#"{"kind":"stock","event_id":"e","symbol":7,"as_of":"2024-01-01"}"#), "invalid_event");
        assert_eq!(
            reason(r#"{"kind":"stock","event_id":"e","symbol":"A","as_of":"2024-01-01","extra":1}"#),
            "invalid_event"
        );
        assert_eq!(
            reason(r#"{"kind":"stock","event_id":"e","symbol":"A'; DROP TABLE x;--","as_of":"2024-01-01"}"#),
            "invalid_field"
        );
        assert_eq!(reason(r#"{"kind":"stock","event_id":"","symbol":"A","as_of":"2024-01-01"}"#), "invalid_field");
        assert_eq!(reason(r#"{"kind":"query","event_id":"q","text":"  "}"#), "invalid_field");
    }
}
