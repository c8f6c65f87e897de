//! Lanes: live work before bulk.
//!
//! With lanes on, a stage reads its input topic (the live lane) and that
//! topic's bulk twin (`{input}{suffix}`, the bulk lane). Each lane has its own
//! queue and batcher, so a bulk backlog never stands in front of a live event;
//! the process loop takes live batches first, while bulk keeps a guaranteed
//! share: one batch in `bulk_share` whenever both lanes have one waiting
//! ([`Picker`]). The outputs of a bulk input go to the bulk twins of their
//! topics (the user-facing predictions and the dead letters have none).
//!
//! Backpressure stays in Kafka: when the bulk queue is full, the consume loop
//! keeps the message it could not queue, pauses the bulk partitions (live
//! records keep flowing) and resumes them once the queue is half free again
//! ([`BulkIntake`]).

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;

use rdkafka::TopicPartitionList;
use rdkafka::consumer::{Consumer, ConsumerContext, StreamConsumer};
use sluice_core::Incoming;
use tokio::sync::{mpsc, watch};

use crate::batcher::Batch;
use crate::runtime::{ByteBudget, Held};

/// Which lane an input travels in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lane {
    Live,
    Bulk,
}

impl Lane {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Live => "live",
            Self::Bulk => "bulk",
        }
    }

    fn index(self) -> usize {
        match self {
            Self::Live => 0,
            Self::Bulk => 1,
        }
    }
}

/// How a stage with lanes reads and routes.
#[derive(Debug, Clone)]
pub struct Lanes {
    /// Appended to a topic's name to name its bulk twin.
    pub suffix: String,
    /// The output topics that have a bulk twin: a bulk input's outputs to
    /// these go to their twins instead.
    pub twinned: Vec<String>,
    /// While both lanes have a batch waiting, one batch in this many is bulk
    /// (at least 2). A new value applies from the next pick.
    pub bulk_share: watch::Receiver<u64>,
}

/// The bulk twin of `topic`: `{topic}{suffix}`.
pub fn twin(topic: &str, suffix: &str) -> String {
    format!("{topic}{suffix}")
}

impl Lanes {
    /// The bulk twin of `topic`.
    pub fn twin(&self, topic: &str) -> String {
        twin(topic, &self.suffix)
    }

    /// Each twinned topic with its twin, for routing.
    pub(crate) fn routes(&self) -> HashMap<Arc<str>, Arc<str>> {
        self.twinned.iter().map(|t| (Arc::from(t.as_str()), Arc::from(self.twin(t).as_str()))).collect()
    }
}

/// Which lane's batch goes next: live, unless bulk is owed its share.
#[derive(Debug, Default, Clone)]
pub struct Picker {
    /// Live batches taken since the last bulk one.
    since_bulk: u64,
}

impl Picker {
    /// The lane to take from, given which have a batch waiting; `None` when neither does.
    pub fn pick(&self, live: bool, bulk: bool, share: u64) -> Option<Lane> {
        match (live, bulk) {
            (true, true) if self.since_bulk + 1 >= share.max(2) => Some(Lane::Bulk),
            (true, _) => Some(Lane::Live),
            (false, true) => Some(Lane::Bulk),
            (false, false) => None,
        }
    }

    /// Records that a batch of `lane` was taken.
    pub fn took(&mut self, lane: Lane) {
        match lane {
            Lane::Live => self.since_bulk = self.since_bulk.saturating_add(1),
            Lane::Bulk => self.since_bulk = 0,
        }
    }
}

/// The cut batches of both lanes, as the process loop takes them. Without
/// lanes, only the live one is open.
pub(crate) struct Queue<T> {
    lanes: [Option<mpsc::Receiver<Batch<T>>>; 2],
    /// A batch received (or taken and given back) but not yet taken, per lane.
    heads: [Option<Batch<T>>; 2],
    picker: Picker,
    share: Option<watch::Receiver<u64>>,
}

impl<T> Queue<T> {
    pub(crate) fn new(
        live: mpsc::Receiver<Batch<T>>,
        bulk: Option<(mpsc::Receiver<Batch<T>>, watch::Receiver<u64>)>,
    ) -> Self {
        let (bulk, share) = bulk.unzip();
        Self { lanes: [Some(live), bulk], heads: [None, None], picker: Picker::default(), share }
    }

    /// Receives what has been cut, without waiting, into empty heads.
    fn fill(&mut self) {
        for (lane, head) in self.lanes.iter_mut().zip(self.heads.iter_mut()) {
            if head.is_none()
                && let Some(receiver) = lane
            {
                match receiver.try_recv() {
                    Ok(batch) => *head = Some(batch),
                    Err(mpsc::error::TryRecvError::Empty) => {}
                    Err(mpsc::error::TryRecvError::Disconnected) => *lane = None,
                }
            }
        }
    }

    /// The batch that goes next, where one is already cut (see [`Picker`]).
    /// It counts as taken only after [`Queue::took`].
    pub(crate) fn try_next(&mut self) -> Option<(Lane, Batch<T>)> {
        self.fill();
        let share = self.share.as_ref().map_or(u64::MAX, |s| *s.borrow());
        let lane = self.picker.pick(self.heads[0].is_some(), self.heads[1].is_some(), share)?;
        self.heads[lane.index()].take().map(|batch| (lane, batch))
    }

    /// As [`Queue::try_next`], waiting for a batch; `None` once both lanes are closed.
    pub(crate) async fn next(&mut self) -> Option<(Lane, Batch<T>)> {
        loop {
            if let Some(next) = self.try_next() {
                return Some(next);
            }
            let [live, bulk] = &mut self.lanes;
            let (lane, received) = match (live.as_mut(), bulk.as_mut()) {
                (None, None) => return None,
                (Some(live), None) => (Lane::Live, live.recv().await),
                (None, Some(bulk)) => (Lane::Bulk, bulk.recv().await),
                (Some(live), Some(bulk)) => tokio::select! {
                    biased;
                    batch = live.recv() => (Lane::Live, batch),
                    batch = bulk.recv() => (Lane::Bulk, batch),
                },
            };
            match received {
                Some(batch) => self.heads[lane.index()] = Some(batch),
                None => self.lanes[lane.index()] = None,
            }
        }
    }

    /// Gives back a batch returned by [`Queue::try_next`] and not taken (a
    /// look-ahead that a live batch cut since must now go before).
    pub(crate) fn give_back(&mut self, lane: Lane, batch: Batch<T>) {
        debug_assert!(self.heads[lane.index()].is_none(), "one batch given back per lane");
        self.heads[lane.index()] = Some(batch);
    }

    /// Records that the process loop started on a batch of `lane`.
    pub(crate) fn took(&mut self, lane: Lane) {
        self.picker.took(lane);
    }
}

/// The consume loop's side of the bulk lane: queues a bulk message if there
/// is room (in the queue and in the lane's byte budget), and otherwise keeps
/// it and pauses the bulk partitions until the queue is half free.
pub(crate) struct BulkIntake {
    pub(crate) topic: Arc<str>,
    items: mpsc::Sender<Held>,
    capacity: usize,
    budget: ByteBudget,
    /// Consumed while the queue was full, in order; queued before anything newer.
    parked: VecDeque<Incoming>,
    paused: bool,
}

/// What [`BulkIntake::try_queue`] did with a message.
enum TryQueue {
    Queued,
    /// No room: the message back.
    Full(Incoming),
    /// The batcher is gone (shutdown).
    Closed,
}

/// What [`BulkIntake`] did.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum BulkEvent {
    Queued,
    /// The queue was full: the bulk partitions are paused from now on.
    Paused,
    /// Kept while paused.
    Parked,
    /// Resumed: the queue is half free and nothing is kept.
    Resumed,
    /// The batcher is gone (shutdown).
    Closed,
}

impl BulkIntake {
    /// `budget`: the lane's own, so that bulk records never hold what live ones need.
    pub(crate) fn new(topic: Arc<str>, items: mpsc::Sender<Held>, budget: ByteBudget) -> Self {
        Self { topic, capacity: items.max_capacity(), items, budget, parked: VecDeque::new(), paused: false }
    }

    pub(crate) fn paused(&self) -> bool {
        self.paused
    }

    /// Queues a bulk message, or keeps it and pauses the bulk partitions.
    pub(crate) fn offer<C: ConsumerContext>(&mut self, incoming: Incoming, consumer: &StreamConsumer<C>) -> BulkEvent {
        if self.parked.is_empty() {
            match self.try_queue(incoming) {
                TryQueue::Queued => return BulkEvent::Queued,
                TryQueue::Closed => return BulkEvent::Closed,
                TryQueue::Full(incoming) => self.parked.push_back(incoming),
            }
        } else {
            self.parked.push_back(incoming);
        }
        // Again when already paused: a bulk record that still came belongs to
        // a partition assigned since, which is not paused yet.
        self.pause(consumer);
        if std::mem::replace(&mut self.paused, true) { BulkEvent::Parked } else { BulkEvent::Paused }
    }

    /// While paused: queues what was kept, as far as there is room, and
    /// resumes the bulk partitions once nothing is kept and the queue is half
    /// free. Called on a short timer.
    pub(crate) fn release<C: ConsumerContext>(&mut self, consumer: &StreamConsumer<C>) -> BulkEvent {
        while let Some(incoming) = self.parked.pop_front() {
            match self.try_queue(incoming) {
                TryQueue::Queued => {}
                TryQueue::Closed => return BulkEvent::Closed,
                TryQueue::Full(incoming) => {
                    self.parked.push_front(incoming);
                    return BulkEvent::Parked;
                }
            }
        }
        if !self.paused || self.items.capacity() < self.capacity.div_ceil(2) {
            return BulkEvent::Parked;
        }
        self.paused = false;
        self.for_bulk_partitions(consumer, |consumer, tpl| consumer.resume(tpl));
        BulkEvent::Resumed
    }

    /// Queues `incoming` if there is room in the queue and the budget.
    fn try_queue(&mut self, incoming: Incoming) -> TryQueue {
        let slot = match self.items.try_reserve() {
            Ok(slot) => slot,
            Err(mpsc::error::TrySendError::Full(())) => return TryQueue::Full(incoming),
            Err(mpsc::error::TrySendError::Closed(())) => return TryQueue::Closed,
        };
        match self.budget.try_hold(incoming.payload.len()) {
            Some(held) => {
                slot.send((incoming, held));
                TryQueue::Queued
            }
            None => TryQueue::Full(incoming),
        }
    }

    fn pause<C: ConsumerContext>(&self, consumer: &StreamConsumer<C>) {
        self.for_bulk_partitions(consumer, |consumer, tpl| consumer.pause(tpl));
    }

    /// Applies `what` to the bulk partitions assigned now. A failure is
    /// harmless here (a partition revoked meanwhile): logged by the caller's
    /// telemetry at most, never fatal.
    fn for_bulk_partitions<C: ConsumerContext>(
        &self,
        consumer: &StreamConsumer<C>,
        what: impl Fn(&StreamConsumer<C>, &TopicPartitionList) -> rdkafka::error::KafkaResult<()>,
    ) {
        let Ok(assigned) = consumer.assignment() else { return };
        let mut bulk = TopicPartitionList::new();
        for element in assigned.elements().iter().filter(|e| e.topic() == &*self.topic) {
            bulk.add_partition(element.topic(), element.partition());
        }
        if bulk.count() > 0 {
            let _ = what(consumer, &bulk);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn live_goes_first_and_bulk_gets_one_batch_in_its_share_while_both_wait() {
        let mut picker = Picker::default();
        let mut taken = Vec::new();
        for _ in 0..16 {
            let lane = picker.pick(true, true, 4).expect("both wait");
            picker.took(lane);
            taken.push(lane);
        }
        let bulk: Vec<usize> = taken.iter().enumerate().filter(|(_, l)| **l == Lane::Bulk).map(|(i, _)| i).collect();
        assert_eq!(bulk, [3, 7, 11, 15], "{taken:?}");
    }

    #[test]
    fn a_lane_alone_is_taken_and_bulk_alone_does_not_build_up_credit() {
        let mut picker = Picker::default();
        assert_eq!(picker.pick(false, false, 4), None);
        assert_eq!(picker.pick(false, true, 4), Some(Lane::Bulk));
        for _ in 0..10 {
            picker.took(Lane::Bulk);
        }
        // Bulk ran while live was idle: live goes first when it comes back.
        assert_eq!(picker.pick(true, true, 4), Some(Lane::Live));
        assert_eq!(picker.pick(true, false, 4), Some(Lane::Live));
        // A share under 2 would starve live: it counts as 2 (every other batch).
        picker.took(Lane::Live);
        assert_eq!(picker.pick(true, true, 0), Some(Lane::Bulk));
    }

    fn batch(items: Vec<u32>) -> Batch<u32> {
        Batch { items, waited: std::time::Duration::ZERO, cut_at: tokio::time::Instant::now() }
    }

    #[tokio::test]
    async fn a_look_ahead_given_back_goes_after_a_live_batch_cut_meanwhile() {
        let (live_tx, live_rx) = mpsc::channel(4);
        let (bulk_tx, bulk_rx) = mpsc::channel(4);
        let (_share, share_rx) = watch::channel(8);
        let mut queue = Queue::new(live_rx, Some((bulk_rx, share_rx)));
        bulk_tx.send(batch(vec![1])).await.expect("open");
        let (lane, ahead) = queue.next().await.expect("a batch");
        assert_eq!((lane, ahead.items.as_slice()), (Lane::Bulk, [1].as_slice()));
        live_tx.send(batch(vec![2])).await.expect("open");
        queue.give_back(lane, ahead);
        let (lane, first) = queue.try_next().expect("both wait");
        assert_eq!((lane, first.items.as_slice()), (Lane::Live, [2].as_slice()));
        queue.took(lane);
        let (lane, then) = queue.try_next().expect("bulk waits");
        assert_eq!((lane, then.items.as_slice()), (Lane::Bulk, [1].as_slice()));
        drop((live_tx, bulk_tx));
        assert!(queue.next().await.is_none(), "both lanes closed");
    }
}
