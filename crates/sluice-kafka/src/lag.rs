//! Consumer lag, read from librdkafka's statistics (`statistics.interval.ms`):
//! per partition, the end of the log (the last stable offset under the default
//! `read_committed`, else the high watermark) minus the group's committed
//! offset, as librdkafka computes it in `consumer_lag`.
//!
//! The statistics arrive on the consumer's queue, so they are read when the
//! stage polls: behind the messages already fetched, and not at all while the
//! consume loop is blocked on a full batcher queue (the gauge then keeps its
//! last value). That costs no request to the broker, and is what librdkafka
//! offers; docs/instrumentation.md says how to read it.

use std::collections::{BTreeSet, HashMap};

use serde::Deserialize;

/// The parts of librdkafka's statistics JSON that lag needs; serde skips the rest.
#[derive(Deserialize)]
struct Statistics {
    #[serde(default)]
    topics: HashMap<String, TopicStatistics>,
}

#[derive(Deserialize)]
struct TopicStatistics {
    #[serde(default)]
    partitions: HashMap<String, PartitionStatistics>,
}

#[derive(Deserialize)]
struct PartitionStatistics {
    partition: i32,
    /// -1 while unknown: no committed offset or no watermark yet.
    #[serde(default = "unknown")]
    consumer_lag: i64,
}

fn unknown() -> i64 {
    -1
}

/// One partition's lag, in messages.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    pub lag: i64,
}

/// The known lag of each `assigned` (topic, partition), in order. Partitions
/// not assigned here (another member's, or revoked since the statistics were
/// taken), librdkafka's internal partition -1, and unknown values are left out.
pub(crate) fn assigned_lags(
    statistics: &[u8],
    assigned: &BTreeSet<(String, i32)>,
) -> Result<Vec<PartitionLag>, serde_json::Error> {
    let statistics: Statistics = serde_json::from_slice(statistics)?;
    let mut lags: Vec<PartitionLag> = statistics
        .topics
        .into_iter()
        .flat_map(|(topic, t)| {
            t.partitions.into_values().map(move |p| PartitionLag {
                topic: topic.clone(),
                partition: p.partition,
                lag: p.consumer_lag,
            })
        })
        .filter(|l| l.partition >= 0 && l.lag >= 0 && assigned.contains(&(l.topic.clone(), l.partition)))
        .collect();
    lags.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(lags)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Shaped like librdkafka 2.12's statistics, trimmed.
    const STATISTICS: &str = r#"{
        "name": "stage#consumer-1", "type": "consumer", "ts": 1, "brokers": {},
        "topics": {
            "in": { "topic": "in", "partitions": {
                "0": { "partition": 0, "desired": true, "committed_offset": 40, "hi_offset": 100, "consumer_lag": 60 },
                "1": { "partition": 1, "desired": true, "committed_offset": -1001, "hi_offset": 7, "consumer_lag": -1 },
                "2": { "partition": 2, "desired": false, "committed_offset": 0, "hi_offset": 9, "consumer_lag": 9 },
                "3": { "partition": 3, "desired": true, "committed_offset": 5, "hi_offset": 5, "consumer_lag": 0 },
                "-1": { "partition": -1, "consumer_lag": -1 }
            } },
            "other": { "topic": "other", "partitions": { "0": { "partition": 0, "consumer_lag": 3 } } }
        },
        "cgrp": { "state": "up" }
    }"#;

    fn assigned(partitions: &[(&str, i32)]) -> BTreeSet<(String, i32)> {
        partitions.iter().map(|(t, p)| (t.to_string(), *p)).collect()
    }

    #[test]
    fn reports_the_known_lag_of_assigned_partitions_only() {
        let lags = assigned_lags(STATISTICS.as_bytes(), &assigned(&[("in", 0), ("in", 1), ("in", 3), ("in", -1)]))
            .expect("json");
        let got: Vec<(&str, i32, i64)> = lags.iter().map(|l| (l.topic.as_str(), l.partition, l.lag)).collect();
        // 1: nothing committed yet (unknown); 2: another member's; -1: internal.
        assert_eq!(got, vec![("in", 0, 60), ("in", 3, 0)]);
    }

    #[test]
    fn nothing_assigned_reports_nothing() {
        assert!(assigned_lags(STATISTICS.as_bytes(), &BTreeSet::new()).expect("json").is_empty());
        assert!(assigned_lags(b"{}", &assigned(&[("in", 0)])).expect("json").is_empty());
        assert!(assigned_lags(b"not json", &assigned(&[("in", 0)])).is_err());
    }
}
