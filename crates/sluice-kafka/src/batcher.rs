//! Size-or-deadline batching.
//!
//! A batch is cut when it holds `max_batch_size` items, or when `max_wait` has
//! passed since its **oldest** item arrived, whichever comes first. Timing from
//! the oldest item (not from the last cut) bounds every item's wait by
//! `max_wait`; timing from the last cut lets an item that arrives just before a
//! cut wait almost twice as long. A batch cut at its deadline also takes what
//! has already arrived (up to the size limit), so `max_wait = 0` means "cut at
//! once with whatever is there". The policy can change at run time; a new one
//! applies from the next cut.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

/// When to cut a batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BatchPolicy {
    /// Cut as soon as this many items wait. At least 1.
    pub max_batch_size: usize,
    /// Cut when the oldest waiting item has waited this long (ms).
    pub max_wait_ms: u64,
}

impl BatchPolicy {
    pub fn max_wait(&self) -> Duration {
        Duration::from_millis(self.max_wait_ms)
    }

    /// A policy that never changes, as the receiver the runtime takes.
    pub fn fixed(self) -> watch::Receiver<Self> {
        watch::channel(self).1
    }
}

/// A cut batch: never empty, in arrival order.
#[derive(Debug)]
pub struct Batch<T> {
    pub items: Vec<T>,
    /// How long the oldest item waited before the cut.
    pub waited: Duration,
    /// When it was cut.
    pub cut_at: Instant,
}

impl<T> Batch<T> {
    /// How long its oldest item has been in the stage, from its arrival at
    /// the batcher until now.
    pub fn oldest_age(&self) -> Duration {
        self.waited + self.cut_at.elapsed()
    }
}

/// The batching state machine, free of I/O so that it can be tested alone.
#[derive(Debug)]
pub struct Batcher<T> {
    items: Vec<T>,
    oldest: Option<Instant>,
    policy: BatchPolicy,
}

impl<T> Batcher<T> {
    pub fn new(policy: BatchPolicy) -> Self {
        Self { items: Vec::with_capacity(policy.max_batch_size.max(1)), oldest: None, policy }
    }

    /// Adds an item; returns a batch if this item completed one.
    pub fn push(&mut self, item: T, now: Instant) -> Option<Batch<T>> {
        self.oldest.get_or_insert(now);
        self.items.push(item);
        if self.due(now) { self.take(now) } else { None }
    }

    /// When the waiting items must be cut at the latest, if any wait.
    pub fn deadline(&self) -> Option<Instant> {
        self.oldest.map(|oldest| oldest + self.policy.max_wait())
    }

    /// Cuts whatever waits (at a deadline, or on shutdown). `None` if nothing does.
    pub fn take(&mut self, now: Instant) -> Option<Batch<T>> {
        let oldest = self.oldest.take()?;
        let items = std::mem::replace(&mut self.items, Vec::with_capacity(self.policy.max_batch_size.max(1)));
        Some(Batch { items, waited: now.saturating_duration_since(oldest), cut_at: now })
    }

    /// Applies a new policy; cuts at once if the waiting items already meet it.
    pub fn set_policy(&mut self, policy: BatchPolicy, now: Instant) -> Option<Batch<T>> {
        self.policy = policy;
        if self.due(now) { self.take(now) } else { None }
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    fn due(&self, now: Instant) -> bool {
        !self.items.is_empty()
            && (self.items.len() >= self.policy.max_batch_size.max(1) || self.deadline().is_some_and(|d| now >= d))
    }
}

/// Drives a [`Batcher`]: items in from `input`, batches out to `output`.
///
/// Returns when `input` closes (after cutting what waits: nothing is dropped on
/// shutdown) or when `output` closes. `output` is bounded: while the consumer of
/// batches is busy, this task blocks, `input` fills up, and consumption pauses.
pub async fn run_batcher<T>(
    mut input: mpsc::Receiver<T>,
    output: mpsc::Sender<Batch<T>>,
    mut policy: watch::Receiver<BatchPolicy>,
) {
    let mut batcher = Batcher::new(*policy.borrow_and_update());
    loop {
        let deadline = batcher.deadline();
        let cut = tokio::select! {
            item = input.recv() => match item {
                Some(item) => batcher.push(item, Instant::now()),
                None => {
                    if let Some(batch) = batcher.take(Instant::now()) {
                        let _ = output.send(batch).await;
                    }
                    return;
                }
            },
            () = sleep_until(deadline) => batcher.take(Instant::now()),
            Ok(()) = policy.changed() => {
                let new = *policy.borrow_and_update();
                batcher.set_policy(new, Instant::now())
            }
        };
        if let Some(mut batch) = cut {
            top_up(&mut batch, &mut input, batcher.policy.max_batch_size.max(1));
            if output.send(batch).await.is_err() {
                return;
            }
        }
    }
}

/// Adds to a batch cut at its deadline what has already arrived, up to the
/// size limit. Those items waited less than the oldest, so every wait stays
/// within `max_wait`; and a short `max_wait` (even 0) still gives a busy stage
/// full batches instead of one-item ones, while an idle one cuts at once.
fn top_up<T>(batch: &mut Batch<T>, input: &mut mpsc::Receiver<T>, max_batch_size: usize) {
    while batch.items.len() < max_batch_size {
        match input.try_recv() {
            Ok(item) => batch.items.push(item),
            Err(_) => break,
        }
    }
}

async fn sleep_until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: BatchPolicy = BatchPolicy { max_batch_size: 4, max_wait_ms: 50 };

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn cuts_at_size() {
        let t0 = Instant::now();
        let mut b = Batcher::new(POLICY);
        for i in 0..3 {
            assert!(b.push(i, t0).is_none());
        }
        let batch = b.push(3, t0).expect("a full batch");
        assert_eq!(batch.items, vec![0, 1, 2, 3]);
        assert!(b.is_empty() && b.deadline().is_none());
    }

    #[test]
    fn deadline_is_timed_from_the_oldest_item() {
        let t0 = Instant::now();
        let mut b = Batcher::new(POLICY);
        b.push(1, t0);
        b.push(2, t0 + ms(30));
        assert_eq!(b.deadline(), Some(t0 + ms(50)), "a later item must not push the deadline back");
        let batch = b.take(t0 + ms(50)).expect("due");
        assert_eq!((batch.items, batch.waited), (vec![1, 2], ms(50)));
        // The next deadline starts at the next item, not at the cut.
        b.push(3, t0 + ms(70));
        assert_eq!(b.deadline(), Some(t0 + ms(120)));
    }

    #[test]
    fn never_cuts_an_empty_batch() {
        let mut b: Batcher<u8> = Batcher::new(POLICY);
        assert!(b.take(Instant::now()).is_none());
        assert!(b.set_policy(BatchPolicy { max_batch_size: 1, max_wait_ms: 0 }, Instant::now()).is_none());
    }

    #[test]
    fn a_smaller_policy_cuts_what_already_meets_it() {
        let t0 = Instant::now();
        let mut b = Batcher::new(POLICY);
        b.push(1, t0);
        b.push(2, t0);
        let batch = b.set_policy(BatchPolicy { max_batch_size: 2, max_wait_ms: 50 }, t0).expect("due");
        assert_eq!(batch.items, vec![1, 2]);
    }

    async fn collect(mut rx: mpsc::Receiver<Batch<u32>>) -> Vec<(Vec<u32>, Duration)> {
        let mut out = Vec::new();
        while let Some(b) = rx.recv().await {
            out.push((b.items, b.waited));
        }
        out
    }

    #[tokio::test(start_paused = true)]
    async fn driver_cuts_at_the_deadline_from_the_oldest_item() {
        let (in_tx, in_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(16);
        let driver = tokio::spawn(run_batcher(in_rx, out_tx, POLICY.fixed()));
        let start = Instant::now();
        in_tx.send(1).await.expect("send");
        tokio::time::sleep(ms(30)).await;
        in_tx.send(2).await.expect("send");
        tokio::time::sleep(ms(40)).await; // t = 70: the first batch was cut at 50
        in_tx.send(3).await.expect("send");
        tokio::time::sleep(ms(100)).await;
        drop(in_tx);
        driver.await.expect("driver");
        let batches = collect(out_rx).await;
        assert_eq!(batches, vec![(vec![1, 2], ms(50)), (vec![3], ms(50))]);
        assert!(start.elapsed() >= ms(170));
    }

    #[tokio::test(start_paused = true)]
    async fn driver_flushes_on_shutdown_and_keeps_order() {
        let (in_tx, in_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(16);
        let driver = tokio::spawn(run_batcher(in_rx, out_tx, POLICY.fixed()));
        for i in 0..10 {
            in_tx.send(i).await.expect("send");
        }
        drop(in_tx); // shutdown long before the deadline
        driver.await.expect("driver");
        let batches = collect(out_rx).await;
        let sizes: Vec<usize> = batches.iter().map(|(b, _)| b.len()).collect();
        assert_eq!(sizes, vec![4, 4, 2], "cut at size, the rest flushed on shutdown, none empty");
        let order: Vec<u32> = batches.into_iter().flat_map(|(b, _)| b).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn a_deadline_cut_takes_what_has_already_arrived() {
        let (in_tx, in_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(16);
        for i in 0..10 {
            in_tx.send(i).await.expect("send");
        }
        // No wait at all: each cut is due with its first item, and takes the
        // queued ones with it instead of leaving them for one-item batches.
        let policy = BatchPolicy { max_batch_size: 4, max_wait_ms: 0 };
        let driver = tokio::spawn(run_batcher(in_rx, out_tx, policy.fixed()));
        drop(in_tx);
        driver.await.expect("driver");
        let batches = collect(out_rx).await;
        let sizes: Vec<usize> = batches.iter().map(|(b, _)| b.len()).collect();
        assert_eq!(sizes, vec![4, 4, 2]);
        let order: Vec<u32> = batches.into_iter().flat_map(|(b, _)| b).collect();
        assert_eq!(order, (0..10).collect::<Vec<_>>());
    }

    #[tokio::test(start_paused = true)]
    async fn driver_applies_a_new_policy_to_the_next_cut() {
        let (in_tx, in_rx) = mpsc::channel(16);
        let (out_tx, out_rx) = mpsc::channel(16);
        let (policy_tx, policy_rx) = watch::channel(POLICY);
        let driver = tokio::spawn(run_batcher(in_rx, out_tx, policy_rx));
        in_tx.send(1).await.expect("send");
        tokio::task::yield_now().await;
        policy_tx.send(BatchPolicy { max_batch_size: 2, max_wait_ms: 1000 }).expect("policy");
        tokio::task::yield_now().await;
        in_tx.send(2).await.expect("send");
        in_tx.send(3).await.expect("send");
        in_tx.send(4).await.expect("send");
        drop(in_tx);
        driver.await.expect("driver");
        let sizes: Vec<usize> = collect(out_rx).await.iter().map(|(b, _)| b.len()).collect();
        assert_eq!(sizes, vec![2, 2]);
    }
}
