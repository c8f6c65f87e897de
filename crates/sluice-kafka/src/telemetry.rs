//! Every notable happening in the runtime, in one place: each function writes
//! the log line and bumps the metrics together, once per batch rather than once
//! per event. Names follow docs/instrumentation.md.

use std::fmt;
use std::time::Duration;

use metrics::{counter, gauge, histogram};
use sluice_messages::trace::TraceParent;
use tracing::{debug, info, warn};

use crate::lag::PartitionLag;

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
pub(crate) fn stage_started(stage: &'static str, dead_letter_reasons: &[&'static str]) {
    gauge!("sluice_kafka_assigned_partitions", "stage" => stage).set(0.0);
    for name in
        ["sluice_stage_events_in_total", "sluice_stage_events_out_total", "sluice_stage_events_acknowledged_total"]
    {
        counter!(name, "stage" => stage).increment(0);
    }
    counter!("sluice_kafka_consume_errors_total", "stage" => stage).increment(0);
    for retryable in ["true", "false"] {
        counter!("sluice_stage_batch_failures_total", "stage" => stage, "retryable" => retryable).increment(0);
    }
    for reason in dead_letter_reasons.iter().chain([&OUTPUT_TOO_LARGE]) {
        counter!("sluice_stage_dead_letters_total", "stage" => stage, "reason" => *reason).increment(0);
    }
}

/// The dead-letter reason the runtime itself gives, in any stage.
pub(crate) const OUTPUT_TOO_LARGE: &str = "output_too_large";

pub(crate) fn outputs_sent(stage: &'static str, sent: usize) {
    counter!("sluice_stage_events_out_total", "stage" => stage).increment(sent as u64);
}

pub(crate) fn dead_lettered(stage: &'static str, reason: &'static str, detail: &str, event_id: Option<&str>) {
    counter!("sluice_stage_dead_letters_total", "stage" => stage, "reason" => reason).increment(1);
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

pub(crate) fn consume_error(stage: &'static str, error: &str) {
    counter!("sluice_kafka_consume_errors_total", "stage" => stage).increment(1);
    warn!(stage, error, "consume error");
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
