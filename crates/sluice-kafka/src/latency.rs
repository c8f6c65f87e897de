//! Batching that holds a latency target by itself.
//!
//! With a target set (the model stages' live `latency_target_ms`), the batch
//! policy the batcher cuts by is no longer the configured one but one that
//! [`LatencyController`] moves within it: the configured `max_batch_size` and
//! `max_wait_ms` become its upper bounds. After each batch it is told how long
//! the batch's oldest event took from arrival (its record's Kafka timestamp:
//! the hop into the stage and any wait in the topic count) to its answer (the
//! stage returned), and how long the stage's call took. The oldest event's
//! time is the longest of the batch, so the p99 of those times bounds the
//! events' p99 from above.
//!
//! Every [`DECIDE_EVERY`] batches it looks at the p99 of the last
//! [`WINDOW`] batches since its last change (so that each decision judges the
//! policy in force) and moves additively up and multiplicatively down, as
//! TCP does with its window. Over the target, it looks at where the time
//! went:
//! - most batches waiting for the stage (a backlog: each was already cut when
//!   the stage was free for it) and a p99 in the stage (from the batcher) of
//!   over [`QUEUED_CALLS`] calls: the time went to queueing. More arrives
//!   than the policy serves, and a smaller batch would serve less and
//!   lengthen the queue (a collapse, seen in `sluice bench traffic`): the cap
//!   grows by an eighth towards its bound and the wait goes straight back to
//!   its bound instead, for throughput;
//! - otherwise, calls that take half the target or more: the calls take the
//!   time, and the cap and the wait shrink by a quarter;
//! - otherwise (short calls, no queue): what the policy adds is the wait,
//!   which shrinks by a quarter; the cap stays for the next burst.
//!
//! Well under the target with a backlog (larger batches would raise
//! throughput), the cap grows by an eighth, and the wait grows back towards
//! its bound. Each change says why.

use std::collections::VecDeque;
use std::time::Duration;

use serde::Serialize;

use crate::BatchPolicy;

/// Batches whose times make the p99.
pub const WINDOW: usize = 100;
/// Batches between two decisions.
pub const DECIDE_EVERY: usize = 16;
/// Under this share of the target, with a backlog, the cap grows.
const HEADROOM: f64 = 0.8;
/// With a backlog, an oldest event waits for about the call before its own
/// and its own (two or three calls): a p99 over this many calls is queueing,
/// which a smaller batch would lengthen.
const QUEUED_CALLS: u32 = 4;
/// Without a backlog, calls of at least this share of the target are too
/// slow by themselves.
const SLOW_CALL: f64 = 0.5;

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

/// What the controller is told of each batch.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Observed {
    /// The oldest event's time from arrival (its record's Kafka timestamp) to its answer.
    pub took: Duration,
    /// The same from its arrival at the batcher: the part spent in the stage.
    pub in_stage: Duration,
    /// The stage's call on the batch.
    pub call: Duration,
    /// The batch was already cut and waiting when the stage was free for it:
    /// events wait for the stage, not for the batch to fill (a backlog).
    pub waiting: bool,
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
    recent: VecDeque<Observed>,
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

    /// One batch. Returns the new policy when it decided to change it.
    pub fn observe(&mut self, batch: Observed) -> Option<Change> {
        if self.recent.len() == WINDOW {
            self.recent.pop_front();
        }
        self.recent.push_back(batch);
        self.since_decision += 1;
        if self.since_decision < DECIDE_EVERY {
            return None;
        }
        self.since_decision = 0;
        let p99_of = |of: fn(&Observed) -> Duration| {
            let mut times: Vec<Duration> = self.recent.iter().map(of).collect();
            times.sort_unstable();
            times[((times.len() as f64 * 0.99).ceil() as usize).saturating_sub(1)]
        };
        let (p99, in_stage) = (p99_of(|o| o.took), p99_of(|o| o.in_stage));
        self.p99 = Some(p99);
        let last = || self.recent.iter().rev().take(DECIDE_EVERY);
        let waiting = last().filter(|o| o.waiting).count();
        // Most of the last batches waited for the stage: events wait for the model.
        let backlog = waiting * 2 > DECIDE_EVERY.min(self.recent.len());
        let mut calls: Vec<Duration> = last().map(|o| o.call).collect();
        calls.sort_unstable();
        let call = calls[calls.len() / 2];
        let ms = |d: Duration| d.as_secs_f64() * 1e3;
        let (target, now) = (self.target, self.policy);
        let over = format!("p99 {:.1} ms is over the target {:.0} ms", ms(p99), ms(target));
        if p99 > target && backlog && in_stage > call * QUEUED_CALLS {
            let reason = format!(
                "{over} while batches wait for calls of {:.1} ms: the time goes to queueing, more arrives \
                 than the policy serves, and larger batches serve more",
                ms(call)
            );
            // The wait straight back to its bound: under a queue it costs
            // nothing (batches fill at once) and lets them fill past the
            // consumer's fetches.
            let next = BatchPolicy { max_wait_ms: self.bounds.max_wait_ms, ..self.grown() };
            return self.change(next, reason);
        }
        if p99 > target && call.as_secs_f64() >= SLOW_CALL * target.as_secs_f64() {
            // The calls are what takes the time: smaller batches.
            let next = BatchPolicy {
                max_batch_size: (now.max_batch_size * 3 / 4).max(1),
                max_wait_ms: now.max_wait_ms * 3 / 4,
            };
            return self.change(next, format!("{over} and calls take {:.1} ms", ms(call)));
        }
        if p99 > target {
            // What the policy adds is the wait (the hop before the stage is
            // not its doing); the cap is kept for bursts.
            let next = BatchPolicy { max_wait_ms: now.max_wait_ms * 3 / 4, ..now };
            return self.change(next, format!("{over} with calls of {:.1} ms: the wait shrinks", ms(call)));
        }
        let roomy = p99.as_secs_f64() < HEADROOM * target.as_secs_f64();
        // With a backlog, a larger batch would serve it faster.
        if roomy && backlog {
            let reason = format!(
                "p99 {:.1} ms is under {:.0}% of the target {:.0} ms and batches wait for the stage",
                ms(p99),
                HEADROOM * 100.0,
                ms(target)
            );
            return self.change(self.grown(), reason);
        }
        None
    }

    /// The cap an eighth larger and the wait back towards its bound (a
    /// backlog fills a batch within the wait, and a larger one serves more).
    fn grown(&self) -> BatchPolicy {
        let now = self.policy;
        BatchPolicy {
            max_batch_size: (now.max_batch_size + now.max_batch_size.div_ceil(8))
                .min(self.bounds.max_batch_size.max(1)),
            max_wait_ms: (now.max_wait_ms + now.max_wait_ms.div_ceil(8).max(1)).min(self.bounds.max_wait_ms),
        }
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

    /// A model whose batch takes 1 ms plus 0.1 ms per event.
    fn call(size: usize) -> Duration {
        Duration::from_micros(1_000 + 100 * size as u64)
    }

    /// A batch of `size`: one that fills the cap models a backlog (it was
    /// waiting for the stage); a smaller one was cut by the wait.
    fn full(size: usize, c: &LatencyController, took: Duration, call: Duration) -> Observed {
        Observed { took, in_stage: took, call, waiting: size >= c.policy().max_batch_size }
    }

    /// The oldest event of a full batch waited about as long as the batch
    /// before it took.
    fn took(size: usize) -> Duration {
        call(size) * 2
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
            if let Some(change) = c.observe(full(size, &c, took(size), call(size))) {
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
            c.observe(full(size, &c, took(size), call(size)));
        }
        assert_eq!(c.policy(), bounds(), "back at the configured bounds");
    }

    #[test]
    fn over_the_target_with_batches_cut_by_the_wait_only_the_wait_shrinks() {
        let mut c = LatencyController::new(Duration::from_millis(30), bounds());
        let mut changes = Vec::new();
        // Light load: batches of 3 cut by the wait, whose whole length the
        // oldest event waited, and the broker's hop of 15 ms before it.
        for _ in 0..500 {
            let p = c.policy();
            let took = Duration::from_millis(15 + p.max_wait_ms) + call(3);
            changes.extend(c.observe(full(3, &c, took, call(3))));
        }
        assert_eq!(c.policy().max_batch_size, 512, "the cap cut no batch: kept for bursts ({changes:?})");
        assert!(c.policy().max_wait_ms <= 14, "{:?}", c.policy());
        assert!(changes.iter().all(|c| c.reason.contains("the wait shrinks")), "{changes:?}");
    }

    #[test]
    fn batches_that_are_not_full_leave_the_policy_alone() {
        let mut c = LatencyController::new(Duration::from_millis(500), bounds());
        c.set_bounds(BatchPolicy { max_batch_size: 64, max_wait_ms: 20 });
        c.set_bounds(bounds());
        let before = c.policy();
        for _ in 0..500 {
            assert_eq!(c.observe(full(3, &c, took(3), call(3))), None, "low load: nothing to gain from larger batches");
        }
        assert_eq!(c.policy(), before);
    }

    /// More arrives than any batch size serves: every event also queues for
    /// the batches ahead of it (a second's worth), whatever the size.
    #[test]
    fn overloaded_with_short_calls_the_cap_grows_instead_of_shrinking() {
        let mut c = LatencyController::new(Duration::from_millis(200), bounds());
        c.set_bounds(BatchPolicy { max_batch_size: 64, max_wait_ms: 20 });
        c.set_bounds(bounds());
        let mut changes = Vec::new();
        for _ in 0..2000 {
            let size = c.policy().max_batch_size;
            changes.extend(c.observe(full(size, &c, Duration::from_secs(1) + call(size), call(size))));
        }
        assert_eq!(c.policy(), bounds(), "throughput first: {changes:?}");
        assert!(changes[0].reason.contains("more arrives than the policy serves"), "{:?}", changes[0]);
        // Without the queue, calls that take the time still shrink the cap.
        let mut c = LatencyController::new(Duration::from_millis(50), bounds());
        for _ in 0..DECIDE_EVERY {
            c.observe(full(512, &c, Duration::from_millis(100), Duration::from_millis(40)));
        }
        assert_eq!(c.policy().max_batch_size, 384);
    }
}
