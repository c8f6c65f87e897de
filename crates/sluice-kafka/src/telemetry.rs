//! Every notable happening in the runtime, in one place: each function writes
//! the log line and bumps the metrics together, once per batch rather than once
//! per event. Names follow docs/instrumentation.md.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use tracing::{debug, info, warn};

pub(crate) fn batch_processed(stage: &'static str, size: usize, waited: Duration, took: Duration) {
    counter!("sluice_stage_events_in_total", "stage" => stage).increment(size as u64);
    histogram!("sluice_stage_batch_size", "stage" => stage).record(size as f64);
    histogram!("sluice_stage_batch_wait_seconds", "stage" => stage).record(waited.as_secs_f64());
    histogram!("sluice_stage_process_seconds", "stage" => stage).record(took.as_secs_f64());
    debug!(stage, size, waited_ms = waited.as_millis() as u64, took_ms = took.as_millis() as u64, "batch processed");
}

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

pub(crate) fn stopped(stage: &'static str, acknowledged: u64) {
    info!(stage, acknowledged, "stage stopped");
}
