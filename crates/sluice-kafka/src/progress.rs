//! Whether a stage keeps up, in seconds rather than messages: how long its
//! consumer lag would take to drain at the rate it has been acknowledging
//! (smoothed), and which of its partitions have had work waiting and made no
//! progress for a while (stalled).
//!
//! Lag comes from librdkafka's statistics (every 5 s, [`crate::lag`]);
//! progress from the runtime itself: the offsets it stores once a batch is
//! acknowledged. A [`Progress`] is looked at on a timer of its own, not when
//! statistics arrive, because a stuck stage stops polling its consumer and
//! with it the statistics: the last known lag then stays, nothing is stored,
//! and the partition is reported once `stall_after` has passed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::lag::PartitionLag;

/// The drain time reported while nothing is acknowledged but work waits (a
/// day): a finite number that autoscalers and alert rules can compare.
pub const DRAIN_SECONDS_CAP: f64 = 86_400.0;

/// One partition that has had lag and made no progress for at least the
/// stall time.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Stalled {
    pub topic: String,
    pub partition: i32,
    /// Messages waiting, at the last statistics reading.
    pub lag: i64,
    /// Since the partition last made progress (or was assigned, or had no lag).
    pub for_seconds: f64,
}

/// What one look found.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Reading {
    /// Messages waiting on the assigned partitions.
    pub lag: i64,
    /// Events acknowledged per second, smoothed over the window.
    pub rate: f64,
    /// `lag / rate`: 0 without lag, [`DRAIN_SECONDS_CAP`] at most.
    pub drain_seconds: f64,
    pub stalled: Vec<Stalled>,
}

#[derive(Debug)]
struct Partition {
    lag: i64,
    /// When it last made progress, had no lag, or was assigned.
    moved_at: Instant,
}

/// See the module documentation. Every method takes the time, for tests.
#[derive(Debug)]
pub(crate) struct Progress {
    /// The rate is an exponentially weighted mean with this time constant.
    window: Duration,
    stall_after: Duration,
    partitions: BTreeMap<(String, i32), Partition>,
    /// The last look: when, and the acknowledged count then.
    looked: Option<(Instant, u64)>,
    rate: Option<f64>,
}

impl Progress {
    pub(crate) fn new(window: Duration, stall_after: Duration) -> Self {
        Self { window, stall_after, partitions: BTreeMap::new(), looked: None, rate: None }
    }

    /// The partitions assigned now: those that left are forgotten, new ones
    /// start their clock.
    pub(crate) fn assigned(&mut self, now: Instant, assigned: impl IntoIterator<Item = (String, i32)>) {
        let mut kept = BTreeMap::new();
        for key in assigned {
            let partition = self.partitions.remove(&key).unwrap_or(Partition { lag: 0, moved_at: now });
            kept.insert(key, partition);
        }
        self.partitions = kept;
    }

    /// A statistics reading: each assigned partition's lag. A partition
    /// without lag has nothing to make progress on, so its clock restarts.
    pub(crate) fn lags(&mut self, now: Instant, lags: &[PartitionLag]) {
        for l in lags {
            if let Some(p) = self.partitions.get_mut(&(l.topic.clone(), l.partition)) {
                p.lag = l.lag;
                if l.lag == 0 {
                    p.moved_at = now;
                }
            }
        }
    }

    /// An offset stored on `partition` of `topic`: it made progress.
    pub(crate) fn progressed(&mut self, now: Instant, topic: &str, partition: i32) {
        if let Some(p) = self.partitions.get_mut(&(topic.to_string(), partition)) {
            p.moved_at = now;
        }
    }

    /// Looks, given how many events the stage has acknowledged so far.
    pub(crate) fn look(&mut self, now: Instant, acknowledged: u64) -> Reading {
        if let Some((then, before)) = self.looked {
            let elapsed = now.duration_since(then).as_secs_f64();
            if elapsed > 0.0 {
                let instant = acknowledged.saturating_sub(before) as f64 / elapsed;
                // A first look takes the rate as it is; later ones move towards
                // it by the share of the window that has passed.
                let weight = 1.0 - (-elapsed / self.window.as_secs_f64().max(1e-3)).exp();
                self.rate = Some(self.rate.map_or(instant, |rate| rate + weight * (instant - rate)));
            }
        }
        self.looked = Some((now, acknowledged));
        let lag: i64 = self.partitions.values().map(|p| p.lag).sum();
        let rate = self.rate.unwrap_or(0.0);
        let drain_seconds = match (lag, rate) {
            (0, _) => 0.0,
            (_, r) if r > 0.0 => (lag as f64 / r).min(DRAIN_SECONDS_CAP),
            _ => DRAIN_SECONDS_CAP,
        };
        let stalled = self
            .partitions
            .iter()
            .filter(|(_, p)| p.lag > 0 && now.duration_since(p.moved_at) >= self.stall_after)
            .map(|((topic, partition), p)| Stalled {
                topic: topic.clone(),
                partition: *partition,
                lag: p.lag,
                for_seconds: now.duration_since(p.moved_at).as_secs_f64(),
            })
            .collect();
        Reading { lag, rate, drain_seconds, stalled }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(partition: i32, lag: i64) -> PartitionLag {
        PartitionLag { topic: "in".into(), partition, lag }
    }

    #[test]
    fn the_drain_time_is_the_lag_over_the_smoothed_rate() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut progress = Progress::new(Duration::from_secs(60), Duration::from_secs(60));
        progress.assigned(at(0), [("in".into(), 0), ("in".into(), 1)]);
        assert_eq!(progress.look(at(0), 0).drain_seconds, 0.0, "no lag: nothing to drain");
        progress.lags(at(5), &[lag(0, 600), lag(1, 400)]);
        let first = progress.look(at(10), 1000);
        assert_eq!((first.lag, first.rate, first.drain_seconds), (1000, 100.0, 10.0));
        // Half the rate for 10 s: the smoothed rate falls by 1 - e^(-10/60) of the gap.
        let second = progress.look(at(20), 1500);
        let rate = 100.0 - (1.0 - (-10.0f64 / 60.0).exp()) * 50.0;
        assert!((second.rate - rate).abs() < 1e-9, "{second:?}");
        assert!((second.drain_seconds - 1000.0 / rate).abs() < 1e-9);
        // Nothing acknowledged for long: the rate decays, the drain time is capped.
        let stuck = progress.look(at(20 + 3600), 1500);
        assert_eq!(stuck.drain_seconds, DRAIN_SECONDS_CAP);
    }

    #[test]
    fn a_partition_with_lag_and_no_progress_for_the_stall_time_is_stalled() {
        let start = Instant::now();
        let at = |s: u64| start + Duration::from_secs(s);
        let mut progress = Progress::new(Duration::from_secs(60), Duration::from_secs(30));
        progress.assigned(at(0), [("in".into(), 0), ("in".into(), 1), ("in".into(), 2)]);
        progress.lags(at(5), &[lag(0, 10), lag(1, 10), lag(2, 0)]);
        progress.progressed(at(20), "in", 1);
        assert!(progress.look(at(29), 0).stalled.is_empty(), "not yet 30 s");
        let stalled = progress.look(at(35), 0).stalled;
        assert_eq!(stalled, vec![Stalled { topic: "in".into(), partition: 0, lag: 10, for_seconds: 35.0 }]);
        // Progress, or no lag left, ends it; a partition that moved away is forgotten.
        progress.progressed(at(36), "in", 0);
        progress.lags(at(40), &[lag(1, 0)]);
        assert!(progress.look(at(60), 0).stalled.is_empty());
        progress.assigned(at(61), [("in".into(), 1)]);
        progress.lags(at(62), &[lag(0, 5), lag(1, 3)]);
        let left = progress.look(at(200), 0);
        assert_eq!((left.lag, left.stalled.len(), left.stalled[0].partition), (3, 1, 1));
    }
}
