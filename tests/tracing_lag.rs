//! Operating it: consumer lag per partition, the W3C trace context that every
//! record carries from stage to stage, and the series the alerts watch.
//!
//! - Lag runs a stage in this process against librdkafka's mock cluster (whose
//!   watermarks are right; tansu's are not) and reads the Prometheus rendering.
//! - Lanes run a stage in this process against the mock cluster: live goes
//!   first, bulk keeps its share, a full bulk queue pauses bulk only.
//! - Tracing runs the four stages as `sluice run` processes against tansu and
//!   reads the headers of every topic.
//! - The alerted series are read from the `/metrics` of a `sluice run inferrer`
//!   whose broker never answers.
//! - A real Prometheus (Debian's) scrapes the four stages of a running
//!   pipeline: every dashboard panel's query returns series and every alert
//!   rule evaluates.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};
use rdkafka::Message;
use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::message::{Header, Headers, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use sluice_core::{BatchFailure, Incoming, Output, Stage};
use sluice_kafka::admin::TopicSpec;
use sluice_kafka::embedded::EmbeddedCluster;
use sluice_kafka::{BatchPolicy, KafkaConfig, KafkaRuntimeError, Lanes, RunOptions, StageStatus, run_stage};
use sluice_messages::codec;
use sluice_messages::trace::{TRACEPARENT_HEADER, TRACEPARENT_LEN, TraceParent};
use sluice_stages::Task;
use sluice_stages::inferrer::query::QueryTask;
use sluice_stages::inferrer::stock::StockTask;
use sluice_testkit::prometheus::series;
use sluice_testkit::{
    Processes, StageProcess, TestPipeline, free_port, heavy_test_lock, tail, temp_dir, unique, wait_for_http,
    write_config,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

// ---------------------------------------------------------------- lag

/// A stage that processes while its gate is open and waits while it is shut.
struct Gated {
    gate: watch::Receiver<bool>,
    processed: Arc<AtomicUsize>,
}

impl Stage for Gated {
    fn name(&self) -> &'static str {
        "lag-probe"
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        if self.gate.wait_for(|open| *open).await.is_err() {
            return Err(BatchFailure::fatal("gate dropped"));
        }
        self.processed.fetch_add(batch.len(), Ordering::SeqCst);
        Ok(Vec::new())
    }
}

/// `sluice_kafka_consumer_lag` by partition, for one stage, group and topic.
fn lag_by_partition(metrics: &PrometheusHandle, group: &str, topic: &str) -> BTreeMap<i32, f64> {
    fn label<'a>(labels: &'a BTreeMap<String, String>, key: &str) -> Option<&'a str> {
        labels.get(key).map(String::as_str)
    }
    series(&metrics.render())
        .into_iter()
        .filter(|((name, labels), _)| {
            name == "sluice_kafka_consumer_lag"
                && label(labels, "stage") == Some("lag-probe")
                && label(labels, "group") == Some(group)
                && label(labels, "topic") == Some(topic)
        })
        .map(|((_, labels), value)| {
            (label(&labels, "partition").and_then(|p| p.parse().ok()).expect("a partition label"), value)
        })
        .collect()
}

/// Waits until the lag by partition is `want`, or fails with what it was.
async fn wait_for_lag(metrics: &PrometheusHandle, group: &str, topic: &str, want: &[(i32, f64)], why: &str) {
    let want: BTreeMap<i32, f64> = want.iter().copied().collect();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = lag_by_partition(metrics, group, topic);
        if got == want {
            return;
        }
        assert!(Instant::now() < deadline, "{why}: lag by partition is {got:?}, expected {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until the partitions `status` reports stalled are `want`, and each
/// one's `sluice_kafka_partition_stalled` gauge says so.
async fn wait_for_stalled(metrics: &PrometheusHandle, status: &StageStatus, want: &[i32], why: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let stalled: Vec<i32> = status.stalled().iter().map(|s| s.partition).collect();
        let gauges: BTreeMap<i32, f64> = series(&metrics.render())
            .into_iter()
            .filter(|((name, labels), _)| {
                name == "sluice_kafka_partition_stalled" && labels.get("stage").map(String::as_str) == Some("lag-probe")
            })
            .map(|((_, labels), value)| (labels["partition"].parse().expect("a partition label"), value))
            .collect();
        let flagged: Vec<i32> = gauges.iter().filter(|(_, v)| **v == 1.0).map(|(p, _)| *p).collect();
        if stalled == want && flagged == want {
            return;
        }
        assert!(Instant::now() < deadline, "{why}: stalled {stalled:?}, gauges {gauges:?}, expected {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn produce(producer: &FutureProducer, topic: &str, partition: i32, count: usize) {
    for i in 0..count {
        let payload = format!("message {i}");
        let record: FutureRecord<'_, [u8], str> = FutureRecord::to(topic).partition(partition).payload(&payload);
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("delivered");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_and_stalls_are_reported_per_partition_while_a_backlog_waits_and_cleared_when_the_partition_goes() {
    let recorder = PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    assert!(metrics::set_global_recorder(recorder).is_ok(), "the only recorder of this test binary");

    let cluster = EmbeddedCluster::start().expect("mock cluster");
    let topic = unique("lag.in");
    let group = unique("lag-group");
    cluster.create_topics(&[TopicSpec { name: topic.clone(), partitions: 2, replication: 1 }]).expect("topic");
    let mut kafka = cluster.kafka_config(&KafkaConfig::default());
    // Statistics every 100 ms instead of 5 s, so the test is quick.
    kafka.consumer_properties.insert("statistics.interval.ms".into(), "100".into());
    let producer: FutureProducer = kafka.producer_config("lag-test").create().expect("producer");

    let (gate, gate_rx) = watch::channel(true);
    let processed = Arc::new(AtomicUsize::new(0));
    let shutdown = CancellationToken::new();
    let options = RunOptions {
        input_topic: topic.clone(),
        dead_letter_topic: unique("lag.dead"),
        group_id: group.clone(),
        client_id: "lag-probe".into(),
        policy: BatchPolicy { max_batch_size: 10, max_wait_ms: 0 }.fixed(),
        drain_timeout: Duration::from_millis(500),
        // Room for the whole backlog: the consume loop keeps polling while the
        // stage waits, so the statistics keep coming.
        queue_capacity: 1000,
        queue_max_bytes: 32 << 20,
        prepare_next_batch: true,
        throughput_window: Duration::from_secs(60),
        // A second without progress, so the test is quick.
        stall_after: Duration::from_secs(1),
        latency_target: None,
        lanes: None,
    };
    let stage = Gated { gate: gate_rx, processed: processed.clone() };
    let status = Arc::new(StageStatus::default());
    let running = tokio::spawn({
        let (kafka, shutdown, status) = (kafka.clone(), shutdown.clone(), status.clone());
        async move { run_stage(&kafka, options, stage, status, shutdown).await }
    });

    // Caught up: both partitions are reported, at 0.
    produce(&producer, &topic, 0, 5).await;
    produce(&producer, &topic, 1, 5).await;
    wait_for_lag(&metrics, &group, &topic, &[(0, 0.0), (1, 0.0)], "caught up").await;
    assert_eq!(processed.load(Ordering::SeqCst), 10);

    // A backlog while the stage waits: committed offsets stay, the watermarks move.
    gate.send_replace(false);
    produce(&producer, &topic, 0, 100).await;
    produce(&producer, &topic, 1, 50).await;
    wait_for_lag(&metrics, &group, &topic, &[(0, 100.0), (1, 50.0)], "backlog waiting").await;
    // Work waits and nothing is acknowledged: both partitions stall.
    wait_for_stalled(&metrics, &status, &[0, 1], "backlog waiting").await;

    // It drains, and moves again.
    gate.send_replace(true);
    wait_for_lag(&metrics, &group, &topic, &[(0, 0.0), (1, 0.0)], "drained").await;
    assert_eq!(processed.load(Ordering::SeqCst), 160);
    wait_for_stalled(&metrics, &status, &[], "drained").await;

    // A partition that leaves this member (here: the member leaves, with a
    // backlog it never processed) is not reported any more: its lag is the
    // next owner's.
    gate.send_replace(false);
    produce(&producer, &topic, 0, 30).await;
    wait_for_lag(&metrics, &group, &topic, &[(0, 30.0), (1, 0.0)], "second backlog").await;
    shutdown.cancel();
    let stopped = running.await.expect("stage task");
    assert!(matches!(stopped, Err(KafkaRuntimeError::DrainTimeout { .. })), "{stopped:?}");
    wait_for_lag(&metrics, &group, &topic, &[(0, 0.0), (1, 0.0)], "after leaving the group").await;
}

// ---------------------------------------------------------------- latency target

/// A stage whose batch takes 1 ms plus 0.2 ms per input, like a model.
struct Slow;

impl Stage for Slow {
    fn name(&self) -> &'static str {
        "slow-probe"
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        tokio::time::sleep(Duration::from_micros(1_000 + 200 * batch.len() as u64)).await;
        Ok(Vec::new())
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_latency_target_the_wait_comes_down_the_batch_size_holds_under_a_backlog_and_off_is_off() {
    let cluster = EmbeddedCluster::start().expect("mock cluster");
    let topic = unique("slow.in");
    cluster.create_topics(&[TopicSpec { name: topic.clone(), partitions: 1, replication: 1 }]).expect("topic");
    let kafka = cluster.kafka_config(&KafkaConfig::default());
    let producer: FutureProducer = kafka.producer_config("slow-test").create().expect("producer");
    let bounds = BatchPolicy { max_batch_size: 512, max_wait_ms: 50 };
    let (target, target_rx) = watch::channel(30u64);
    let shutdown = CancellationToken::new();
    let options = RunOptions {
        input_topic: topic.clone(),
        dead_letter_topic: unique("slow.dead"),
        group_id: unique("slow-group"),
        client_id: "slow-probe".into(),
        policy: bounds.fixed(),
        drain_timeout: Duration::from_secs(5),
        queue_capacity: 4096,
        queue_max_bytes: 32 << 20,
        prepare_next_batch: true,
        throughput_window: Duration::from_secs(60),
        stall_after: Duration::from_secs(120),
        latency_target: Some(target_rx),
        lanes: None,
    };
    let status = Arc::new(StageStatus::default());
    let running = tokio::spawn({
        let (kafka, shutdown, status) = (kafka.clone(), shutdown.clone(), status.clone());
        async move { run_stage(&kafka, options, Slow, status, shutdown).await }
    });
    let send = |i: usize| {
        let payload = format!("message {i}");
        let record: FutureRecord<'_, [u8], str> = FutureRecord::to(&topic).partition(0).payload(&payload);
        producer.send_result(record).map_err(|(e, _)| e).expect("queued")
    };

    // A light stream (200 a second): batches are cut by the 50 ms wait, so
    // every event waits about that long, over the 30 ms target. The wait
    // comes down; the batch size, which cut none of them, stays.
    let deadline = Instant::now() + Duration::from_secs(60);
    let mut i = 0;
    let lowered = loop {
        let state = status.controller();
        if let Some(state) = state.as_ref().filter(|s| s.max_wait_ms < bounds.max_wait_ms) {
            break state.clone();
        }
        assert!(Instant::now() < deadline, "the wait did not come down: {state:?}");
        // Not awaited: the stream goes on at its pace; the backlog below is.
        drop(send(i));
        i += 1;
        tokio::time::sleep(Duration::from_millis(5)).await;
    };
    assert_eq!(lowered.target_ms, 30);
    assert_eq!(lowered.max_batch_size, bounds.max_batch_size, "{lowered:?}");
    assert!(lowered.last_change.as_deref().is_some_and(|r| r.contains("the wait shrinks")), "{lowered:?}");

    // A backlog: 40,000 at once, whose records wait seconds in the topic
    // while full batches take about 100 ms. Smaller batches would serve
    // fewer a second and lengthen the wait: the batch size holds.
    let deliveries: Vec<_> = (0..40_000).map(|n| send(i + n)).collect();
    for delivery in deliveries {
        delivery.await.expect("not cancelled").map_err(|(e, _)| e).expect("delivered");
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    let backlogged = loop {
        let state = status.controller().expect("the controller is on");
        if state.p99_ms.is_some_and(|p| p > 1000.0) {
            break state;
        }
        assert!(Instant::now() < deadline, "no decision on the backlog: {state:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    assert_eq!(backlogged.max_batch_size, bounds.max_batch_size, "{backlogged:?}");

    // Off, live: the controller stops and the configured policy applies again.
    target.send_replace(0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while status.controller().is_some() {
        assert!(Instant::now() < deadline, "the controller is still on: {:?}", status.controller());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
    let _ = running.await.expect("stage task");
}

// ---------------------------------------------------------------- lanes

/// Each batch the probe saw: bulk or not, and its inputs' (topic, offset).
type SeenBatches = Arc<std::sync::Mutex<Vec<(bool, Vec<(String, i64)>)>>>;

/// A stage that takes 1 ms per batch, records each batch's lane and inputs,
/// and forwards every input to `out`.
struct Laned {
    out: Arc<str>,
    seen: SeenBatches,
}

impl Stage for Laned {
    fn name(&self) -> &'static str {
        "lane-probe"
    }

    async fn process(&mut self, batch: &[Incoming]) -> Result<Vec<Output>, BatchFailure> {
        tokio::time::sleep(Duration::from_millis(1)).await;
        let bulk = batch[0].topic.ends_with(".bulk");
        let inputs = batch.iter().map(|i| (i.topic.to_string(), i.offset)).collect();
        self.seen.lock().expect("not poisoned").push((bulk, inputs));
        let send = |(source, input): (usize, &Incoming)| Output::Send {
            source,
            topic: self.out.clone(),
            key: None,
            payload: input.payload.clone(),
        };
        Ok(batch.iter().enumerate().map(send).collect())
    }
}

/// How many records `topic` holds, read from the start.
async fn count_records(kafka: &KafkaConfig, topic: &str, want: usize) -> usize {
    let consumer: StreamConsumer =
        kafka.consumer_config("lane-count", &unique("lane-count")).create().expect("consumer");
    consumer.subscribe(&[topic]).expect("subscribed");
    let mut seen = 0;
    while seen < want {
        match tokio::time::timeout(Duration::from_secs(10), consumer.recv()).await {
            Ok(Ok(_)) => seen += 1,
            Ok(Err(e)) => panic!("reading {topic}: {e}"),
            Err(_) => break,
        }
    }
    seen
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_lanes_live_goes_first_bulk_keeps_its_share_and_a_full_bulk_queue_pauses_only_bulk() {
    let cluster = EmbeddedCluster::start().expect("mock cluster");
    let (input, out) = (unique("lanes.in"), unique("lanes.out"));
    let (bulk_input, bulk_out) = (format!("{input}.bulk"), format!("{out}.bulk"));
    let topics: Vec<TopicSpec> = [&input, &bulk_input, &out, &bulk_out]
        .into_iter()
        .map(|name| TopicSpec { name: name.clone(), partitions: 1, replication: 1 })
        .collect();
    cluster.create_topics(&topics).expect("topics");
    let kafka = cluster.kafka_config(&KafkaConfig::default());
    let producer: FutureProducer = kafka.producer_config("lanes-test").create().expect("producer");
    let (bulk_count, live_count) = (2_000, 400);
    let (_share, share_rx) = watch::channel(4u64);
    let shutdown = CancellationToken::new();
    let options = RunOptions {
        input_topic: input.clone(),
        dead_letter_topic: unique("lanes.dead"),
        group_id: unique("lanes-group"),
        client_id: "lane-probe".into(),
        policy: BatchPolicy { max_batch_size: 8, max_wait_ms: 0 }.fixed(),
        drain_timeout: Duration::from_secs(5),
        // Four batches per lane: the bulk backlog fills its queue at once.
        queue_capacity: 32,
        queue_max_bytes: 32 << 20,
        prepare_next_batch: true,
        throughput_window: Duration::from_secs(60),
        stall_after: Duration::from_secs(120),
        latency_target: None,
        lanes: Some(Lanes { suffix: ".bulk".into(), twinned: vec![out.clone()], bulk_share: share_rx }),
    };
    let send_all = |topic: &str, count: usize| {
        let deliveries: Vec<_> = (0..count)
            .map(|i| {
                let payload = format!("{topic} {i}");
                let record: FutureRecord<'_, [u8], str> = FutureRecord::to(topic).partition(0).payload(&payload);
                producer.send_result(record).map_err(|(e, _)| e).expect("queued")
            })
            .collect();
        async move {
            for delivery in deliveries {
                delivery.await.expect("not cancelled").map_err(|(e, _)| e).expect("delivered");
            }
        }
    };
    // Both backlogs wait before the stage starts: from the start, both lanes
    // have batches to take.
    send_all(&bulk_input, bulk_count).await;
    send_all(&input, live_count).await;
    let seen = Arc::new(std::sync::Mutex::new(Vec::new()));
    let stage = Laned { out: out.as_str().into(), seen: seen.clone() };
    let status = Arc::new(StageStatus::default());
    let running = tokio::spawn({
        let (kafka, shutdown, status) = (kafka.clone(), shutdown.clone(), status.clone());
        async move { run_stage(&kafka, options, stage, status, shutdown).await }
    });

    let deadline = Instant::now() + Duration::from_secs(60);
    let processed = |seen: &[(bool, Vec<(String, i64)>)]| seen.iter().map(|(_, b)| b.len()).sum::<usize>();
    while processed(&seen.lock().expect("not poisoned")) < bulk_count + live_count {
        assert!(Instant::now() < deadline, "not all processed: {}", processed(&seen.lock().expect("not poisoned")));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let deadline = Instant::now() + Duration::from_secs(10);
    while status.bulk_paused() {
        assert!(Instant::now() < deadline, "the bulk partition was never resumed");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    // The bulk backlog filled its queue: the bulk partition was paused (not
    // the stage: live went on) and resumed, more than once over the drain.
    let pauses = status.bulk_pauses();
    assert!(pauses >= 2, "paused and resumed repeatedly while the backlog drained: {pauses}");

    let seen = seen.lock().expect("not poisoned").clone();
    // Every input exactly once, in order, each batch from one lane only.
    for (topic, count) in [(&bulk_input, bulk_count), (&input, live_count)] {
        let offsets: Vec<i64> =
            seen.iter().flat_map(|(_, b)| b.iter()).filter(|(t, _)| t == topic).map(|(_, o)| *o).collect();
        assert_eq!(offsets, (0..count as i64).collect::<Vec<_>>(), "{topic}: each once, in order, none lost");
    }
    assert!(seen.iter().all(|(bulk, b)| b.iter().all(|(t, _)| t.ends_with(".bulk") == *bulk)), "one lane per batch");
    // Up to the last live batch, live goes first and bulk keeps
    // its share: one batch in 4 while both wait (3 live for each bulk one).
    // From the first bulk batch after the first live one: at the start the
    // consumer may have fetched only one lane's records. When it fetched bulk
    // first, the bulk lane filled and paused before any live record came; the
    // bulk records fetched after the resume then queue behind every live
    // record already prefetched (one consumer queue for both topics; see
    // docs/tuning.md, "Lanes"), and there is no bulk batch to take meanwhile.
    // The same wait comes back whenever the bulk lane runs dry later on (a
    // bulk batch cut short, here with max_wait 0: the lane held fewer than 8
    // records): its next records were fetched behind live ones, and there is
    // again no bulk batch to take until they come. So the share is checked
    // while bulk had work in the stage, from that first bulk batch to the
    // first bulk batch cut short (or the last live batch).
    let last = seen.iter().rposition(|(bulk, _)| !bulk).expect("live batches");
    let first_live = seen.iter().position(|(bulk, _)| !bulk).expect("live batches");
    let first = first_live + seen[first_live..].iter().position(|(bulk, _)| *bulk).expect("bulk batches");
    assert!(first < last, "bulk came only after all live work: no share while live waited");
    let short = seen[first..=last].iter().position(|(bulk, b)| *bulk && b.len() < 8).map_or(last + 1, |i| first + i);
    let count = |span: &[(bool, Vec<(String, i64)>)]| {
        let bulk = span.iter().filter(|(bulk, _)| *bulk).count();
        (span.len() - bulk, bulk)
    };
    let (live, bulk) = count(&seen[first..=last]);
    assert!(bulk * 2 <= live + 2, "live first: {live} live and {bulk} bulk batches while live waited");
    let span = &seen[first..short];
    assert!(span.len() >= 8, "bulk ran dry at once: too short a stretch to judge its share: {:?}", span.len());
    let (live, bulk) = count(span);
    let order: String = seen.iter().map(|(bulk, b)| format!("{}{} ", if *bulk { 'B' } else { 'L' }, b.len())).collect();
    assert!(
        bulk * 6 >= live,
        "bulk kept its share (1 in 4): {live} live and {bulk} bulk batches while live waited: {order}"
    );

    // A bulk input's outputs go to the bulk twin of their topic.
    assert_eq!(count_records(&kafka, &bulk_out, bulk_count).await, bulk_count, "bulk outputs in {bulk_out}");
    assert_eq!(count_records(&kafka, &out, live_count).await, live_count, "live outputs in {out}");
    shutdown.cancel();
    running.await.expect("stage task").expect("clean stop");
}

// ---------------------------------------------------------------- tracing

const TOPICS: [&str; 4] = ["fetched", "normalized", "inferred", "predictions"];

/// What one record of an event carried.
#[derive(Debug, Clone)]
struct Hop {
    traceparent: Option<String>,
    /// The envelope's `traceparent`, for the inter-stage topics.
    envelope: Option<Option<String>>,
}

/// Every record read, by event id (the records' key) and topic (without the prefix).
type Hops = HashMap<String, HashMap<String, Vec<Hop>>>;

fn header(message: &impl Message) -> Option<String> {
    let headers = message.headers()?;
    let found = headers.iter().find(|h| h.key == TRACEPARENT_HEADER)?;
    Some(String::from_utf8_lossy(found.value?).into_owned())
}

fn valid(value: &str) -> TraceParent {
    assert_eq!(value.len(), TRACEPARENT_LEN, "{value:?}");
    assert!(value.starts_with("00-"), "{value:?}");
    TraceParent::parse(value.as_bytes()).unwrap_or_else(|| panic!("invalid traceparent {value:?}"))
}

/// The one record of `event` on `topic`, and its parsed trace context.
fn hop<'a>(hops: &'a Hops, event: &str, topic: &str) -> (&'a Hop, TraceParent) {
    let records = hops.get(event).and_then(|t| t.get(topic)).unwrap_or_else(|| panic!("{event}: nothing on {topic}"));
    assert_eq!(records.len(), 1, "{event} on {topic}: {records:?}");
    let record = &records[0];
    let traceparent = record.traceparent.as_deref().unwrap_or_else(|| panic!("{event} on {topic}: no traceparent"));
    (record, valid(traceparent))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn every_record_carries_the_trace_of_its_request_through_every_stage() {
    let p = TestPipeline::start(
        "tracing",
        2,
        "[inferrer]\nserve = [\"stock\"]\n\n[normalizer]\ntokenize_queries = false\n",
        Processes::EachStage,
    );

    // Requests with a traceparent header, without one, and with a malformed one
    // (treated as none); and two that become dead letters, in the fetcher (not
    // JSON) and in the normalizer (a query while queries are not served).
    let stock =
        |id: &str| format!(r#"{{"kind": "stock", "event_id": "{id}", "symbol": "S0042", "as_of": "2024-05-31"}}"#);
    // Flags are passed on as they came: sampled (01) or not (00).
    let traced: Vec<(String, TraceParent)> =
        (0..4u8).map(|i| (format!("traced-{i}"), TraceParent { flags: i % 2, ..TraceParent::root() })).collect();
    let untraced: Vec<String> = (0..4).map(|i| format!("untraced-{i}")).collect();
    let malformed = ("malformed-0".to_string(), "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".to_string());
    let not_json = ("not-json-0".to_string(), TraceParent::root());
    let query = ("query-0".to_string(), TraceParent::root());
    let mut requests: Vec<(String, String, Option<String>)> = Vec::new();
    requests.extend(traced.iter().map(|(id, t)| (id.clone(), stock(id), Some(t.to_string()))));
    requests.extend(untraced.iter().map(|id| (id.clone(), stock(id), None)));
    requests.push((malformed.0.clone(), stock(&malformed.0), Some(malformed.1.clone())));
    requests.push((not_json.0.clone(), "{not json".into(), Some(not_json.1.to_string())));
    requests.push((
        query.0.clone(),
        format!(r#"{{"kind": "query", "event_id": "{}", "text": "what is my balance"}}"#, query.0),
        Some(query.1.to_string()),
    ));
    let producer: FutureProducer = p.kafka.producer_config("tracing-test").create().expect("producer");
    let requests_topic = p.topic("requests");
    for (id, json, traceparent) in &requests {
        let mut record: FutureRecord<'_, str, str> =
            FutureRecord::to(&requests_topic).key(id.as_str()).payload(json.as_str());
        if let Some(value) = traceparent {
            record = record
                .headers(OwnedHeaders::new().insert(Header { key: TRACEPARENT_HEADER, value: Some(value.as_str()) }));
        }
        producer.send(record, Duration::from_secs(10)).await.map_err(|(e, _)| e).expect("delivered");
    }

    // Every topic downstream of the requests, headers and all.
    let mut config_reader = p.kafka.consumer_config("tracing-reader", &unique("tracing-reader"));
    config_reader.set("enable.auto.commit", "false").set("statistics.interval.ms", "0");
    let reader: StreamConsumer = config_reader.create().expect("reader");
    let names: Vec<String> = TOPICS.iter().chain(&["dead-letters"]).map(|t| p.topic(t)).collect();
    reader.subscribe(&names.iter().map(String::as_str).collect::<Vec<_>>()).expect("subscribe");
    let valid_ids: Vec<&str> = traced
        .iter()
        .map(|(id, _)| id.as_str())
        .chain(untraced.iter().map(String::as_str))
        .chain([malformed.0.as_str()])
        .collect();
    let mut hops: Hops = HashMap::new();
    let done = |hops: &Hops| {
        let on = |id: &str, topic: &str| hops.get(id).is_some_and(|t| t.contains_key(topic));
        valid_ids.iter().all(|id| TOPICS.iter().all(|t| on(id, t)))
            && on(&not_json.0, "dead-letters")
            && on(&query.0, "dead-letters")
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    let mut quiet_from: Option<Instant> = None;
    // Until everything arrived, and then 2 s more to catch duplicates.
    while quiet_from.is_none_or(|t| t.elapsed() < Duration::from_secs(2)) {
        assert!(Instant::now() < deadline, "not every record arrived: {hops:#?}\n{}", p.logs(20));
        let Ok(received) = tokio::time::timeout(Duration::from_millis(200), reader.recv()).await else {
            if quiet_from.is_none() && done(&hops) {
                quiet_from = Some(Instant::now());
            }
            continue;
        };
        let message = received.expect("read");
        let topic = message.topic().strip_prefix(&format!("{}.", p.prefix)).expect("our topic").to_string();
        let key = String::from_utf8_lossy(message.key().expect("every record is keyed")).into_owned();
        let envelope = (topic != "predictions" && topic != "dead-letters")
            .then(|| codec::decode(message.payload().unwrap_or_default()).expect("an envelope").traceparent);
        hops.entry(key).or_default().entry(topic).or_default().push(Hop { traceparent: header(&message), envelope });
        if quiet_from.is_none() && done(&hops) {
            quiet_from = Some(Instant::now());
        }
    }

    // A request with a trace: every hop is its descendant, each hop a new span,
    // and the envelope keeps the request's traceparent.
    for (id, request) in &traced {
        let mut spans = HashSet::from([request.parent_id]);
        for topic in TOPICS {
            let (record, t) = hop(&hops, id, topic);
            assert_eq!(
                (t.trace_id_hex(), t.flags),
                (request.trace_id_hex(), request.flags),
                "{id} on {topic}: not the request's trace"
            );
            assert!(spans.insert(t.parent_id), "{id} on {topic}: parent id {:016x} used before", t.parent_id);
            if let Some(envelope) = &record.envelope {
                assert_eq!(envelope.as_deref(), Some(request.to_string().as_str()), "{id}'s envelope on {topic}");
            }
        }
    }

    // A request without one (or with a malformed one): a new trace at the
    // fetcher, the same on every hop, one per event.
    let mut new_traces = HashSet::new();
    for id in untraced.iter().chain([&malformed.0]) {
        let (_, first) = hop(&hops, id, TOPICS[0]);
        assert!(new_traces.insert(first.trace_id), "{id} shares its trace id with another event");
        assert_ne!(first.trace_id, 0x4bf92f3577b34da6a3ce929d0e0e4736, "{id} took the malformed trace id");
        let mut spans = HashSet::new();
        for topic in TOPICS {
            let (record, t) = hop(&hops, id, topic);
            assert_eq!(t.trace_id_hex(), first.trace_id_hex(), "{id} on {topic} changed trace");
            assert!(spans.insert(t.parent_id), "{id} on {topic}: parent id {:016x} used before", t.parent_id);
            if let Some(envelope) = &record.envelope {
                assert_eq!(envelope, &None, "{id}'s envelope on {topic}: the request had no valid traceparent");
            }
        }
    }
    for (id, _) in &traced {
        assert!(!new_traces.contains(&hop(&hops, id, TOPICS[0]).1.trace_id));
    }

    // Dead letters carry the trace of the input they reject.
    for (id, request) in [&not_json, &query] {
        let (_, t) = hop(&hops, id, "dead-letters");
        assert_eq!(t.trace_id_hex(), request.trace_id_hex(), "{id}'s dead letter");
        assert_ne!(t.parent_id, request.parent_id, "{id}'s dead letter");
    }
    let (_, fetched) = hop(&hops, &query.0, "fetched");
    assert_eq!(fetched.trace_id, query.1.trace_id);
}

// ---------------------------------------------------------------- alerted series

/// A replica that never gets a partition (its broker never answers) exports
/// the series the alerts watch, at 0, from the start: a gauge or counter that
/// appears only when it first changes would hide that replica from
/// `SluiceNoPartitionsAssigned` and the first failure from alerts on
/// `increase()`. Every `sluice_` metric it exports is documented.
#[test]
fn a_replica_never_assigned_exports_the_alerted_series_at_zero() {
    let _heavy = heavy_test_lock();
    let dir = temp_dir("unassigned");
    let nowhere = format!("127.0.0.1:{}", free_port());
    let config = write_config(&dir, &nowhere, &unique("unassigned"), 1, "[runtime]\ndrain_timeout_ms = 1000\n");
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    let mut inferrer = StageProcess::command(&config, &["--listen", &listen, "run", "inferrer"], "inferrer", &dir);
    // The stock and the query inferrer.
    inferrer.wait_for_log("stage started", 2, Duration::from_secs(120));
    let (code, text) = wait_for_http(port, "/metrics", Duration::from_secs(30), |_, _| true);
    assert_eq!(code, 200);
    let found = series(&text);
    let value = |name: &str, labels: &[(&str, &str)]| {
        let labels = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        found.get(&(name.to_string(), labels)).copied()
    };
    let mut expected = vec![
        ("sluice_model_load_failures_total", vec![("model", "stock-lstm")]),
        ("sluice_model_load_failures_total", vec![("model", "query-intent")]),
        ("sluice_model_out_of_memory_total", vec![("model", "stock-lstm")]),
        ("sluice_model_out_of_memory_total", vec![("model", "query-intent")]),
        ("sluice_overrides_refused_total", vec![("field", "max_batch_size")]),
        ("sluice_overrides_refused_total", vec![("field", "unknown")]),
    ];
    for model in ["stock-lstm", "query-intent"] {
        for decision in ["promoted", "rolled_back"] {
            expected.push(("sluice_rollout_decisions_total", vec![("model", model), ("decision", decision)]));
        }
    }
    for (stage, reasons) in
        [("inferrer", StockTask::DEAD_LETTER_REASONS), ("query-inferrer", QueryTask::DEAD_LETTER_REASONS)]
    {
        expected.push(("sluice_kafka_assigned_partitions", vec![("stage", stage)]));
        expected.push(("sluice_stage_events_acknowledged_total", vec![("stage", stage)]));
        expected.push(("sluice_stage_batch_failures_total", vec![("stage", stage), ("retryable", "false")]));
        expected.push(("sluice_stage_batch_failures_total", vec![("stage", stage), ("retryable", "true")]));
        for reason in reasons.iter().map(|r| r.as_str()).chain(["output_too_large"]) {
            expected.push(("sluice_stage_dead_letters_total", vec![("stage", stage), ("reason", reason)]));
        }
    }
    for (name, labels) in &expected {
        assert_eq!(value(name, labels), Some(0.0), "{name}{labels:?} at 0 in /metrics:\n{text}");
    }

    let documented = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/instrumentation.md"))
        .expect("docs/instrumentation.md");
    for (name, _) in found.keys().filter(|(name, _)| name.starts_with("sluice_")) {
        let base = ["_bucket", "_sum", "_count"].iter().find_map(|s| name.strip_suffix(s)).unwrap_or(name);
        assert!(documented.contains(&format!("`{base}`")), "{base} is exported but not in docs/instrumentation.md");
    }

    inferrer.signal("TERM");
    assert!(
        inferrer.wait(Duration::from_secs(30)).is_some(),
        "the inferrer did not stop:\n{}",
        tail(&inferrer.logs(), 30)
    );
}

// ---------------------------------------------------------------- a real Prometheus

/// `text` percent-encoded for a URL's query string.
fn encoded(text: &str) -> String {
    text.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Prometheus' answer to `path` (its `data`), failing on anything but success.
fn prometheus_api(port: u16, path: &str) -> serde_json::Value {
    let (code, body) =
        sluice_testkit::http_get(port, path).unwrap_or_else(|| panic!("Prometheus: no answer to {path}"));
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{path}: {e}: {body}"));
    assert!(code == 200 && answer["status"] == "success", "{path}: {code} {body}");
    answer["data"].clone()
}

#[test]
#[allow(clippy::too_many_lines, reason = "one scenario, start to end")]
fn prometheus_scrapes_the_four_stages_and_every_panel_and_alert_rule_evaluates() {
    let mut p = TestPipeline::start(
        "prometheus",
        2,
        // A pipeline name of its own: its cache starts empty, so the models run.
        &format!("[control]\nredis_url = \"{}\"\npipeline = \"{}\"\n", sluice_testkit::LOCAL_REDIS, unique("prom")),
        Processes::None,
    );
    let mut targets = Vec::new();
    for stage in ["fetcher", "normalizer", "inferrer", "writer"] {
        let port = free_port();
        let listen = format!("127.0.0.1:{port}");
        p.stages.push(StageProcess::command(&p.config, &["--listen", &listen, "run", stage], stage, &p.dir));
        targets.push((stage, port));
    }
    for (_, port) in &targets {
        wait_for_http(*port, "/readyz", Duration::from_secs(120), |code, _| code == 200);
    }
    // Stock events twice (the second time from the cache), queries, and a few invalid ones.
    let events = sluice_stages::generate::generate("prometheus", 200, 20, 5000);
    let queries = sluice_stages::generate::generate_queries("prometheus", 20);
    let lines: Vec<&[u8]> = events.iter().chain(&events).chain(&queries).map(|e| e.json.as_slice()).collect();
    p.produce("events", lines);

    let dir = p.path("prometheus");
    std::fs::create_dir_all(&dir).expect("dir");
    let rules = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy/prometheus/alerts.yml");
    let mut config = format!(
        "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nrule_files:\n  - {}\nscrape_configs:\n",
        rules.display()
    );
    for (stage, port) in &targets {
        config.push_str(&format!(
            "  - job_name: sluice-{stage}\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ));
    }
    std::fs::write(dir.join("prometheus.yml"), config).expect("config");
    let port = free_port();
    let prometheus = std::process::Command::new(std::env::var("PROMETHEUS").unwrap_or_else(|_| "prometheus".into()))
        .arg(format!("--config.file={}", dir.join("prometheus.yml").display()))
        .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
        .arg(format!("--web.listen-address=127.0.0.1:{port}"))
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(dir.join("prometheus.log")).expect("log"))
        .spawn();
    let mut prometheus = prometheus.expect("prometheus (Debian's prometheus package, which `make test` installs)");
    let log = || std::fs::read_to_string(dir.join("prometheus.log")).unwrap_or_default();

    // Every stage scraped, twice at least (rates need two samples).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let ready = sluice_testkit::http_get(port, "/api/v1/query?query=up").is_some_and(|(code, body)| {
            let up: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
            let result = up["data"]["result"].as_array().cloned().unwrap_or_default();
            code == 200 && result.len() == 4 && result.iter().all(|r| r["value"][1] == "1")
        });
        if ready {
            break;
        }
        assert!(Instant::now() < deadline, "Prometheus did not scrape the four stages:\n{}", tail(&log(), 20));
        std::thread::sleep(Duration::from_millis(200));
    }
    // Until the events are through, and a little longer for rates over it.
    let written = |(_, port): &(&str, u16)| {
        let metrics = sluice_testkit::http_get(*port, "/metrics").map(|(_, body)| body).unwrap_or_default();
        series(&metrics)
            .into_iter()
            .filter(|((name, _), _)| name == "sluice_writer_predictions_written_total")
            .map(|(_, v)| v)
            .sum::<f64>()
    };
    let deadline = Instant::now() + Duration::from_secs(180);
    while written(&targets[3]) < 200.0 {
        assert!(Instant::now() < deadline, "the events did not get through: {}", p.logs(40));
        std::thread::sleep(Duration::from_millis(200));
    }
    std::thread::sleep(Duration::from_secs(5));

    // Every dashboard panel shows something: at least one of its queries returns series.
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("deploy/grafana/dashboards/sluice.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).expect("dashboard")).expect("JSON");
    let mut empty = Vec::new();
    // Rows hold no queries (a collapsed row holds its panels).
    let panels: Vec<serde_json::Value> = dashboard["panels"]
        .as_array()
        .into_iter()
        .flatten()
        .flat_map(|p| {
            if p["type"] == "row" { p["panels"].as_array().cloned().unwrap_or_default() } else { vec![p.clone()] }
        })
        .collect();
    for panel in &panels {
        let mut shown = false;
        for target in panel["targets"].as_array().into_iter().flatten() {
            let Some(expr) = target["expr"].as_str() else { continue };
            let expr = expr.replace("$__rate_interval", "30s");
            let data = prometheus_api(port, &format!("/api/v1/query?query={}", encoded(&expr)));
            shown |= data["result"].as_array().is_some_and(|r| !r.is_empty());
        }
        if !shown {
            empty.push(panel["title"].as_str().unwrap_or("?").to_string());
        }
    }
    assert!(panels.len() >= 10, "the dashboard was not read");
    if !empty.is_empty() {
        let names = prometheus_api(port, "/api/v1/label/__name__/values");
        panic!("panels that show nothing: {empty:?}; the series Prometheus has: {names}");
    }

    // Every alert rule has been evaluated without an error.
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let data = prometheus_api(port, "/api/v1/rules");
        let rules: Vec<serde_json::Value> = data["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .collect();
        let failing: Vec<String> = rules
            .iter()
            .filter(|r| r["health"] == "err")
            .map(|r| format!("{}: {}", r["name"], r["lastError"]))
            .collect();
        assert!(failing.is_empty(), "alert rules that fail to evaluate: {failing:?}");
        if rules.len() >= 15 && rules.iter().all(|r| r["health"] == "ok") {
            break;
        }
        assert!(Instant::now() < deadline, "rules not all evaluated: {rules:?}");
        std::thread::sleep(Duration::from_millis(500));
    }
    let _ = prometheus.kill();
    let _ = prometheus.wait();
    for stage in &mut p.stages {
        stage.signal("TERM");
        assert!(stage.wait(Duration::from_secs(30)).is_some_and(|s| s.success()), "{} did not drain", stage.stage);
    }
}
