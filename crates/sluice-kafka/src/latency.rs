//! Batching that holds a latency target by itself.
//!
//! With a target set (the model stages' live `latency_target_ms`), the batch
//! policy the batcher cuts by is no longer the configured one but one that
//! [`LatencyController`] moves within it: the configured `max_batch_size` and
//! `max_wait_ms` become its upper bounds. After each batch it is told how long
//! the batch's oldest event took from arrival (when the runtime consumed it)
//! to its answer (the stage returned); that is the longest time of any event
//! of the batch, so the p99 of those times bounds the events' p99 from above.
//!
//! Every [`DECIDE_EVERY`] batches it looks at the p99 of the last
//! [`WINDOW`] batches since its last change (so that each decision judges the
//! policy in force) and moves additively up and multiplicatively down, as
//! TCP does with its window: over the target, the cap and the wait shrink by
//! a quarter at once; well under it while batches come out full (a backlog:
//! larger batches would raise throughput), the cap grows by an eighth, and
//! the wait grows back towards its bound. Each change says why.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::BatchPolicy;

/// Batches whose times make the p99.
pub const WINDOW: usize = 100;
/// Batches between two decisions.
pub const DECIDE_EVERY: usize = 16;
/// Under this share of the target, with full batches, the cap grows.
const HEADROOM: f64 = 0.8;

/// What the controller did last, for `/status`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ControllerState {
    pub target_ms: u64,
    /// The policy in force.
    pub max_batch_size: usize,
    pub max_wait_ms: u64,
    /// The p99 of the window at the last decision (ms), if there was one.
    pub p99_ms: Option<f64>,
    /// Why the policy last changed.
    pub last_change: Option<String>,
}

/// A change of the policy, and why.
#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub policy: BatchPolicy,
    pub reason: String,
}

#[derive(Debug)]
pub struct LatencyController {
    target: Duration,
    bounds: BatchPolicy,
    policy: BatchPolicy,
    /// (oldest event's time to answer, whether the batch was full).
    recent: VecDeque<(Duration, bool)>,
    since_decision: usize,
    p99: Option<Duration>,
    last_change: Option<String>,
}

impl LatencyController {
    /// Starts at the bounds: the configured policy, until it proves too slow.
    pub fn new(target: Duration, bounds: BatchPolicy) -> Self {
        Self {
            target,
            bounds,
            policy: bounds,
            recent: VecDeque::with_capacity(WINDOW),
            since_decision: 0,
            p99: None,
            last_change: None,
        }
    }

    pub fn policy(&self) -> BatchPolicy {
        self.policy
    }

    /// New bounds (the configuration or an override changed): the policy is
    /// kept within them.
    pub fn set_bounds(&mut self, bounds: BatchPolicy) -> Option<Change> {
        self.bounds = bounds;
        let kept = BatchPolicy {
            max_batch_size: self.policy.max_batch_size.clamp(1, bounds.max_batch_size.max(1)),
            max_wait_ms: self.policy.max_wait_ms.min(bounds.max_wait_ms),
        };
        self.change(kept, format!("bounds are now {} events, {} ms", bounds.max_batch_size, bounds.max_wait_ms))
    }

    /// A new target: measured again from here.
    pub fn set_target(&mut self, target: Duration) {
        self.target = target;
        self.recent.clear();
        self.since_decision = 0;
    }

    pub fn state(&self) -> ControllerState {
        ControllerState {
            target_ms: self.target.as_millis() as u64,
            max_batch_size: self.policy.max_batch_size,
            max_wait_ms: self.policy.max_wait_ms,
            p99_ms: self.p99.map(|p| p.as_secs_f64() * 1e3),
            last_change: self.last_change.clone(),
        }
    }

    /// One batch of `size` events, whose oldest took `took` from arrival to
    /// its answer. Returns the new policy when it decided to change it.
    pub fn observe(&mut self, size: usize, took: Duration) -> Option<Change> {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back((took, size >= self.policy.max_batch_size));
        self.since_decision += 1;
        if self.since_decision < DECIDE_EVERY {
            return None;
        }
        self.since_decision = 0;
        let mut times: Vec<Duration> = self.recent.iter().map(|(t, _)| *t).collect();
        times.sort_unstable();
        let p99 = times[((times.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)];
        self.p99 = Some(p99);
        let full = self.recent.iter().rev().take(DECIDE_EVERY).filter(|(_, full)| *full).count();
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (target, now) = (self.target, self.policy);
        if p99 > target {
            let next = BatchPolicy {
                max_batch_size: (now.max_batch_size * 3 / 4).max(1),
                max_wait_ms: now.max_wait_ms * 3 / 4,
            };
            let reason = format!("p99 {:.1} ms is over the target {:.0} ms", ms(p99), ms(target));
            return self.change(next, reason);
        }
        let roomy = p99.as_secs_f64() < HEADROOM * target.as_secs_f64();
        // Most of the last batches full: events wait for the model, and a
        // larger batch would serve them faster.
        if roomy && full * 2 > DECIDE_EVERY.min(self.recent.len()) {
            let grown = (now.max_batch_size + now.max_batch_size.div_ceil(8)).min(self.bounds.max_batch_size.max(1));
            let wait = (now.max_wait_ms + now.max_wait_ms.div_ceil(8).max(1)).min(self.bounds.max_wait_ms);
            let next = BatchPolicy { max_batch_size: grown, max_wait_ms: wait };
            let reason = format!(
                "p99 {:.1} ms is under {:.0}% of the target {:.0} ms and batches are full",
                ms(p99),
                HEADROOM * 100.0,
                ms(target)
            );
            return self.change(next, reason);
        }
        None
    }

    fn change(&mut self, next: BatchPolicy, reason: String) -> Option<Change> {
        if next == self.policy {
            return None;
        }
        self.policy = next;
        self.last_change = Some(reason.clone());
        // The next decision judges the new policy alone.
        self.recent.clear();
        self.since_decision = 0;
        Some(Change { policy: next, reason })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A model whose batch takes 1 ms plus 0.1 ms per event; the oldest event
    /// of a full batch waited about as long as the batch before it took.
    fn took(size: usize) -> Duration {
        Duration::from_micros(1_000 + 100 * size as u64) * 2
    }

    fn bounds() -> BatchPolicy {
        BatchPolicy { max_batch_size: 512, max_wait_ms: 20 }
    }

    #[test]
    fn over_the_target_the_cap_shrinks_until_the_p99_is_under_it() {
        // 512 events: 2 * 52.2 ms, far over 30 ms; the largest size that meets it is 140.
        let mut c = LatencyController::new(Duration::from_millis(30), bounds());
        let mut changes = Vec::new();
        for _ in 0..2000 {
            let size = c.policy().max_batch_size;
            if let Some(change) = c.observe(size, took(size)) {
                changes.push(change);
            }
        }
        let size = c.policy().max_batch_size;
        assert!(took(size) <= Duration::from_millis(30), "settled at {size}: {:?}", took(size));
        assert!(size >= 140 * 3 / 4, "not far below the best size: {size}, {changes:?}");
        assert!(changes[0].reason.contains("over the target 30 ms"), "{:?}", changes[0]);
        assert!(c.state().p99_ms.is_some() && c.state().last_change.is_some());
    }

    #[test]
    fn well_under_the_target_with_full_batches_the_cap_grows_to_its_bound() {
        let mut c = LatencyController::new(Duration::from_millis(500), bounds());
        c.set_bounds(BatchPolicy { max_batch_size: 8, max_wait_ms: 2 });
        assert_eq!(c.policy(), BatchPolicy { max_batch_size: 8, max_wait_ms: 2 }, "kept within new bounds");
        c.set_bounds(bounds());
        for _ in 0..2000 {
            let size = c.policy().max_batch_size;
            c.observe(size, took(size));
        }
        assert_eq!(c.policy(), bounds(), "back at the configured bounds");
    }

    #[test]
    fn batches_that_are_not_full_leave_the_policy_alone() {
        let mut c = LatencyController::new(Duration::from_millis(500), bounds());
        c.set_bounds(BatchPolicy { max_batch_size: 64, max_wait_ms: 20 });
        c.set_bounds(bounds());
        let before = c.policy();
        for _ in 0..500 {
            assert_eq!(c.observe(3, took(3)), None, "low load: nothing to gain from larger batches");
        }
        assert_eq!(c.policy(), before);
    }
}
