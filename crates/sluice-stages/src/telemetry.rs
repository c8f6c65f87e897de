//! The stages' own metrics and logs, in one place: each function writes the
//! log line and bumps the metrics of one happening together (names and labels:
//! docs/instrumentation.md). Model metrics carry the model's name: one process
//! may serve two models.

use std::time::Duration;

use metrics::{counter, gauge, histogram};
use sluice_model::ModelError;

/// Creates, at 0, the model failure counters that alerts watch with
/// `increase()` (a series that appears at 1 shows no increase).
pub(crate) fn model_failures_at_zero(model: &str) {
    let model = model.to_string();
    counter!("sluice_model_load_failures_total", "model" => model.clone()).increment(0);
    counter!("sluice_model_out_of_memory_total", "model" => model.clone()).increment(0);
    counter!("sluice_model_bisections_total", "model" => model).increment(0);
}

/// An event of `kind` (stock, query) past its deadline when `stage` cut its
/// batch: a dead letter, not computed.
pub(crate) fn deadline_exceeded(stage: &'static str, kind: &'static str) {
    counter!("sluice_deadline_exceeded_total", "stage" => stage, "kind" => kind).increment(1);
}

/// One model call that answered.
pub(crate) fn model_call(model: &str, rows: usize, padded_length: usize, took: Duration) {
    let model = model.to_string();
    histogram!("sluice_model_batch_rows", "model" => model.clone()).record(rows as f64);
    if padded_length > 0 {
        histogram!("sluice_model_batch_tokens", "model" => model.clone()).record((rows * padded_length) as f64);
    }
    histogram!("sluice_model_inference_seconds", "model" => model.clone()).record(took.as_secs_f64());
    counter!("sluice_model_rows_total", "model" => model).increment(rows as u64);
}

/// Where one batch's time went in the model stage, by phase: decoding and
/// checking the inputs, the prediction cache (look-up, grouping identical
/// rows, storing answers), laying out the model's input, waiting for the
/// model (the call's wall time, assembly excluded), and making and encoding
/// the answers. Summed per phase, so that a benchmark can divide by events.
pub(crate) fn model_stage_phases(model: &str, phases: &[(&'static str, Duration)]) {
    for (phase, took) in phases {
        counter!("sluice_model_stage_microseconds_total", "model" => model.to_string(), "phase" => *phase)
            .increment(took.as_micros() as u64);
    }
}

pub(crate) fn row_failed_alone(model: &str, error: &ModelError) {
    tracing::warn!(model, error = %error, "a row fails alone: dead-lettered as model_error");
}

/// A call that ran out of memory, split; `lowered` is the new row cap when it
/// was lowered.
pub(crate) fn out_of_memory(model: &str, rows: usize, lowered: Option<usize>, error: &ModelError) {
    counter!("sluice_model_out_of_memory_total", "model" => model.to_string()).increment(1);
    if let Some(cap) = lowered {
        tracing::warn!(model, rows, cap, error = %error, "a model call ran out of memory: split, and calls are capped at {cap} rows from now on");
        gauge!("sluice_model_row_cap", "model" => model.to_string()).set(cap as f64);
    }
}

pub(crate) fn bisected(model: &str, rows: usize, error: &ModelError) {
    counter!("sluice_model_bisections_total", "model" => model.to_string()).increment(1);
    tracing::warn!(model, rows, error = %error, "a model call failed: bisecting it");
}

pub(crate) fn version_loading(version: &str, serving: &str) {
    tracing::info!(version, serving, "loading a model version; the serving one answers meanwhile");
}

/// A rollout's candidate is loaded, warm and admitted: it runs beside the serving version.
pub(crate) fn candidate_ready(model: &str, version: &str) {
    tracing::info!(model, version, "the rollout's candidate is ready beside the serving version");
}

/// A rollout's candidate cannot run here (the rollout rolls back).
pub(crate) fn candidate_failed(model: &str, version: &str, reason: &str) {
    tracing::error!(model, version, reason, "the rollout's candidate failed; the rollout rolls back");
}

pub(crate) fn version_switched(model: &str, from: &str, to: &str) {
    counter!("sluice_model_switches_total", "model" => model.to_string()).increment(1);
    tracing::info!(model, from, to, "model version switched");
}

pub(crate) fn version_refused(model: &str, version: &str, serving: &str, error: &ModelError) {
    counter!("sluice_model_load_failures_total", "model" => model.to_string()).increment(1);
    tracing::error!(model, version, error = %error, serving, "model version failed to load; the serving version stays");
}

/// Cache entries that were not valid answers (another width, non-finite, or
/// outside an output's declared range) were ignored and recomputed.
pub(crate) fn invalid_cache_entries(model: &str, entries: u64) {
    counter!("sluice_cache_invalid_entries_total", "model" => model.to_string()).increment(entries);
    tracing::warn!(model, entries, "cache entries that are not valid answers were ignored and recomputed");
}

/// A write the sink refused rows of, split to find them.
pub(crate) fn sink_bisected(sink: &'static str, rows: usize, reason: &str) {
    counter!("sluice_writer_sink_bisections_total", "sink" => sink).increment(1);
    tracing::warn!(sink, rows, reason, "the sink refused rows of a batch: isolating them");
}

/// One writer batch: what was saved, and what `min_confidence` dropped.
pub(crate) fn written(saved: u64, below_min_confidence: u64) {
    counter!("sluice_writer_predictions_written_total").increment(saved);
    counter!("sluice_writer_below_min_confidence_total").increment(below_min_confidence);
}

/// A rollout's shadow answers saved (never counted as the users' predictions).
pub(crate) fn shadow_written(saved: u64) {
    counter!("sluice_writer_shadow_written_total").increment(saved);
}
