//! The stages' own metrics and logs, in one place (names and labels:
//! docs/instrumentation.md).

use metrics::counter;

/// Cache entries that were not valid answers (another width, non-finite, or
/// outside an output's declared range) were ignored and recomputed.
pub(crate) fn invalid_cache_entries(model: &str, entries: u64) {
    counter!("sluice_cache_invalid_entries_total", "model" => model.to_string()).increment(entries);
    tracing::warn!(model, entries, "cache entries that are not valid answers were ignored and recomputed");
}
