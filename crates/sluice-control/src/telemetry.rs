//! The control plane's metrics and logs, in one place: each function writes
//! the log line and bumps the metrics of one happening together (names and
//! labels: docs/instrumentation.md).

use std::time::Duration;

use metrics::{counter, gauge, histogram};

use crate::overrides::Refusal;

/// Creates the refusal counters at 0, so that an alert on `increase()` sees
/// the first refusal of each field.
pub(crate) fn refusals_at_zero(fields: impl Iterator<Item = &'static str>) {
    for field in fields {
        counter!("sluice_overrides_refused_total", "field" => field).increment(0);
    }
}

/// `label` is the field's own name, `unknown` or `*` (a key that is not a hash).
pub(crate) fn override_refused(refusal: &Refusal, label: &str) {
    counter!("sluice_overrides_refused_total", "field" => label.to_string()).increment(1);
    tracing::warn!(
        key = refusal.key,
        field = refusal.field,
        value = refusal.value,
        reason = refusal.reason,
        "override refused; the last good value is kept"
    );
}

pub(crate) fn override_applied(field: &'static str, value: &str) {
    counter!("sluice_overrides_applied_total", "field" => field).increment(1);
    tracing::info!(field, value, "override applied");
}

/// A setting in force, for the scope `label` (a model's name, or `writer`).
pub(crate) fn setting(label: &str, field: &'static str, value: f64) {
    gauge!("sluice_setting", "model" => label.to_string(), "field" => field).set(value);
}

pub(crate) fn cache_cleared(epoch: Option<u64>) {
    match epoch {
        Some(epoch) => tracing::info!(epoch, "cache cleared by an operator"),
        None => tracing::info!("cache cleared by an operator"),
    }
}

pub(crate) fn redis_slow(budget: Duration) {
    counter!("sluice_redis_slow_calls_total").increment(1);
    tracing::debug!(?budget, "a redis call got no answer within its budget (counted as slow, not an outage)");
}

/// A link to Redis is made: up until a call fails (as `RedisLink::is_up`
/// says), so that dashboards and alerts see the series from the start.
pub(crate) fn redis_link_created() {
    gauge!("sluice_redis_up").set(1.0);
    counter!("sluice_redis_outages_total").increment(0);
}

/// An outage begins (reported once, not once per call).
pub(crate) fn redis_down(error: &str) {
    tracing::warn!(error, "redis is unreachable: keeping the last good settings, cache lookups miss");
    counter!("sluice_redis_outages_total").increment(1);
    gauge!("sluice_redis_up").set(0.0);
}

pub(crate) fn redis_back() {
    tracing::info!("redis is reachable again");
    gauge!("sluice_redis_up").set(1.0);
}

pub(crate) fn cache_evicted() {
    counter!("sluice_cache_evictions_total").increment(1);
}

/// One batch's look-up in one tier.
pub(crate) fn cache_counted(tier: &'static str, hits: u64, misses: u64) {
    counter!("sluice_cache_hits_total", "tier" => tier).increment(hits);
    counter!("sluice_cache_misses_total", "tier" => tier).increment(misses);
}

pub(crate) fn cache_lookup(took: Duration) {
    histogram!("sluice_cache_lookup_seconds").record(took.as_secs_f64());
}

pub(crate) fn cache_size(entries: usize, bytes: usize) {
    gauge!("sluice_cache_entries").set(entries as f64);
    gauge!("sluice_cache_bytes").set(bytes as f64);
}

/// Creates a model's decision counters at 0, so that an alert on
/// `increase()` sees its first rollback.
pub(crate) fn rollout_decisions_at_zero(model: &str) {
    for decision in ["promoted", "rolled_back"] {
        counter!("sluice_rollout_decisions_total", "model" => model.to_string(), "decision" => decision).increment(0);
    }
}

/// A replica sees a rollout start, or be decided (by another replica or a person).
pub(crate) fn rollout_seen(r: &crate::rollout::Rollout) {
    tracing::info!(
        model = r.model,
        rollout = r.id,
        candidate = r.candidate,
        phase = r.phase.name(),
        shadow = r.shadow,
        canary = r.canary,
        "following the model's rollout"
    );
}

/// The shares in force (0 with no rollout running).
pub(crate) fn rollout_shares(model: &str, running: Option<&crate::rollout::Rollout>) {
    let (canary, shadow) = running.map_or((0.0, 0.0), |r| (r.canary, r.shadow));
    gauge!("sluice_rollout_canary_share", "model" => model.to_string()).set(canary);
    gauge!("sluice_rollout_shadow_share", "model" => model.to_string()).set(shadow);
}

/// The running rollout's tally, summed over every replica.
pub(crate) fn rollout_tally(model: &str, sum: &crate::rollout::Tally) {
    gauge!("sluice_rollout_compared", "model" => model.to_string()).set(sum.compared as f64);
    gauge!("sluice_rollout_candidate_errors", "model" => model.to_string()).set(sum.errors as f64);
}

/// The canary share stepped by the schedule.
pub(crate) fn rollout_stepped(r: &crate::rollout::Rollout) {
    tracing::info!(model = r.model, rollout = r.id, canary = r.canary, "rollout stepped: the canary share is raised");
}

/// This replica took the rollout's decision (logged and counted once, by the replica that took it).
pub(crate) fn rollout_decided(r: &crate::rollout::Rollout) {
    use crate::rollout::Phase;
    let decision = r.phase.name();
    counter!("sluice_rollout_decisions_total", "model" => r.model.clone(), "decision" => decision).increment(1);
    match &r.phase {
        Phase::Promoted { figures, .. } => {
            tracing::info!(model = r.model, rollout = r.id, candidate = r.candidate, figures, "rollout promoted");
        }
        Phase::RolledBack { gate, figures, .. } => tracing::warn!(
            model = r.model,
            rollout = r.id,
            candidate = r.candidate,
            gate,
            figures,
            "rollout rolled back: the serving version stays"
        ),
        Phase::Running | Phase::Aborted { .. } => {}
    }
}
