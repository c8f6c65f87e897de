//! Request events: the JSON producers publish to the `requests` topic.
//!
//! The JSON Schemas in `schemas/` describe the same rules for producers in other
//! languages; `tests/schemas.rs` keeps the two in step.

use chrono::{Datelike, NaiveDate};
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
    /// A backfill: predict for every `stride`-th trading day from `from` to
    /// `as_of` (the users' sliding windows: `window_size` is the model's,
    /// `prediction_stride` is `stride`). Each step is its own event, with the
    /// id `{event_id}:{YYYYMMDD}`.
    #[serde(default, deserialize_with = "strict_date_opt", skip_serializing_if = "Option::is_none")]
    pub from: Option<NaiveDate>,
    /// Trading days between steps of a backfill (default 1).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stride: Option<u32>,
    /// Optional: when the answer stops being wanted (Unix time, ms). An event
    /// past it when a stage cuts its batch is not computed: it becomes a
    /// `deadline_exceeded` dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// Optional: the same, relative to the request's Kafka timestamp (ms);
    /// with `deadline_ms` too, the earlier of the two holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// Optional: the lane it travels in when lanes are on ([`Priority`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// Latest `deadline_ms` accepted: the end of the year 9999.
pub const MAX_DEADLINE_MS: i64 = 253_402_300_799_999;
/// Longest `max_age_ms` accepted: a week.
pub const MAX_AGE_MS: u64 = 604_800_000;

/// Most steps one backfill event may ask for.
pub const MAX_BACKFILL_STEPS: usize = 1000;
/// Longest id of a backfill event: room for the `:YYYYMMDD` of its steps.
pub const MAX_BACKFILL_ID_LEN: usize = MAX_EVENT_ID_LEN - 9;

impl StockRequest {
    /// The (event id, date) of each window this event asks for: one for a
    /// plain event, one per step for a backfill. Trading days are weekdays.
    pub fn steps(&self) -> Vec<(String, NaiveDate)> {
        let Some(from) = self.from else { return vec![(self.event_id.clone(), self.as_of)] };
        let stride = self.stride.unwrap_or(1).max(1) as usize;
        let mut days = Vec::new();
        let mut day = from;
        while day <= self.as_of {
            if !matches!(day.weekday(), chrono::Weekday::Sat | chrono::Weekday::Sun) {
                days.push(day);
            }
            match day.succ_opt() {
                Some(next) => day = next,
                None => break,
            }
        }
        days.into_iter().step_by(stride).map(|d| (format!("{}:{}", self.event_id, d.format("%Y%m%d")), d)).collect()
    }
}

/// A text query to classify: the query model's intent for it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryRequest {
    pub event_id: String,
    pub text: String,
    /// Optional: when the answer stops being wanted (Unix time, ms). An event
    /// past it when a stage cuts its batch is not computed: it becomes a
    /// `deadline_exceeded` dead letter.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub deadline_ms: Option<i64>,
    /// Optional: the same, relative to the request's Kafka timestamp (ms);
    /// with `deadline_ms` too, the earlier of the two holds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_age_ms: Option<u64>,
    /// Optional: the lane it travels in when lanes are on ([`Priority`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<Priority>,
}

/// Which lane a request travels in when the deployment has lanes on: `live`
/// work is served before `bulk` work, which keeps a guaranteed share.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Priority {
    Live,
    Bulk,
}

impl RequestEvent {
    /// Its lane: its `priority`, or else bulk for a backfill and live for
    /// anything else.
    pub fn priority(&self) -> Priority {
        match self {
            Self::Stock(s) => s.priority.unwrap_or(if s.from.is_some() { Priority::Bulk } else { Priority::Live }),
            Self::Query(q) => q.priority.unwrap_or(Priority::Live),
        }
    }

    /// Parses and validates one request. Every error says what is wrong.
    pub fn from_json(bytes: &[u8]) -> Result<Self, MessageError> {
        std::str::from_utf8(bytes).map_err(|e| MessageError::InvalidUtf8(e.valid_up_to()))?;
        let event: Self = serde_json::from_slice(bytes).map_err(|e| match e.classify() {
            serde_json::error::Category::Data => MessageError::InvalidEvent(e.to_string()),
            _ => MessageError::MalformedJson(e.to_string()),
        })?;
        event.validate()?;
        Ok(event)
    }

    /// `stock` or `query`, as `kind` names it in the JSON.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Stock(_) => "stock",
            Self::Query(_) => "query",
        }
    }

    /// The producer's id for this event.
    pub fn event_id(&self) -> &str {
        match self {
            Self::Stock(s) => &s.event_id,
            Self::Query(q) => &q.event_id,
        }
    }

    /// When the answer stops being wanted (Unix ms), for a request made at
    /// `requested_at_ms`: the earlier of its `deadline_ms` and its
    /// `max_age_ms` from then; `None` when it gave neither.
    pub fn deadline_ms(&self, requested_at_ms: i64) -> Option<i64> {
        let (deadline, max_age) = match self {
            Self::Stock(s) => (s.deadline_ms, s.max_age_ms),
            Self::Query(q) => (q.deadline_ms, q.max_age_ms),
        };
        let aged = max_age.map(|age| requested_at_ms.saturating_add(age as i64));
        [deadline, aged].into_iter().flatten().min()
    }

    /// Checks the rules a JSON parse does not: lengths and characters.
    pub fn validate(&self) -> Result<(), MessageError> {
        validate_event_id(self.event_id())?;
        let (deadline, max_age) = match self {
            Self::Stock(s) => (s.deadline_ms, s.max_age_ms),
            Self::Query(q) => (q.deadline_ms, q.max_age_ms),
        };
        if let Some(d) = deadline
            && !(1..=MAX_DEADLINE_MS).contains(&d)
        {
            let reason = format!("{d} is outside 1..={MAX_DEADLINE_MS} (Unix ms, up to the year 9999)");
            return Err(MessageError::InvalidField { field: "deadline_ms", reason });
        }
        if let Some(age) = max_age
            && !(1..=MAX_AGE_MS).contains(&age)
        {
            let reason = format!("{age} is outside 1..={MAX_AGE_MS} (a week)");
            return Err(MessageError::InvalidField { field: "max_age_ms", reason });
        }
        match self {
            Self::Stock(s) => validate_symbol(&s.symbol).and_then(|()| validate_backfill(s)),
            Self::Query(q) if q.text.trim().is_empty() => {
                Err(MessageError::InvalidField { field: "text", reason: "empty".into() })
            }
            // JSON may carry it (`\u0000`), but no text column of PostgreSQL
            // can hold it: refused here, where the producer learns why, rather
            // than at the sink. Other control characters are kept.
            Self::Query(q) if q.text.contains('\0') => Err(MessageError::InvalidField {
                field: "text",
                reason: "holds U+0000 (NUL), which text sinks such as PostgreSQL cannot store".into(),
            }),
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

fn strict_date_opt<'de, D: serde::Deserializer<'de>>(deserializer: D) -> Result<Option<NaiveDate>, D::Error> {
    strict_date(deserializer).map(Some)
}

fn validate_backfill(s: &StockRequest) -> Result<(), MessageError> {
    let Some(from) = s.from else {
        return match s.stride {
            Some(_) => {
                Err(MessageError::InvalidField { field: "stride", reason: "only with `from` (a backfill)".into() })
            }
            None => Ok(()),
        };
    };
    let invalid = |field, reason: String| Err(MessageError::InvalidField { field, reason });
    if from > s.as_of {
        return invalid("from", format!("{from} is after as_of {}", s.as_of));
    }
    if s.window.is_some() {
        return invalid("window", "a backfill fetches its windows; it cannot carry one".into());
    }
    if s.event_id.len() > MAX_BACKFILL_ID_LEN {
        return invalid("event_id", format!("a backfill's id is at most {MAX_BACKFILL_ID_LEN} long"));
    }
    if let Some(stride) = s.stride
        && !(1..=250).contains(&stride)
    {
        return invalid("stride", format!("{stride} is outside 1..=250"));
    }
    // Counted on the calendar first, so that a huge range costs nothing.
    let calendar_days = (s.as_of - from).num_days() as usize;
    if calendar_days / s.stride.unwrap_or(1) as usize > 2 * MAX_BACKFILL_STEPS || s.steps().len() > MAX_BACKFILL_STEPS {
        return invalid("from", format!("more than {MAX_BACKFILL_STEPS} steps"));
    }
    Ok(())
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
        RequestEvent::from_json(json.as_bytes()).expect_err("should be refused").reason().as_str()
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
    fn a_backfill_steps_every_stride_trading_days() {
        let event = RequestEvent::from_json(
            br#"{"kind":"stock","event_id":"b","symbol":"S0001","from":"2024-05-27","as_of":"2024-06-07","stride":2}"#,
        )
        .expect("valid");
        let RequestEvent::Stock(stock) = event else { panic!("not a stock event") };
        let steps: Vec<String> = stock.steps().into_iter().map(|(id, _)| id).collect();
        // Ten weekdays, every second one.
        assert_eq!(steps, ["b:20240527", "b:20240529", "b:20240531", "b:20240604", "b:20240606"]);
        assert_eq!(
            reason(r#"{"kind":"stock","event_id":"b","symbol":"A","from":"2024-06-08","as_of":"2024-06-07"}"#),
            "invalid_field"
        );
        assert_eq!(
            reason(r#"{"kind":"stock","event_id":"b","symbol":"A","from":"2000-01-01","as_of":"2024-06-07"}"#),
            "invalid_field"
        );
        assert_eq!(
            reason(r#"{"kind":"stock","event_id":"b","symbol":"A","as_of":"2024-06-07","stride":2}"#),
            "invalid_field"
        );
        assert_eq!(
            reason(
                r#"{"kind":"stock","event_id":"b","symbol":"A","from":"2024-06-01","as_of":"2024-06-07","stride":0}"#
            ),
            "invalid_field"
        );
    }

    #[test]
    fn parses_a_query_event() {
        let event = RequestEvent::from_json(br#"{"kind":"query","event_id":"q-1","text":"what is my balance"}"#)
            .expect("valid");
        assert_eq!(event.event_id(), "q-1");
        assert!(matches!(event, RequestEvent::Query(_)));
    }

    #[test]
    fn a_deadline_is_the_earlier_of_deadline_ms_and_max_age_ms() {
        let deadline = |json: &str| RequestEvent::from_json(json.as_bytes()).expect("valid").deadline_ms(1_000);
        assert_eq!(deadline(r#"{"kind":"query","event_id":"q","text":"hi"}"#), None);
        assert_eq!(deadline(r#"{"kind":"query","event_id":"q","text":"hi","max_age_ms":500}"#), Some(1_500));
        let both =
            r#"{"kind":"stock","event_id":"e","symbol":"A","as_of":"2024-01-02","deadline_ms":1200,"max_age_ms":500}"#;
        assert_eq!(deadline(both), Some(1_200));
        let later =
            r#"{"kind":"stock","event_id":"e","symbol":"A","as_of":"2024-01-02","deadline_ms":9000,"max_age_ms":500}"#;
        assert_eq!(deadline(later), Some(1_500));
        assert_eq!(reason(r#"{"kind":"query","event_id":"q","text":"hi","max_age_ms":0}"#), "invalid_field");
        assert_eq!(reason(r#"{"kind":"query","event_id":"q","text":"hi","deadline_ms":-5}"#), "invalid_field");
        assert_eq!(reason(r#"{"kind":"query","event_id":"q","text":"hi","max_age_ms":-5}"#), "invalid_event");
        assert_eq!(reason(r#"{"kind":"query","event_id":"q","text":"hi","deadline_ms":1.5}"#), "invalid_event");
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
        assert_eq!(reason(r#"{"kind":"query","event_id":"q","text":"what is my balance\u0000"}"#), "invalid_field");
        let tabbed = RequestEvent::from_json(br#"{"kind":"query","event_id":"q","text":"balance\tplease\n"}"#);
        assert!(tabbed.is_ok(), "other control characters are kept: {tabbed:?}");
        let latin1 = b"{\"kind\":\"query\",\"event_id\":\"q\",\"text\":\"caf\xe9\"}";
        let e = RequestEvent::from_json(latin1).expect_err("not UTF-8");
        assert_eq!((e.reason().as_str(), e.to_string().as_str()), ("invalid_utf8", "invalid UTF-8 at byte 42"));
    }
}
