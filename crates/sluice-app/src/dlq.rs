//! `sluice dlq replay`: republishes selected dead letters' original bytes to the
//! topic they came from, after a fix, so that the stage that refused them
//! processes them again. The sinks are idempotent by event id, so replaying a
//! dead letter twice, or one that a later delivery already answered, adds no row.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use anyhow::Context;
use chrono::{DateTime, Utc};
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_messages::codec;
use sluice_messages::dead_letter::DeadLetter;

use crate::config::SluiceConfig;

/// Which dead letters to replay.
#[derive(Debug, Clone, Default)]
pub struct Selection {
    /// Any of these reasons (all reasons when empty).
    pub reasons: Vec<String>,
    /// Only dead letters of this stage.
    pub stage: Option<String>,
    /// Dead since (inclusive) and until (exclusive), by `dead_at_ms`.
    pub since: Option<DateTime<Utc>>,
    pub until: Option<DateTime<Utc>>,
    /// Stop after this many.
    pub limit: Option<usize>,
    /// Count what would be replayed, publish nothing.
    pub dry_run: bool,
    /// The topic is read until nothing new arrives for this long (after the
    /// first record; before it, a session timeout more).
    pub idle: Duration,
}

impl Selection {
    fn matches(&self, letter: &DeadLetter) -> bool {
        (self.reasons.is_empty() || self.reasons.contains(&letter.reason))
            && self.stage.as_ref().is_none_or(|s| *s == letter.stage)
            && self.since.is_none_or(|t| letter.dead_at_ms >= t.timestamp_millis())
            && self.until.is_none_or(|t| letter.dead_at_ms < t.timestamp_millis())
    }
}

/// What a replay did, for its report (and the tests).
#[derive(Debug, Default, serde::Serialize)]
pub struct Replayed {
    pub read: u64,
    pub matched: u64,
    pub republished: u64,
    /// Matched but not replayable: the payload was cut to fit the dead letter.
    pub truncated: u64,
    /// Republished (or, in a dry run, would be) by topic.
    pub by_topic: BTreeMap<String, u64>,
    pub by_reason: BTreeMap<String, u64>,
}

pub async fn replay(config: &SluiceConfig, selection: &Selection) -> anyhow::Result<Replayed> {
    let topic = &config.topics.dead_letters;
    // A group of its own each time: from the beginning, committing nothing.
    let group =
        format!("{}-dlq-replay-{}-{}", config.kafka.group_prefix, std::process::id(), Utc::now().timestamp_millis());
    let reader = TopicReader::new(&config.kafka, &group, &[topic])?;
    let mut publisher =
        if selection.dry_run { None } else { Some(Publisher::new(&config.kafka, "sluice-dlq-replay")?) };
    let mut done = Replayed::default();
    // Joining the group takes a while (tansu makes a first join wait half the
    // session timeout): the idle time counts from the first record.
    let first_wait = selection.idle + Duration::from_millis(u64::from(config.kafka.session_timeout_ms));
    while let Some(record) = reader.next(if done.read == 0 { first_wait } else { selection.idle }).await {
        let record = record?;
        done.read += 1;
        let letter: DeadLetter = match serde_json::from_slice(&record.payload) {
            Ok(letter) => letter,
            Err(e) => {
                tracing::warn!(partition = record.partition, offset = record.offset, error = %e, "not a dead letter; skipped");
                continue;
            }
        };
        if !selection.matches(&letter) {
            continue;
        }
        done.matched += 1;
        if letter.payload_truncated {
            done.truncated += 1;
            continue;
        }
        let payload = letter
            .payload()
            .with_context(|| format!("dead letter at {}:{}: payload_base64", record.partition, record.offset))?;
        let requests = &config.topics.requests;
        let from_requests = letter.source.topic == *requests || letter.source.topic == config.lanes.twin(requests);
        let payload = for_replay(payload, from_requests);
        if let Some(publisher) = &mut publisher {
            publisher.send(&letter.source.topic, letter.key.as_deref().map(str::as_bytes), &payload).await?;
            done.republished += 1;
        }
        *done.by_topic.entry(letter.source.topic.clone()).or_default() += 1;
        *done.by_reason.entry(letter.reason.clone()).or_default() += 1;
        if selection.limit.is_some_and(|limit| done.by_topic.values().sum::<u64>() as usize >= limit) {
            break;
        }
    }
    if let Some(publisher) = publisher {
        publisher.finish().await?;
    }
    writeln!(std::io::stdout(), "{}", serde_json::to_string_pretty(&done)?)?;
    Ok(done)
}

/// An envelope replayed onto an internal topic counts one more attempt
/// (`Envelope::attempt`) and loses its deadline; a request (JSON from the
/// producer) loses its `deadline_ms` and `max_age_ms`: a replay is computed
/// whatever its deadline was. Anything else (bytes that are no envelope, or
/// no JSON object, dead-lettered for that) goes back as it was.
fn for_replay(payload: Vec<u8>, is_request: bool) -> Vec<u8> {
    if is_request {
        let Ok(serde_json::Value::Object(mut request)) = serde_json::from_slice(&payload) else { return payload };
        let had = [request.remove("deadline_ms"), request.remove("max_age_ms")];
        if had.iter().all(Option::is_none) {
            return payload;
        }
        return serde_json::to_vec(&request).unwrap_or(payload);
    }
    match codec::decode(&payload) {
        Ok(mut envelope) => {
            envelope.attempt = envelope.attempt.saturating_add(1);
            envelope.deadline_ms = None;
            codec::encode(&envelope)
        }
        Err(_) => payload,
    }
}

#[cfg(test)]
mod tests {
    use sluice_messages::envelope::{Envelope, Payload, QueryText};

    use super::*;

    #[test]
    fn a_replayed_envelope_counts_an_attempt_and_other_bytes_go_back_unchanged() {
        let envelope = Envelope::new("q-1", Payload::Query(QueryText { text: "hello".into() }));
        let once = for_replay(codec::encode(&envelope), false);
        let twice = codec::decode(&for_replay(once, false)).expect("an envelope");
        assert_eq!((twice.attempt, twice.event_id.as_str(), twice.payload), (2, "q-1", envelope.payload.clone()));
        let request = br#"{"kind":"query","event_id":"q-1","text":"hello"}"#.to_vec();
        assert_eq!(for_replay(request.clone(), true), request);
        let garbage = vec![codec::MAGIC, 0xff, 1, 2];
        assert_eq!(for_replay(garbage.clone(), false), garbage);
        // A request topic's payload is never decoded as an envelope.
        assert_eq!(for_replay(codec::encode(&envelope), true), codec::encode(&envelope));
    }

    #[test]
    fn a_replay_is_computed_whatever_its_deadline_was() {
        let mut envelope = Envelope::new("q-1", Payload::Query(QueryText { text: "hello".into() }));
        envelope.deadline_ms = Some(1);
        let replayed = codec::decode(&for_replay(codec::encode(&envelope), false)).expect("an envelope");
        assert_eq!((replayed.attempt, replayed.deadline_ms), (1, None));
        let request = br#"{"kind":"query","event_id":"q-1","text":"hello","deadline_ms":1,"max_age_ms":5}"#.to_vec();
        let replayed: serde_json::Value = serde_json::from_slice(&for_replay(request, true)).expect("JSON");
        assert_eq!(replayed, serde_json::json!({"kind": "query", "event_id": "q-1", "text": "hello"}));
    }
}
