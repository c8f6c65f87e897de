//! The consume → batch → process → produce → commit loop.
//!
//! Four tasks joined by bounded channels, so that a slow step blocks the one
//! before it and, in the end, consumption pauses instead of memory growing:
//!
//! ```text
//! consume ──(queue_capacity)──► batcher ──(2 batches)──► process ──(4 batches)──► acknowledge
//! ```
//!
//! `process` runs the stage on one batch while the batcher accumulates the next.
//! With a backlog it also gives the stage the next batch, already cut, to
//! prepare meanwhile, and hands the last batch's outputs to the producer while
//! the stage starts on this one.
//! `acknowledge` awaits every delivery of a batch's outputs, in batch order, and
//! only then stores the batch's last offset per partition; librdkafka commits
//! stored offsets every second, on revocation and on close. Hence at-least-once:
//! a crash can re-deliver, never skip.
//!
//! Every record produced carries a W3C `traceparent` header: a child of its
//! input's, or a new trace when the input had none (see
//! [`sluice_messages::trace`]). The consumer's context reports consumer lag
//! from librdkafka's statistics (see [`crate::lag`]).

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{
    BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance, RebalanceProtocol, StreamConsumer,
};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedHeaders, Header, Headers, Message, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use rdkafka::{ClientContext, TopicPartitionList};
use sluice_messages::dead_letter::DeadLetter;
use sluice_messages::trace::{TRACEPARENT_HEADER, TraceParent};
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::batcher::{Batch, BatchPolicy, run_batcher};
use sluice_core::{Incoming, Output, Stage};
use sluice_messages::dead_letter::Reason;

use crate::lanes::{BulkEvent, BulkIntake, Lane, Lanes, Queue};
use crate::latency::{Change, LatencyController, Observed};
use crate::progress::Progress;
use crate::{KafkaConfig, KafkaRuntimeError, StageStatus, lag, telemetry};

/// Where a stage reads and how it batches.
#[derive(Debug)]
pub struct RunOptions {
    pub input_topic: String,
    pub dead_letter_topic: String,
    pub group_id: String,
    pub client_id: String,
    /// The batching policy; a new value applies from the next cut.
    pub policy: watch::Receiver<BatchPolicy>,
    /// How long a shutdown may take to finish in-flight batches.
    pub drain_timeout: Duration,
    /// Messages buffered between the consumer and the batcher.
    pub queue_capacity: usize,
    /// Bytes of message payloads held between the consumer and the producer
    /// (queued, batched, being processed), whatever their count: the consumer
    /// waits while they are over this. A message larger than this still
    /// passes, alone.
    pub queue_max_bytes: usize,
    /// Hand the stage the next batch, where it is already cut, to prepare
    /// while it processes the current one ([`Stage::process_before`]).
    pub prepare_next_batch: bool,
    /// The time constant of the acknowledged rate the drain time divides by.
    pub throughput_window: Duration,
    /// A partition with lag and no progress for this long is reported stalled.
    pub stall_after: Duration,
    /// A p99 target (ms; 0: none) from an event's arrival to its answer,
    /// which the batch policy then follows within `policy`'s bounds
    /// ([`crate::latency`]); `None` for a stage that never has one.
    pub latency_target: Option<watch::Receiver<u64>>,
    /// Live before bulk ([`crate::lanes`]): the input topic's bulk twin is
    /// read too, in a lane of its own; `None`: one lane.
    pub lanes: Option<Lanes>,
}

/// Runs `stage` until `shutdown` is cancelled, then drains: what was consumed
/// is processed, produced and committed, within `drain_timeout`.
///
/// A fatal failure cancels `shutdown` (so sibling stages of a `sluice pipeline`
/// stop too) and is returned; nothing past the failure is committed.
pub async fn run_stage<S: Stage>(
    kafka: &KafkaConfig,
    options: RunOptions,
    mut stage: S,
    status: Arc<StageStatus>,
    shutdown: CancellationToken,
) -> Result<(), KafkaRuntimeError> {
    let name = stage.name();
    let progress = Arc::new(Mutex::new(Progress::new(options.throughput_window, options.stall_after)));
    let context = StageContext {
        stage: name,
        group: options.group_id.clone(),
        status: status.clone(),
        assigned: Mutex::new(BTreeSet::new()),
        progress: progress.clone(),
        throttle: telemetry::Throttle::default(),
    };
    let consumer: Arc<StreamConsumer<StageContext>> = Arc::new(
        kafka
            .consumer_config(&options.client_id, &options.group_id)
            .create_with_context(context)
            .map_err(|e| KafkaRuntimeError::client(format!("{name} consumer"), e))?,
    );
    let bulk_topic = options.lanes.as_ref().map(|lanes| lanes.twin(&options.input_topic));
    let topics: Vec<&str> = std::iter::once(options.input_topic.as_str()).chain(bulk_topic.as_deref()).collect();
    consumer.subscribe(&topics).map_err(|e| KafkaRuntimeError::client(format!("{name} subscribe"), e))?;
    let producer: FutureProducer = kafka
        .producer_config(&options.client_id)
        .create()
        .map_err(|e| KafkaRuntimeError::client(format!("{name} producer"), e))?;
    telemetry::stage_started(name, stage.dead_letter_reasons());
    info!(stage = name, topic = options.input_topic, bulk = bulk_topic, group = options.group_id, "stage started");

    let (item_tx, item_rx) = mpsc::channel(options.queue_capacity.max(1));
    // Two cut batches may wait: with a backlog, the one after the batch being
    // processed is already there for the stage to prepare (Stage::process_before).
    let (batch_tx, batch_rx) = mpsc::channel(2);
    let (ack_tx, ack_rx) = mpsc::channel(4);
    let input_topic: Arc<str> = options.input_topic.as_str().into();

    let budget = ByteBudget::new(options.queue_max_bytes);
    // The bulk lane: a queue, a byte budget and a batcher of its own, so that
    // a bulk backlog never holds what live records need.
    let (bulk_intake, bulk_batcher, bulk_batches) = match (&options.lanes, &bulk_topic) {
        (Some(lanes), Some(topic)) => {
            let (bulk_tx, bulk_rx) = mpsc::channel(options.queue_capacity.max(1));
            let (bulk_batch_tx, bulk_batch_rx) = mpsc::channel(2);
            let intake = BulkIntake::new(topic.as_str().into(), bulk_tx, ByteBudget::new(options.queue_max_bytes));
            (Some(intake), Some((bulk_rx, bulk_batch_tx)), Some((bulk_batch_rx, lanes.bulk_share.clone())))
        }
        _ => (None, None, None),
    };
    let intake = Intake { live_topic: input_topic.clone(), live: item_tx, budget, bulk: bulk_intake };
    let consume = tokio::spawn(consume_loop(consumer.clone(), intake, status.clone(), shutdown.clone(), name));
    // With a latency target, the batcher cuts by the controller's policy.
    let (policy, observed) = match options.latency_target.clone() {
        Some(target) => {
            let (policy_tx, policy_rx) = watch::channel(*options.policy.borrow());
            let (observed_tx, observed_rx) = mpsc::channel(64);
            let controlling = (options.policy.clone(), target, observed_rx);
            tokio::spawn(control_batches(name, controlling, policy_tx, status.clone()));
            (policy_rx, Some(observed_tx))
        }
        None => (options.policy.clone(), None),
    };
    if let Some((bulk_rx, bulk_batch_tx)) = bulk_batcher {
        tokio::spawn(run_batcher(bulk_rx, bulk_batch_tx, policy.clone()));
    }
    tokio::spawn(run_batcher(item_rx, batch_tx, policy));
    let queue = Queue::new(batch_rx, bulk_batches);
    tokio::spawn(watch_progress(progress.clone(), name, status.clone(), shutdown.clone()));
    let acknowledged = Acknowledged { stage: name, status: status.clone(), progress };
    let acknowledge = tokio::spawn(ack_loop(consumer.clone(), ack_rx, acknowledged, shutdown.clone()));
    let work = async {
        let processed = process_loop(&mut stage, queue, &producer, ack_tx, &options, observed, &shutdown).await;
        if processed.is_err() {
            // Stop consuming (and sibling stages) now, not after the acknowledger.
            shutdown.cancel();
        }
        let acknowledged = acknowledge.await.unwrap_or_else(|e| {
            Err(KafkaRuntimeError::Stage { stage: name, message: format!("acknowledger panicked: {e}") })
        });
        processed.and(acknowledged)
    };
    // The drain timeout bounds everything after the cancellation: the last
    // batches, the final commit, the producer flush and the consumer close.
    let cancelled_at = {
        let shutdown = shutdown.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            Instant::now()
        })
    };
    let drain_deadline = async {
        shutdown.cancelled().await;
        tokio::time::sleep(options.drain_timeout).await;
    };
    let result = tokio::select! {
        result = work => result,
        () = drain_deadline => Err(KafkaRuntimeError::DrainTimeout { stage: name, seconds: options.drain_timeout.as_secs_f64() }),
    };
    if let Err(e) = &result {
        error!(stage = name, error = %e, "stage failed; committing what was acknowledged");
        shutdown.cancel();
    }
    let consumed = consume.await.unwrap_or_else(|e| {
        Err(KafkaRuntimeError::Stage { stage: name, message: format!("consumer task panicked: {e}") })
    });
    let result = result.and(consumed);
    let cancelled_at = cancelled_at.await.unwrap_or_else(|_| Instant::now());
    // At least a moment for the commit even when the drain used all its time:
    // it only writes offsets that were acknowledged.
    let left = || options.drain_timeout.saturating_sub(cancelled_at.elapsed()).max(Duration::from_millis(500));

    // Commit what was acknowledged. Only acknowledged offsets were stored, so
    // this is safe even after a failure or a drain timeout. librdkafka's calls
    // block (for as long as the broker takes to answer): off the async runtime,
    // and abandoned when the drain timeout is up.
    let committing = consumer.clone();
    match tokio::time::timeout(
        left(),
        tokio::task::spawn_blocking(move || committing.commit_consumer_state(CommitMode::Sync)),
    )
    .await
    {
        Ok(Ok(Ok(()) | Err(KafkaError::ConsumerCommit(RDKafkaErrorCode::NoOffset)))) => {
            info!(stage = name, "offsets committed")
        }
        Ok(Ok(Err(e))) => {
            warn!(stage = name, error = %e, "final commit failed; the next owner re-processes from the last commit")
        }
        Ok(Err(e)) => warn!(stage = name, error = %e, "final commit task failed"),
        Err(_) => warn!(
            stage = name,
            "final commit did not finish within the drain timeout; the next owner re-processes from the last commit"
        ),
    }
    let flushing = producer.clone();
    let flush_for = left();
    match tokio::time::timeout(flush_for, tokio::task::spawn_blocking(move || flushing.flush(flush_for))).await {
        Ok(Ok(Ok(()))) => {}
        Ok(Ok(Err(e))) => warn!(stage = name, error = %e, "producer flush on shutdown"),
        Ok(Err(e)) => warn!(stage = name, error = %e, "producer flush task failed"),
        Err(_) => warn!(stage = name, "producer flush did not finish within the drain timeout"),
    }
    // Closing the consumer leaves the group, which also waits on the broker.
    drop(producer);
    if tokio::time::timeout(left(), tokio::task::spawn_blocking(move || drop(consumer))).await.is_err() {
        warn!(stage = name, "the consumer did not close within the drain timeout");
    }
    telemetry::stopped(name, status.acknowledged.load(Ordering::Relaxed));
    result
}

/// The stage consumer's callbacks, run by librdkafka on the thread that polls
/// (the consume loop): logs rebalances, keeps [`StageStatus`] up to date, and
/// reports consumer lag from the statistics. Offsets of revoked partitions are
/// committed by librdkafka before it revokes them (auto-commit).
struct StageContext {
    stage: &'static str,
    group: String,
    status: Arc<StageStatus>,
    /// (topic, partition) assigned now: lag is reported for these only, and
    /// set to 0 for those that leave, so that a partition that moved to
    /// another replica is not counted twice.
    assigned: Mutex<BTreeSet<(String, i32)>>,
    /// Lag and progress per assigned partition, looked at by [`watch_progress`].
    progress: Arc<Mutex<Progress>>,
    /// librdkafka's own lines, throttled.
    throttle: telemetry::Throttle,
}

impl ClientContext for StageContext {
    fn log(&self, level: RDKafkaLogLevel, facility: &str, message: &str) {
        telemetry::client_log(self.stage, level as i32, facility, message, &self.throttle);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        telemetry::client_error(self.stage, &error.to_string(), reason, &self.throttle);
    }

    fn stats_raw(&self, statistics: &[u8]) {
        let assigned = self.assigned.lock().unwrap_or_else(PoisonError::into_inner);
        match lag::assigned_lags(statistics, &assigned) {
            Ok(lags) => {
                self.progress.lock().unwrap_or_else(PoisonError::into_inner).lags(Instant::now(), &lags);
                telemetry::consumer_lag(self.stage, &self.group, &lags);
            }
            Err(e) => telemetry::statistics_unreadable(self.stage, &e.to_string()),
        }
    }
}

impl ConsumerContext for StageContext {
    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let now: Option<BTreeSet<(String, i32)>> = consumer
            .assignment()
            .ok()
            .map(|tpl| tpl.elements().iter().map(|e| (e.topic().to_string(), e.partition())).collect());
        let assigned = now.as_ref().map_or(0, |now| now.len() as i64);
        let (kind, partitions) = match rebalance {
            Rebalance::Assign(tpl) => ("assign", describe(tpl)),
            Rebalance::Revoke(tpl) => ("revoke", describe(tpl)),
            Rebalance::Error(e) => ("error", e.to_string()),
        };
        if !matches!(rebalance, Rebalance::Error(_)) {
            self.status.set_assigned(assigned);
            let now = now.unwrap_or_default();
            let mut kept = self.assigned.lock().unwrap_or_else(PoisonError::into_inner);
            let gone: Vec<(String, i32)> = kept.difference(&now).cloned().collect();
            self.progress.lock().unwrap_or_else(PoisonError::into_inner).assigned(Instant::now(), now.iter().cloned());
            *kept = now;
            drop(kept);
            telemetry::lag_forgotten(self.stage, &self.group, &gone);
        }
        // Cooperative: a rebalance moves only the listed partitions; eager: all are revoked first.
        let protocol = match consumer.rebalance_protocol() {
            RebalanceProtocol::Cooperative => "cooperative",
            RebalanceProtocol::Eager => "eager",
            RebalanceProtocol::None => "none",
        };
        telemetry::rebalance(self.stage, kind, protocol, &partitions, assigned);
    }
}

fn describe(tpl: &TopicPartitionList) -> String {
    tpl.elements().iter().map(|e| format!("{}[{}]", e.topic(), e.partition())).collect::<Vec<_>>().join(",")
}

/// Bounds the payload bytes in flight between consume and produce: each
/// consumed message holds permits for its size until its batch's outputs are
/// handed to the producer (whose own queue is bounded in bytes too).
#[derive(Debug, Clone)]
pub(crate) struct ByteBudget {
    permits: Arc<tokio::sync::Semaphore>,
    max: u32,
}

impl ByteBudget {
    pub(crate) fn new(max_bytes: usize) -> Self {
        let max = u32::try_from(max_bytes.max(1)).unwrap_or(u32::MAX).min(tokio::sync::Semaphore::MAX_PERMITS as u32);
        Self { permits: Arc::new(tokio::sync::Semaphore::new(max as usize)), max }
    }

    /// The permits `bytes` take: a message over the whole budget takes all of it.
    fn permits_for(&self, bytes: usize) -> u32 {
        u32::try_from(bytes).unwrap_or(u32::MAX).clamp(1, self.max)
    }

    /// Waits until `bytes` fit.
    async fn hold(&self, bytes: usize) -> tokio::sync::OwnedSemaphorePermit {
        let n = self.permits_for(bytes);
        self.permits.clone().acquire_many_owned(n).await.expect("the budget's semaphore is never closed")
    }

    /// `bytes`' permits if they fit now.
    pub(crate) fn try_hold(&self, bytes: usize) -> Option<tokio::sync::OwnedSemaphorePermit> {
        self.permits.clone().try_acquire_many_owned(self.permits_for(bytes)).ok()
    }
}

/// A consumed message and the bytes it holds of the [`ByteBudget`].
pub(crate) type Held = (Incoming, tokio::sync::OwnedSemaphorePermit);

/// Where the consume loop puts what it reads: the live queue (waiting for
/// room: backpressure) and, with lanes, the bulk lane's intake (never
/// waiting: it pauses the bulk partitions instead).
struct Intake {
    live_topic: Arc<str>,
    live: mpsc::Sender<Held>,
    budget: ByteBudget,
    bulk: Option<BulkIntake>,
}

/// How often paused bulk partitions look for room in their queue.
const BULK_RETRY: Duration = Duration::from_millis(5);

async fn consume_loop(
    consumer: Arc<StreamConsumer<StageContext>>,
    mut intake: Intake,
    status: Arc<StageStatus>,
    shutdown: CancellationToken,
    stage: &'static str,
) -> Result<(), KafkaRuntimeError> {
    let throttle = telemetry::Throttle::default();
    let mut retry = tokio::time::interval(BULK_RETRY);
    retry.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        let paused = intake.bulk.as_ref().is_some_and(BulkIntake::paused);
        let received = tokio::select! {
            () = shutdown.cancelled() => return Ok(()),
            received = consumer.recv() => received,
            _ = retry.tick(), if paused => {
                if release(&mut intake.bulk, &consumer, stage, &status) {
                    return Ok(());
                }
                continue;
            }
        };
        let message = match received {
            Ok(message) => message,
            Err(e @ KafkaError::MessageConsumptionFatal(_)) => {
                // The client cannot go on (fenced, unauthorised, ...): stop the
                // stage rather than log forever.
                shutdown.cancel();
                return Err(KafkaRuntimeError::client(format!("{stage} consumer"), e));
            }
            Err(e) => {
                telemetry::consume_error(stage, &e.to_string(), &throttle);
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let topic = match &intake.bulk {
            Some(bulk) if *bulk.topic == *message.topic() => bulk.topic.clone(),
            _ if *intake.live_topic == *message.topic() => intake.live_topic.clone(),
            _ => message.topic().into(),
        };
        let incoming = Incoming {
            key: message.key().map(<[u8]>::to_vec),
            payload: message.payload().unwrap_or_default().to_vec(),
            topic,
            partition: message.partition(),
            offset: message.offset(),
            timestamp_ms: message.timestamp().to_millis(),
            traceparent: message.headers().and_then(traceparent),
        };
        drop(message);
        if let Some(bulk) = intake.bulk.as_mut().filter(|bulk| Arc::ptr_eq(&bulk.topic, &incoming.topic)) {
            match bulk.offer(incoming, &consumer) {
                BulkEvent::Closed => return Ok(()),
                BulkEvent::Paused => telemetry::bulk_paused(stage, &status),
                _ => {}
            }
            continue;
        }
        // Waiting for room in the live queue (backpressure) must not stop
        // the paused bulk lane from being served: its kept record is queued,
        // and its partitions resumed, meanwhile.
        let Intake { live, budget, bulk, .. } = &mut intake;
        let bytes = incoming.payload.len();
        let room = async move {
            let held = budget.hold(bytes).await;
            live.reserve().await.ok().map(|slot| (slot, held))
        };
        tokio::pin!(room);
        loop {
            let paused = bulk.as_ref().is_some_and(BulkIntake::paused);
            tokio::select! {
                () = shutdown.cancelled() => return Ok(()),
                room = &mut room => match room {
                    Some((slot, held)) => {
                        slot.send((incoming, held));
                        break;
                    }
                    None => return Ok(()),
                },
                _ = retry.tick(), if paused => {
                    if release(bulk, &consumer, stage, &status) {
                        return Ok(());
                    }
                }
            }
        }
    }
}

/// Queues what the paused bulk lane kept, resuming it once there is room;
/// `true` when the bulk batcher is gone (shutdown).
fn release(
    bulk: &mut Option<BulkIntake>,
    consumer: &StreamConsumer<StageContext>,
    stage: &'static str,
    status: &StageStatus,
) -> bool {
    let Some(bulk) = bulk.as_mut() else { return false };
    match bulk.release(consumer) {
        BulkEvent::Closed => true,
        BulkEvent::Resumed => {
            telemetry::bulk_resumed(stage, status);
            false
        }
        _ => false,
    }
}

/// The first `traceparent` header, parsed; a malformed one counts as none
/// (the specification says to ignore it, and the output starts a new trace).
fn traceparent(headers: &BorrowedHeaders) -> Option<TraceParent> {
    headers.iter().find(|h| h.key == TRACEPARENT_HEADER).and_then(|h| h.value).and_then(TraceParent::parse)
}

/// A processed batch whose outputs are on their way to the broker.
struct PendingAck {
    deliveries: Vec<(Arc<str>, DeliveryFuture)>,
    /// The batch's last offset per (topic, partition): with lanes, a stage
    /// reads two topics.
    last_offsets: BTreeMap<(Arc<str>, i32), i64>,
    inputs: usize,
}

/// How long the batch's oldest event has been in the stage: from its record's
/// Kafka timestamp (when the previous stage or the producer sent it: the hop
/// and any wait in the topic count, as they do for whoever waits on the
/// answer), or from its arrival at the batcher (`at_batcher`) where that is
/// longer or there is no timestamp.
fn oldest_in_input(items: &[Incoming], at_batcher: Duration) -> Duration {
    let now = sluice_messages::now_ms();
    let in_topic = items.iter().filter_map(|i| i.timestamp_ms).map(|t| now.saturating_sub(t)).max().unwrap_or(0);
    at_batcher.max(Duration::from_millis(in_topic.max(0) as u64))
}

async fn process_loop<S: Stage>(
    stage: &mut S,
    mut batches: Queue<Held>,
    producer: &FutureProducer,
    acks: mpsc::Sender<PendingAck>,
    options: &RunOptions,
    observed: Option<mpsc::Sender<Observed>>,
    shutdown: &CancellationToken,
) -> Result<(), KafkaRuntimeError> {
    let name = stage.name();
    let dead_letter_topic: Arc<str> = options.dead_letter_topic.as_str().into();
    let routes = options.lanes.as_ref().map(Lanes::routes).unwrap_or_default();
    let unzip = |(lane, batch): (Lane, Batch<Held>)| {
        let (items, held): (Vec<Incoming>, Vec<_>) = batch.items.into_iter().unzip();
        (lane, Batch { items, waited: batch.waited, cut_at: batch.cut_at }, held)
    };
    // The batch after this one, where it is already cut.
    let mut next = None;
    // The last batch's outputs on their way into the producer's queue, while
    // this batch is processed.
    let mut sending = None;
    loop {
        // The look-ahead goes back to its lane: a live batch cut while the
        // last one ran goes before a bulk look-ahead (its preparation is then
        // wasted; the stage checks what it prepared against what it gets).
        if let Some((lane, batch, held)) = next.take() {
            let Batch { items, waited, cut_at } = batch;
            batches.give_back(lane, Batch { items: items.into_iter().zip(held).collect(), waited, cut_at });
        }
        // Taken at once: it was cut and waiting while the last one ran.
        let (taken, waiting) = match batches.try_next() {
            Some(taken) => (taken, true),
            None => {
                // Nothing more is cut: the last outputs go out before waiting.
                if let Some(sent) = sending.take()
                    && acks.send(sent.await?).await.is_err()
                {
                    // The acknowledger stopped on an error, which it reports.
                    return Ok(());
                }
                match batches.next().await {
                    Some(taken) => (taken, false),
                    None => break,
                }
            }
        };
        let (lane, batch, held) = unzip(taken);
        batches.took(lane);
        telemetry::lane_batch(name, lane, batch.items.len(), batch.oldest_age());
        let started = Instant::now();
        // Only a batch already cut: looking ahead never delays this one.
        if options.prepare_next_batch {
            next = batches.try_next().map(unzip);
        }
        let ahead = next.as_ref().map(|(_, next, _)| next.items.as_slice());
        // Biased: the stage starts on this batch (its model call first)
        // before the last batch's outputs take this thread.
        let processing = process_with_retry(stage, &batch.items, ahead, shutdown);
        let previous = async {
            match sending.take() {
                Some(sent) => Some(sent.await),
                None => None,
            }
        };
        let (outputs, sent) = tokio::join!(biased; processing, previous);
        if let Some(sent) = sent
            && acks.send(sent?).await.is_err()
        {
            return Ok(());
        }
        // A batch given up on (shutdown during retries) must stop the loop: a
        // later batch's offsets would commit past it.
        let Some(outputs) = outputs? else {
            return Ok(());
        };
        // The latency controller's measure: the oldest event's time from
        // arrival to answer (never waited for: a full channel drops one).
        // Live batches only: a bulk batch's wait is the lanes' doing.
        if let Some(observed) = observed.as_ref().filter(|_| lane == Lane::Live) {
            let in_stage = batch.oldest_age();
            let took = oldest_in_input(&batch.items, in_stage);
            let _ = observed.try_send(Observed { took, in_stage, call: started.elapsed(), waiting });
        }
        // This hop's trace context for each input: every output of input `i`
        // (dead letters included) carries `hops[i]`.
        let hops: Vec<TraceParent> =
            batch.items.iter().map(|input| input.traceparent.map_or_else(TraceParent::root, |t| t.child())).collect();
        telemetry::batch_processed(name, batch.items.len(), batch.waited, started.elapsed(), &hops);
        let to = Destinations { dead_letters: &dead_letter_topic, bulk_twins: (lane == Lane::Bulk).then_some(&routes) };
        sending = Some(send_outputs(name, producer, to, batch, held, outputs, hops));
    }
    if let Some(sent) = sending.take() {
        // A stopped acknowledger reports its own error.
        let _ = acks.send(sent.await?).await;
    }
    Ok(())
}

/// Where a batch's outputs go besides the topics the stage names.
#[derive(Clone, Copy)]
struct Destinations<'a> {
    dead_letters: &'a Arc<str>,
    /// A bulk batch's: the bulk twin of each twinned topic.
    bulk_twins: Option<&'a HashMap<Arc<str>, Arc<str>>>,
}

/// Hands a processed batch's outputs to the producer (a dead letter instead
/// of an output larger than the producer takes); returns what the
/// acknowledger waits for before it commits the batch. The batch's bytes stay
/// held (`_held`) until its outputs are in the producer's queue.
async fn send_outputs(
    name: &'static str,
    producer: &FutureProducer,
    to: Destinations<'_>,
    batch: Batch<Incoming>,
    _held: Vec<tokio::sync::OwnedSemaphorePermit>,
    outputs: Vec<Output>,
    hops: Vec<TraceParent>,
) -> Result<PendingAck, KafkaRuntimeError> {
    let dead_letter_topic = to.dead_letters;
    let mut deliveries = Vec::with_capacity(outputs.len());
    let mut sent = 0;
    for output in outputs {
        let delivery = match output {
            Output::Send { source, topic, key, payload } => {
                check_source(name, source, batch.items.len())?;
                let topic = match to.bulk_twins.and_then(|twins| twins.get(&topic)) {
                    Some(twin) => twin.clone(),
                    None => topic,
                };
                match enqueue(producer, &topic, key.as_deref(), &payload, Some(&hops[source])).await {
                    Ok(delivery) => {
                        sent += 1;
                        (topic, delivery)
                    }
                    // Larger than the broker takes: this input can never be
                    // forwarded, so it is a dead letter, not a stuck stage.
                    Err(KafkaRuntimeError::Delivery {
                        source: KafkaError::MessageProduction(RDKafkaErrorCode::MessageSizeTooLarge),
                        ..
                    }) => {
                        let detail = format!("an output of {} bytes is larger than the producer allows", payload.len());
                        let input = &batch.items[source];
                        let letter = dead_letter(name, input, Reason::OutputTooLarge, detail, None, None);
                        let key = input.key.as_deref();
                        let trace = Some(&hops[source]);
                        (dead_letter_topic.clone(), enqueue(producer, dead_letter_topic, key, &letter, trace).await?)
                    }
                    Err(e) => return Err(e),
                }
            }
            Output::DeadLetter { source, reason, detail, event_id, original } => {
                check_source(name, source, batch.items.len())?;
                let input = &batch.items[source];
                let letter = dead_letter(name, input, reason, detail, event_id, original.as_deref());
                let (key, trace) = (input.key.as_deref(), Some(&hops[source]));
                (dead_letter_topic.clone(), enqueue(producer, dead_letter_topic, key, &letter, trace).await?)
            }
        };
        deliveries.push(delivery);
    }
    telemetry::outputs_sent(name, sent);
    let mut last_offsets = BTreeMap::new();
    for item in &batch.items {
        last_offsets.insert((item.topic.clone(), item.partition), item.offset);
    }
    Ok(PendingAck { deliveries, last_offsets, inputs: batch.items.len() })
}

/// Original payloads larger than this are cut in dead letters, so that a huge
/// bad input cannot make its own dead letter too large to publish.
pub const MAX_DEAD_LETTER_PAYLOAD: usize = 64 * 1024;

/// The JSON dead letter for `input`.
fn dead_letter(
    stage: &'static str,
    input: &Incoming,
    reason: Reason,
    detail: String,
    event_id: Option<String>,
    original: Option<&[u8]>,
) -> Vec<u8> {
    telemetry::dead_lettered(stage, reason, &detail, event_id.as_deref());
    let payload = original.unwrap_or(&input.payload);
    let kept = payload.len().min(MAX_DEAD_LETTER_PAYLOAD);
    let letter = DeadLetter {
        stage: stage.to_string(),
        reason: reason.as_str().to_string(),
        detail,
        source: input.coordinates(),
        event_id,
        key: input.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
        payload_base64: DeadLetter::encode_payload(&payload[..kept]),
        payload_bytes: payload.len() as u64,
        payload_truncated: kept < payload.len(),
        dead_at_ms: sluice_messages::now_ms(),
    };
    serde_json::to_vec(&letter).expect("a DeadLetter always serialises")
}

fn check_source(stage: &'static str, source: usize, len: usize) -> Result<(), KafkaRuntimeError> {
    if source < len {
        Ok(())
    } else {
        Err(KafkaRuntimeError::Stage { stage, message: format!("output names input {source} of a batch of {len}") })
    }
}

async fn process_with_retry<S: Stage>(
    stage: &mut S,
    items: &[Incoming],
    next: Option<&[Incoming]>,
    shutdown: &CancellationToken,
) -> Result<Option<Vec<Output>>, KafkaRuntimeError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        match stage.process_before(items, next).await {
            Ok(outputs) => return Ok(Some(outputs)),
            Err(failure) if failure.retryable => {
                telemetry::batch_failed(stage.name(), true, &failure.message, backoff);
                tokio::select! {
                    () = shutdown.cancelled() => return Ok(None),
                    () = tokio::time::sleep(backoff) => {}
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
            }
            Err(failure) => {
                telemetry::batch_failed(stage.name(), false, &failure.message, Duration::ZERO);
                return Err(KafkaRuntimeError::Stage { stage: stage.name(), message: failure.message });
            }
        }
    }
}

/// Hands one record to librdkafka, waiting while its queue is full; with
/// `trace`, as its `traceparent` header.
pub(crate) async fn enqueue<C: ClientContext + 'static>(
    producer: &FutureProducer<C>,
    topic: &str,
    key: Option<&[u8]>,
    payload: &[u8],
    trace: Option<&TraceParent>,
) -> Result<DeliveryFuture, KafkaRuntimeError> {
    let traceparent = trace.map(TraceParent::encode);
    loop {
        let mut record: FutureRecord<'_, [u8], [u8]> = FutureRecord::to(topic).payload(payload);
        if let Some(key) = key {
            record = record.key(key);
        }
        if let Some(value) = &traceparent {
            let header = Header { key: TRACEPARENT_HEADER, value: Some(&value[..]) };
            record = record.headers(OwnedHeaders::new_with_capacity(1).insert(header));
        }
        match producer.send_result(record) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                tokio::time::sleep(Duration::from_millis(2)).await;
            }
            Err((source, _)) => return Err(KafkaRuntimeError::Delivery { topic: topic.to_string(), source }),
        }
    }
}

/// Where the acknowledger reports what it stored.
struct Acknowledged {
    stage: &'static str,
    status: Arc<StageStatus>,
    progress: Arc<Mutex<Progress>>,
}

async fn ack_loop(
    consumer: Arc<StreamConsumer<StageContext>>,
    mut acks: mpsc::Receiver<PendingAck>,
    to: Acknowledged,
    shutdown: CancellationToken,
) -> Result<(), KafkaRuntimeError> {
    let Acknowledged { stage, status, progress } = to;
    while let Some(pending) = acks.recv().await {
        for (topic, delivery) in pending.deliveries {
            let source = match delivery.await {
                Ok(Ok(_)) => continue,
                Ok(Err((source, _))) => source,
                Err(_) => KafkaError::Canceled,
            };
            // Nothing after this batch may be stored: stop the stage now.
            shutdown.cancel();
            return Err(KafkaRuntimeError::Delivery { topic: topic.to_string(), source });
        }
        for ((topic, partition), offset) in pending.last_offsets {
            // Stores `offset + 1`, the next offset to read.
            match consumer.store_offset(&topic, partition, offset) {
                Ok(()) => progress.lock().unwrap_or_else(PoisonError::into_inner).progressed(
                    Instant::now(),
                    &topic,
                    partition,
                ),
                Err(e) => telemetry::stale_offset(stage, partition, &e.to_string()),
            }
        }
        status.acknowledged.fetch_add(pending.inputs as u64, Ordering::Relaxed);
        telemetry::acknowledged(stage, pending.inputs);
    }
    Ok(())
}

/// Keeps the batch policy the batcher cuts by (`policy`) to the latency
/// target, within the configured bounds, from each batch's measure
/// ([`LatencyController`]); a target of 0 turns it off (the bounds apply as
/// they are). Ends when the measures stop (the process loop ended).
async fn control_batches(
    stage: &'static str,
    (mut bounds, mut target, mut observed): (
        watch::Receiver<BatchPolicy>,
        watch::Receiver<u64>,
        mpsc::Receiver<Observed>,
    ),
    policy: watch::Sender<BatchPolicy>,
    status: Arc<StageStatus>,
) {
    let start =
        |ms: u64, bounds: BatchPolicy| (ms > 0).then(|| LatencyController::new(Duration::from_millis(ms), bounds));
    let mut controller = start(*target.borrow_and_update(), *bounds.borrow_and_update());
    telemetry::batch_policy(stage, *policy.borrow());
    loop {
        status.set_controller(controller.as_ref().map(LatencyController::state));
        let change = tokio::select! {
            Ok(()) = target.changed() => {
                let ms = *target.borrow_and_update();
                match (&mut controller, ms) {
                    (_, 0) => {
                        controller = None;
                        let policy = *bounds.borrow();
                        Some(Change { policy, reason: "the latency target is off: the configured policy applies".into() })
                    }
                    (Some(c), ms) => {
                        c.set_target(Duration::from_millis(ms));
                        None
                    }
                    (None, ms) => {
                        controller = start(ms, *bounds.borrow());
                        None
                    }
                }
            }
            Ok(()) = bounds.changed() => {
                let new = *bounds.borrow_and_update();
                match &mut controller {
                    Some(c) => c.set_bounds(new),
                    None => Some(Change { policy: new, reason: "the configured policy changed".into() }),
                }
            }
            measure = observed.recv() => match (measure, &mut controller) {
                (None, _) => return,
                (Some(batch), Some(c)) => c.observe(batch),
                (Some(_), None) => None,
            },
        };
        if let Some(change) = change {
            telemetry::batch_policy_changed(stage, &change, controller.as_ref().map(LatencyController::state));
            policy.send_replace(change.policy);
        }
    }
}

/// Looks at the stage's progress every second until shutdown: the drain
/// time and the stalled partitions, as metrics, log lines and
/// [`StageStatus::stalled`]. On a timer of its own, so that a stage stuck in
/// a batch (which stops polling, and so stops the statistics) is still seen.
async fn watch_progress(
    progress: Arc<Mutex<Progress>>,
    stage: &'static str,
    status: Arc<StageStatus>,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut stalled = BTreeSet::new();
    loop {
        tokio::select! {
            _ = tick.tick() => {}
            () = shutdown.cancelled() => return,
        }
        let acknowledged = status.acknowledged.load(Ordering::Relaxed);
        let reading = progress.lock().unwrap_or_else(PoisonError::into_inner).look(Instant::now(), acknowledged);
        telemetry::progress(stage, &reading, &mut stalled);
        status.set_stalled(reading.stalled);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn input(payload: Vec<u8>) -> Incoming {
        Incoming {
            key: Some(b"k".to_vec()),
            payload,
            topic: "t".into(),
            partition: 3,
            offset: 42,
            timestamp_ms: None,
            traceparent: None,
        }
    }

    #[test]
    fn dead_letters_carry_the_reason_and_the_original_coordinates() {
        let json = dead_letter("fetcher", &input(b"{bad".to_vec()), Reason::MalformedJson, "eof".into(), None, None);
        let letter: DeadLetter = serde_json::from_slice(&json).expect("JSON");
        assert_eq!(
            (letter.stage.as_str(), letter.reason.as_str(), letter.detail.as_str()),
            ("fetcher", "malformed_json", "eof")
        );
        assert_eq!((letter.source.topic.as_str(), letter.source.partition, letter.source.offset), ("t", 3, 42));
        assert_eq!(letter.key.as_deref(), Some("k"));
        assert_eq!(letter.payload().expect("base64"), b"{bad");
        assert!(!letter.payload_truncated);
    }

    #[test]
    fn a_huge_input_is_cut_so_that_its_dead_letter_stays_publishable() {
        let big = vec![b'x'; 3 * MAX_DEAD_LETTER_PAYLOAD];
        let json = dead_letter("fetcher", &input(big.clone()), Reason::MalformedJson, "eof".into(), None, None);
        assert!(json.len() < 2 * MAX_DEAD_LETTER_PAYLOAD, "{} bytes", json.len());
        let letter: DeadLetter = serde_json::from_slice(&json).expect("JSON");
        assert!(letter.payload_truncated);
        assert_eq!(letter.payload_bytes, 3 * MAX_DEAD_LETTER_PAYLOAD as u64);
        assert_eq!(letter.payload().expect("base64").len(), MAX_DEAD_LETTER_PAYLOAD);

        // One event of a large input that carries several keeps its own bytes whole.
        let own = b"one step's window".as_slice();
        let json = dead_letter("inferrer", &input(big), Reason::ModelError, "x".into(), Some("b:1".into()), Some(own));
        let letter: DeadLetter = serde_json::from_slice(&json).expect("JSON");
        assert_eq!((letter.payload().expect("base64").as_slice(), letter.payload_truncated), (own, false));
        assert_eq!((letter.payload_bytes, letter.source.offset), (own.len() as u64, 42), "the input's coordinates");
    }
}
