//! Every notable happening in the runtime, in one place: each function writes
//! the log line and bumps the metrics together, once per batch rather than once
//! per event. Names follow docs/instrumentation.md.

use std::collections::{BTreeSet, HashMap};
use std::fmt;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use metrics::{counter, gauge, histogram};
use sluice_messages::dead_letter::Reason;
use sluice_messages::trace::TraceParent;
use tracing::{debug, info, warn};

use crate::lag::PartitionLag;
use crate::lanes::Lane;
use crate::latency::{Change, ControllerState};
use crate::progress::Reading;
use crate::{BatchPolicy, StageStatus};

/// `traces` is this hop's trace context per input: the first few trace ids go
/// in the debug line, to find a batch's events in a tracing system.
pub(crate) fn batch_processed(
    stage: &'static str,
    size: usize,
    waited: Duration,
    took: Duration,
    traces: &[TraceParent],
) {
    counter!("sluice_stage_events_in_total", "stage" => stage).increment(size as u64);
    histogram!("sluice_stage_batch_size", "stage" => stage).record(size as f64);
    histogram!("sluice_stage_batch_wait_seconds", "stage" => stage).record(waited.as_secs_f64());
    histogram!("sluice_stage_process_seconds", "stage" => stage).record(took.as_secs_f64());
    debug!(
        stage,
        size,
        waited_ms = waited.as_millis() as u64,
        took_ms = took.as_millis() as u64,
        trace_ids = %FirstTraceIds(traces),
        "batch processed"
    );
}

/// A batch of `lane` that the process loop starts on, `age` after its
/// oldest input arrived.
pub(crate) fn lane_batch(stage: &'static str, lane: Lane, size: usize, age: Duration) {
    let lane = lane.as_str();
    counter!("sluice_lane_events_total", "stage" => stage, "lane" => lane).increment(size as u64);
    histogram!("sluice_lane_wait_seconds", "stage" => stage, "lane" => lane).record(age.as_secs_f64());
}

/// The bulk queue is full: the bulk partitions are paused.
pub(crate) fn bulk_paused(stage: &'static str, status: &StageStatus) {
    status.set_bulk_paused(true);
    counter!("sluice_lane_bulk_pauses_total", "stage" => stage).increment(1);
    gauge!("sluice_lane_bulk_paused", "stage" => stage).set(1.0);
    debug!(stage, "bulk queue full: bulk partitions paused");
}

/// The bulk queue is half free again: the bulk partitions are resumed.
pub(crate) fn bulk_resumed(stage: &'static str, status: &StageStatus) {
    status.set_bulk_paused(false);
    gauge!("sluice_lane_bulk_paused", "stage" => stage).set(0.0);
    debug!(stage, "bulk partitions resumed");
}

/// At most [`FirstTraceIds::SHOWN`] trace ids and how many more: a log line
/// stays short whatever the batch size. Formatted only when the line is logged.
struct FirstTraceIds<'a>(&'a [TraceParent]);

impl FirstTraceIds<'_> {
    const SHOWN: usize = 3;
}

impl fmt::Display for FirstTraceIds<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, t) in self.0.iter().take(Self::SHOWN).enumerate() {
            write!(f, "{}{:032x}", if i == 0 { "" } else { "," }, t.trace_id)?;
        }
        match self.0.len().saturating_sub(Self::SHOWN) {
            0 => Ok(()),
            more => write!(f, " (+{more})"),
        }
    }
}

/// Creates, at 0, the series that alerts watch with `increase()` or expect to
/// exist (a replica never assigned a partition must show 0, not nothing).
pub(crate) fn stage_started(stage: &'static str, dead_letter_reasons: &[Reason]) {
    gauge!("sluice_kafka_assigned_partitions", "stage" => stage).set(0.0);
    for name in
        ["sluice_stage_events_in_total", "sluice_stage_events_out_total", "sluice_stage_events_acknowledged_total"]
    {
        counter!(name, "stage" => stage).increment(0);
    }
    counter!("sluice_kafka_consume_errors_total", "stage" => stage).increment(0);
    gauge!("sluice_stage_drain_seconds", "stage" => stage).set(0.0);
    gauge!("sluice_kafka_stalled_partitions", "stage" => stage).set(0.0);
    for retryable in ["true", "false"] {
        counter!("sluice_stage_batch_failures_total", "stage" => stage, "retryable" => retryable).increment(0);
    }
    for reason in dead_letter_reasons.iter().chain([&Reason::OutputTooLarge]) {
        counter!("sluice_stage_dead_letters_total", "stage" => stage, "reason" => reason.as_str()).increment(0);
    }
}

pub(crate) fn outputs_sent(stage: &'static str, sent: usize) {
    counter!("sluice_stage_events_out_total", "stage" => stage).increment(sent as u64);
}

pub(crate) fn dead_lettered(stage: &'static str, reason: Reason, detail: &str, event_id: Option<&str>) {
    counter!("sluice_stage_dead_letters_total", "stage" => stage, "reason" => reason.as_str()).increment(1);
    let reason = reason.as_str();
    debug!(stage, reason, detail, event_id, "dead-lettered");
}

pub(crate) fn batch_failed(stage: &'static str, retryable: bool, message: &str, retry_in: Duration) {
    counter!("sluice_stage_batch_failures_total", "stage" => stage, "retryable" => retryable.to_string()).increment(1);
    warn!(stage, retryable, message, retry_in_ms = retry_in.as_millis() as u64, "batch failed");
}

pub(crate) fn acknowledged(stage: &'static str, inputs: usize) {
    counter!("sluice_stage_events_acknowledged_total", "stage" => stage).increment(inputs as u64);
}

pub(crate) fn stale_offset(stage: &'static str, partition: i32, error: &str) {
    counter!("sluice_kafka_stale_offsets_total", "stage" => stage).increment(1);
    debug!(stage, partition, error, "offset not stored: partition no longer assigned (its work will be redone)");
}

/// Lets a repeated warning through at most once per [`Throttle::EVERY`],
/// counting those it holds back: a broker that is down makes the same error
/// ten times a second, and log stores should not pay for each.
#[derive(Debug, Default)]
pub(crate) struct Throttle {
    /// When a line last went out, and how many were held back since.
    state: Mutex<HashMap<String, (Instant, u64)>>,
}

impl Throttle {
    pub(crate) const EVERY: Duration = Duration::from_secs(10);

    /// `Some(held back since the last line)` when a line about `what` may go out now.
    fn admit(&self, what: &str) -> Option<u64> {
        let mut state = self.state.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let now = Instant::now();
        match state.get_mut(what) {
            Some((last, held)) if now.duration_since(*last) < Self::EVERY => {
                *held += 1;
                None
            }
            Some((last, held)) => {
                *last = now;
                Some(std::mem::take(held))
            }
            None => {
                state.insert(what.to_string(), (now, 0));
                Some(0)
            }
        }
    }
}

/// Counted every time, logged through `throttle`.
pub(crate) fn consume_error(stage: &'static str, error: &str, throttle: &Throttle) {
    counter!("sluice_kafka_consume_errors_total", "stage" => stage).increment(1);
    if let Some(suppressed) = throttle.admit(error) {
        warn!(stage, error, suppressed, "consume error");
    }
}

/// librdkafka's own errors and log lines (the client context's callbacks),
/// through `throttle`: an outage repeats them many times a second.
pub(crate) fn client_error(stage: &'static str, error: &str, reason: &str, throttle: &Throttle) {
    if let Some(suppressed) = throttle.admit(error) {
        warn!(target: "librdkafka", stage, error, reason, suppressed, "kafka client error");
    }
}

/// A librdkafka log line at warning level or above (`level`: syslog's, 0..=4);
/// the others are debug.
pub(crate) fn client_log(stage: &'static str, level: i32, facility: &str, message: &str, throttle: &Throttle) {
    if level > 4 {
        debug!(target: "librdkafka", stage, facility, message, "kafka client");
    } else if let Some(suppressed) = throttle.admit(facility) {
        warn!(target: "librdkafka", stage, facility, message, suppressed, "kafka client");
    }
}

pub(crate) fn rebalance(
    stage: &'static str,
    kind: &'static str,
    protocol: &'static str,
    partitions: &str,
    assigned_now: i64,
) {
    counter!("sluice_kafka_rebalances_total", "stage" => stage, "kind" => kind).increment(1);
    gauge!("sluice_kafka_assigned_partitions", "stage" => stage).set(assigned_now as f64);
    info!(stage, kind, protocol, partitions, assigned_now, "rebalance");
}

/// One reading of librdkafka's statistics: the lag of each assigned partition
/// whose lag is known.
pub(crate) fn consumer_lag(stage: &'static str, group: &str, lags: &[PartitionLag]) {
    for l in lags {
        lag_gauge(stage, group, &l.topic, l.partition).set(l.lag as f64);
    }
    debug!(stage, partitions = lags.len(), messages = lags.iter().map(|l| l.lag).sum::<i64>(), "consumer lag");
}

/// One look at a stage's progress (`crate::progress`): its drain time and
/// rate, and each stalled partition's gauge, logging the partitions that
/// stall and those that move again (`stalled` holds those stalled until now).
pub(crate) fn progress(stage: &'static str, reading: &Reading, stalled: &mut BTreeSet<(String, i32)>) {
    gauge!("sluice_stage_drain_seconds", "stage" => stage).set(reading.drain_seconds);
    gauge!("sluice_stage_acknowledged_per_second", "stage" => stage).set(reading.rate);
    gauge!("sluice_kafka_stalled_partitions", "stage" => stage).set(reading.stalled.len() as f64);
    let now: BTreeSet<(String, i32)> = reading.stalled.iter().map(|s| (s.topic.clone(), s.partition)).collect();
    for s in &reading.stalled {
        if !stalled.contains(&(s.topic.clone(), s.partition)) {
            warn!(
                stage,
                topic = s.topic,
                partition = s.partition,
                lag = s.lag,
                for_seconds = s.for_seconds,
                "partition stalled: work waits and nothing was acknowledged"
            );
        }
        stalled_gauge(stage, &s.topic, s.partition).set(1.0);
    }
    for (topic, partition) in stalled.difference(&now) {
        info!(stage, topic, partition, "partition moves again (or has nothing left, or left this member)");
        stalled_gauge(stage, topic, *partition).set(0.0);
    }
    *stalled = now;
}

fn stalled_gauge(stage: &'static str, topic: &str, partition: i32) -> metrics::Gauge {
    gauge!("sluice_kafka_partition_stalled", "stage" => stage, "topic" => topic.to_string(), "partition" => partition.to_string())
}

/// The batch policy in force in a stage that may follow a latency target
/// (from its start: a panel and a rule see it before any change).
pub(crate) fn batch_policy(stage: &'static str, policy: BatchPolicy) {
    gauge!("sluice_batch_max_size", "stage" => stage).set(policy.max_batch_size as f64);
    gauge!("sluice_batch_max_wait_ms", "stage" => stage).set(policy.max_wait_ms as f64);
    counter!("sluice_batch_policy_changes_total", "stage" => stage).increment(0);
}

/// The batch policy changed (the latency controller, or the configuration
/// while it is off): the log line says why; the gauges hold the policy in
/// force and the controller's last p99.
pub(crate) fn batch_policy_changed(stage: &'static str, change: &Change, state: Option<ControllerState>) {
    let BatchPolicy { max_batch_size, max_wait_ms } = change.policy;
    batch_policy(stage, change.policy);
    counter!("sluice_batch_policy_changes_total", "stage" => stage).increment(1);
    let p99_ms = state.as_ref().and_then(|s| s.p99_ms);
    if let Some(p99) = p99_ms {
        gauge!("sluice_batch_controller_p99_ms", "stage" => stage).set(p99);
    }
    let target_ms = state.map(|s| s.target_ms);
    info!(stage, max_batch_size, max_wait_ms, ?target_ms, ?p99_ms, reason = change.reason, "batch policy changed");
}

/// Partitions no longer assigned here: their lag is the new owner's to report.
/// (Logged with the rebalance.)
pub(crate) fn lag_forgotten(stage: &'static str, group: &str, partitions: &[(String, i32)]) {
    for (topic, partition) in partitions {
        lag_gauge(stage, group, topic, *partition).set(0.0);
    }
}

fn lag_gauge(stage: &'static str, group: &str, topic: &str, partition: i32) -> metrics::Gauge {
    gauge!(
        "sluice_kafka_consumer_lag",
        "stage" => stage,
        "group" => group.to_string(),
        "topic" => topic.to_string(),
        "partition" => partition.to_string()
    )
}

pub(crate) fn statistics_unreadable(stage: &'static str, error: &str) {
    debug!(stage, error, "librdkafka statistics unreadable; consumer lag not updated");
}

pub(crate) fn stopped(stage: &'static str, acknowledged: u64) {
    info!(stage, acknowledged, "stage stopped");
}

#[cfg(test)]
mod tests {
    use super::Throttle;

    #[test]
    fn a_repeated_line_goes_out_once_per_period_with_what_was_held_back() {
        let throttle = Throttle::default();
        assert_eq!(throttle.admit("AllBrokersDown"), Some(0));
        for _ in 0..5 {
            assert_eq!(throttle.admit("AllBrokersDown"), None);
        }
        assert_eq!(throttle.admit("another error"), Some(0), "each kind of line has its own period");
        let mut state = throttle.state.lock().expect("lock");
        state.get_mut("AllBrokersDown").expect("seen").0 -= Throttle::EVERY;
        drop(state);
        assert_eq!(throttle.admit("AllBrokersDown"), Some(5), "the next line says how many were held back");
    }
}
