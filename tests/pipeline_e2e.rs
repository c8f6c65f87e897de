//! End to end through a real broker process (tansu): the four stages run as
//! separate `sluice run` processes. Every valid event must come out as exactly
//! one prediction equal to the model's own computation, every invalid one as a
//! dead letter with its reason, and nothing else may appear. Other tests
//! kill the inferrer mid-stream, make inferrers join and leave the group
//! mid-stream, and freeze the broker mid-stream, and check that no event is lost.

use std::collections::{HashMap, HashSet};
use std::io::Write;
use std::time::{Duration, Instant};

use sluice_kafka::client::TopicReader;
use sluice_messages::dead_letter::DeadLetter;
use sluice_messages::prediction::PredictionRecord;
use sluice_stages::fetcher::SyntheticConfig;
use sluice_stages::generate::{Expected, GeneratedEvent, generate};
use sluice_testkit::{
    Processes, StageProcess, TestPipeline, peak_rss_bytes, reference_predictions, sluice, start_stages, tail,
    write_events,
};

/// Predictions must equal the reference computation to this absolute tolerance.
const TOLERANCE: f32 = 1e-5;

/// Everything read back from the output and dead-letter topics.
#[derive(Debug, Default)]
struct Seen {
    predictions: HashMap<String, Vec<PredictionRecord>>,
    /// Dead letters by event id, or by payload when the id could not be read
    /// (a later stage's dead letter carries that stage's input, not the request).
    dead: HashMap<DeadKey, Vec<DeadLetter>>,
}

impl Seen {
    fn prediction_count(&self) -> usize {
        self.predictions.values().map(Vec::len).sum()
    }

    fn dead_count(&self) -> usize {
        self.dead.values().map(Vec::len).sum()
    }
}

#[derive(Debug, PartialEq, Eq, Hash)]
enum DeadKey {
    Id(String),
    Payload(Vec<u8>),
}

/// Reads until `done(seen)` holds and then `quiet` passes with nothing new, or
/// until `timeout`.
async fn read_until(
    reader: &TopicReader,
    predictions_topic: &str,
    seen: &mut Seen,
    timeout: Duration,
    quiet: Duration,
    done: impl Fn(&Seen) -> bool,
) {
    let deadline = Instant::now() + timeout;
    let mut done_at: Option<Instant> = None;
    while Instant::now() < deadline {
        if done_at.is_none() && done(seen) {
            done_at = Some(Instant::now());
        }
        if done_at.is_some_and(|t| t.elapsed() >= quiet) {
            return;
        }
        let Some(record) = reader.next(Duration::from_millis(200)).await else { continue };
        let record = record.expect("read");
        if record.topic == predictions_topic {
            let p: PredictionRecord = serde_json::from_slice(&record.payload).expect("prediction JSON");
            seen.predictions.entry(p.event_id.clone()).or_default().push(p);
        } else {
            let d: DeadLetter = serde_json::from_slice(&record.payload).expect("dead-letter JSON");
            let key = match &d.event_id {
                Some(id) => DeadKey::Id(id.clone()),
                None => DeadKey::Payload(d.payload().expect("base64")),
            };
            seen.dead.entry(key).or_default().push(d);
        }
    }
}

/// The stages started as processes of their own, `events` published, and
/// everything read until `first` predictions are out (mid-stream for the tests
/// that then break something).
async fn stream(p: &mut TestPipeline, events: &[GeneratedEvent], first: usize) -> (TopicReader, Seen) {
    p.stages = start_stages(&p.config, &p.dir);
    let reader = p.reader(&["predictions", "dead-letters"]);
    p.produce("events", events.iter().map(|e| &e.json));
    let mut seen = Seen::default();
    read_until(&reader, &p.topic("predictions"), &mut seen, Duration::from_secs(300), Duration::ZERO, |s| {
        s.predictions.len() >= first
    })
    .await;
    assert!(seen.predictions.len() >= first, "the pipeline did not get going\n{}", p.logs(40));
    assert!(seen.predictions.len() < events.len(), "the stream was over too soon: make it longer");
    (reader, seen)
}

/// Reads the rest, then: every event has a prediction, none names an unknown
/// event, nothing was dead-lettered. Returns the duplicates (at-least-once).
async fn assert_none_lost(
    p: &TestPipeline,
    reader: &TopicReader,
    seen: &mut Seen,
    events: &[GeneratedEvent],
    across: &str,
) -> usize {
    read_until(reader, &p.topic("predictions"), seen, Duration::from_secs(600), Duration::from_secs(3), |s| {
        s.predictions.len() >= events.len()
    })
    .await;
    let ids: HashSet<&str> = events.iter().map(|e| e.event_id.as_str()).collect();
    let missing = ids.iter().filter(|id| !seen.predictions.contains_key(**id)).count();
    assert_eq!(missing, 0, "{missing} events lost {across}\n{}", p.logs(40));
    assert!(seen.predictions.keys().all(|id| ids.contains(id.as_str())), "predictions for unknown events");
    assert!(seen.dead.is_empty(), "unexpected dead letters: {:?}", seen.dead.values().next());
    seen.prediction_count() - seen.predictions.len()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn ten_thousand_events_through_four_processes() {
    let mut p = TestPipeline::start("e2e", 4, "", Processes::None);

    // About 1% invalid, of eight different kinds.
    let events = generate("e2e", 10_000, 100, SyntheticConfig::default().universe);
    let invalid: Vec<&GeneratedEvent> =
        events.iter().filter(|e| matches!(e.expected, Expected::DeadLetter { .. })).collect();
    let valid_count = events.len() - invalid.len();
    assert_eq!(invalid.len(), 100);
    let expected = reference_predictions(&events, "1");
    assert_eq!(expected.len(), valid_count);

    p.stages = start_stages(&p.config, &p.dir);
    let reader = p.reader(&["predictions", "dead-letters"]);
    let file = write_events(&p.dir, events.iter().map(|e| &e.json));
    let published = p.sluice(&["produce", "--file", file.to_str().expect("utf-8")]);
    assert!(published.contains("published 10000 events"), "{published}");

    let mut seen = Seen::default();
    read_until(&reader, &p.topic("predictions"), &mut seen, Duration::from_secs(600), Duration::from_secs(5), |s| {
        s.prediction_count() >= valid_count && s.dead_count() >= invalid.len()
    })
    .await;
    let logs = p.logs(40);

    // Every valid event: exactly one prediction, equal to the reference.
    let missing: Vec<&String> = expected.keys().filter(|id| !seen.predictions.contains_key(*id)).take(5).collect();
    assert!(
        missing.is_empty(),
        "{} of {valid_count} valid events have no prediction, e.g. {missing:?}\n{logs}",
        valid_count - seen.predictions.len()
    );
    let mut worst = 0f32;
    for (id, records) in &seen.predictions {
        let (r, c) = expected.get(id).unwrap_or_else(|| panic!("a prediction for {id}, which is not a valid event"));
        assert_eq!(records.len(), 1, "{id} has {} predictions", records.len());
        let record = &records[0];
        worst = worst.max((record.predicted_return - r).abs()).max((record.confidence - c).abs());
        // A cached answer (none expected: generated inputs do not repeat) has no batch.
        let sized = if record.cached { record.batch_size == 0 } else { (1..=64).contains(&record.batch_size) };
        assert!(sized && record.kind == "stock" && record.model.version == "1", "{record:?}");
    }
    assert!(worst <= TOLERANCE, "a prediction differs from the reference by {worst}");

    // Every invalid event: one dead letter with its reason and coordinates.
    for e in &invalid {
        let Expected::DeadLetter { reason } = e.expected else { unreachable!() };
        let letters = seen
            .dead
            .get(&DeadKey::Id(e.event_id.clone()))
            .or_else(|| seen.dead.get(&DeadKey::Payload(e.json.clone())))
            .unwrap_or_else(|| panic!("no dead letter for {}\n{logs}", e.event_id));
        assert_eq!(letters.len(), 1, "{} dead-lettered {} times", e.event_id, letters.len());
        let letter = &letters[0];
        assert_eq!(letter.reason, reason, "{}: {}", e.event_id, letter.detail);
        assert!(!letter.detail.is_empty() && !letter.stage.is_empty());
        assert!(letter.source.topic == p.topic("requests") || letter.source.topic == p.topic("fetched"));
        assert!(letter.source.offset >= 0 && letter.source.partition >= 0);
    }
    // Nothing else.
    assert_eq!(seen.prediction_count(), valid_count, "extra predictions");
    assert_eq!(seen.dead_count(), invalid.len(), "extra dead letters");

    // SIGTERM drains and exits cleanly.
    for stage in &p.stages {
        stage.signal("TERM");
    }
    for stage in &mut p.stages {
        let status = stage.wait(Duration::from_secs(30));
        assert!(
            status.is_some_and(|s| s.success()),
            "{} exited with {status:?}\n{}",
            stage.stage,
            tail(&stage.logs(), 30)
        );
        assert!(
            stage.logs().contains("offsets committed"),
            "{} did not drain\n{}",
            stage.stage,
            tail(&stage.logs(), 30)
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn killing_the_inferrer_mid_stream_loses_nothing() {
    // Small batches and a slow deadline keep the inferrer busy long enough to be
    // killed in the middle of the stream.
    let mut p = TestPipeline::start(
        "restart",
        4,
        "[inferrer]\nbatch = { max_batch_size = 8, max_wait_ms = 5 }\n",
        Processes::None,
    );
    let events = generate("restart", 4000, 0, SyntheticConfig::default().universe);
    let (reader, mut seen) = stream(&mut p, &events, 500).await;
    let before_kill = seen.predictions.len();

    p.stages[2].signal("KILL");
    assert!(p.stages[2].wait(Duration::from_secs(10)).is_some(), "the inferrer did not die");
    p.restart(2);

    let duplicates = assert_none_lost(&p, &reader, &mut seen, &events, "after the inferrer was killed").await;
    // At-least-once: a kill can re-deliver what the dead inferrer had not committed.
    std::io::stderr()
        .write_all(
            format!("restart test: {before_kill} predictions before the kill, {duplicates} duplicates after it\n")
                .as_bytes(),
        )
        .expect("stderr");
}

/// Consumers join and leave mid-stream: a second inferrer joins, then the
/// first leaves (SIGTERM). With cooperative-sticky assignment only the moved
/// partitions pause; nothing is lost, nothing stalls, and the duplicates (work
/// in flight for a partition that moved) are counted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn inferrers_joining_and_leaving_mid_stream_lose_nothing() {
    let mut p = TestPipeline::start(
        "rebalance",
        4,
        "[inferrer]\nserve = [\"stock\"]\nbatch = { max_batch_size = 8, max_wait_ms = 5 }\n",
        Processes::None,
    );
    let events = generate("rebalance", 4000, 0, SyntheticConfig::default().universe);
    let (reader, mut seen) = stream(&mut p, &events, 400).await;
    assert!(seen.predictions.len() < 2000, "the stream was nearly over before the join: make it longer");

    // A second inferrer joins the group: wait for its first assignment (the
    // topic names contain "rebalance" too, so that word matched at start-up,
    // before the join, and the first inferrer could leave mid-join).
    let joined = StageProcess::start(&p.config, "inferrer", &p.dir);
    joined.wait_for_log("kind=\"assign\"", 1, Duration::from_secs(60));
    let next = seen.predictions.len() + 600;
    let at_least = |s: &Seen| s.predictions.len() >= next;
    read_until(&reader, &p.topic("predictions"), &mut seen, Duration::from_secs(300), Duration::ZERO, at_least).await;
    // The first leaves, draining what it holds.
    p.stages[2].signal("TERM");
    let drained = p.stages[2].wait(Duration::from_secs(30)).is_some_and(|s| s.success());
    assert!(drained, "the first inferrer did not drain");
    p.stages.push(joined);

    let duplicates = assert_none_lost(&p, &reader, &mut seen, &events, "across the rebalances").await;
    // Bounded by what one inferrer can hold in flight (its queue and a few batches).
    assert!(duplicates <= 2048 + 64, "{duplicates} duplicates");
    let logs = p.stages[2..].iter().map(|s| s.logs()).collect::<String>();
    assert!(logs.contains("cooperative"), "the group uses the cooperative protocol\n{}", p.logs(40));
    std::io::stderr()
        .write_all(
            format!("rebalance test: {duplicates} duplicates at the output topic after a join and a leave\n")
                .as_bytes(),
        )
        .expect("stderr");
}

/// SIGTERM with the broker gone in the middle of a stream: the drain timeout
/// bounds the whole shutdown of every stage (the last batches, the final
/// commit, the producer flush, leaving the group), so each exits instead of
/// waiting on a broker that will not answer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn the_drain_timeout_bounds_shutdown_when_the_broker_is_gone() {
    let mut p = TestPipeline::start(
        "drain",
        2,
        "[runtime]\ndrain_timeout_ms = 2000\n\n[inferrer]\nserve = [\"stock\"]\nbatch = { max_batch_size = 8, max_wait_ms = 5 }\n",
        Processes::None,
    );
    let events = generate("drain", 3000, 0, SyntheticConfig::default().universe);
    // Mid-stream: some predictions are out, the rest is in flight.
    let _ = stream(&mut p, &events, 200).await;
    p.broker.kill();
    std::thread::sleep(Duration::from_millis(300));
    let stopping = Instant::now();
    for stage in &p.stages {
        stage.signal("TERM");
    }
    // Ten times the drain timeout: a hang would wait on librdkafka's own
    // timeouts (flush, commit, leaving the group: a minute or more).
    for stage in &mut p.stages {
        let exited = stage.wait(Duration::from_secs(20));
        // librdkafka reports the broker down ten times a second: without
        // those, the tail shows how far the drain got.
        let logs = stage.logs();
        let own: String = logs.lines().filter(|l| !l.contains("AllBrokersDown")).map(|l| format!("{l}\n")).collect();
        assert!(
            exited.is_some(),
            "{} still running {:?} after SIGTERM\n{}",
            stage.stage,
            stopping.elapsed(),
            tail(&own, 30)
        );
        assert!(stage.logs().contains("SIGTERM: draining"), "{}", tail(&stage.logs(), 30));
    }
    std::io::stderr()
        .write_all(format!("drain test: the last stage exited {:?} after SIGTERM\n", stopping.elapsed()).as_bytes())
        .expect("stderr");
}

/// The broker hangs mid-stream (SIGSTOP) for longer than the session timeout,
/// while more events are being published, and then comes back (SIGCONT). Every
/// stage rides it out with retries and backoff, none exits, memory stays
/// bounded, and every event comes out once the broker answers again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn a_broker_outage_mid_stream_is_ridden_out_and_loses_nothing() {
    let mut p = TestPipeline::start(
        "outage",
        4,
        "[inferrer]\nserve = [\"stock\"]\nbatch = { max_batch_size = 8, max_wait_ms = 5 }\n",
        Processes::None,
    );
    let events = generate("outage", 4000, 0, SyntheticConfig::default().universe);
    let (first, second) = events.split_at(2500);
    let (reader, mut seen) = stream(&mut p, first, 300).await;
    let before = seen.predictions.len();

    // Ten seconds without a broker (the session timeout is six), with a
    // producer publishing into the outage.
    p.broker.pause();
    let second_dir = p.path("second");
    std::fs::create_dir_all(&second_dir).expect("dir");
    let second_file = write_events(&second_dir, second.iter().map(|e| &e.json));
    let producing = {
        let config = p.config.clone();
        std::thread::spawn(move || sluice(&config, &["produce", "--file", second_file.to_str().expect("utf-8")]))
    };
    std::thread::sleep(Duration::from_secs(10));
    for stage in &mut p.stages {
        assert!(stage.running(), "{} exited during the outage\n{}", stage.stage, tail(&stage.logs(), 30));
    }
    p.broker.resume();
    let published = producing.join().expect("producer thread");
    assert!(published.contains("published 1500 events"), "{published}");

    let duplicates = assert_none_lost(&p, &reader, &mut seen, &events, "across the broker outage").await;
    let mut peaks = String::new();
    for stage in &mut p.stages {
        assert!(stage.running(), "{} exited after the outage\n{}", stage.stage, tail(&stage.logs(), 30));
        let peak = peak_rss_bytes(stage.pid());
        // Queues are bounded by configuration (the consumer's prefetch, the
        // batcher's queue, the producer's buffer), not by the backlog.
        assert!(peak < 1 << 30, "{} peaked at {peak} bytes resident", stage.stage);
        peaks.push_str(&format!(" {}={} MiB", stage.stage, peak >> 20));
    }
    std::io::stderr()
        .write_all(
            format!(
                "outage test: {before} predictions before a 10 s broker outage, {duplicates} duplicates; peak RSS{peaks}\n"
            )
            .as_bytes(),
        )
        .expect("stderr");
}

/// Lanes on, four stages in one process against tansu: live events, events
/// with `"priority": "bulk"`, events published with `sluice produce --bulk`
/// and a backfill. Each is answered once and correctly, and bulk work travels
/// in the bulk twins of the inter-stage topics while live work does not.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn with_lanes_bulk_work_travels_in_the_bulk_topics_and_every_event_is_answered() {
    let p = TestPipeline::start("lanes", 2, "[lanes]\nenabled = true\n", Processes::OneProcess);
    let universe = SyntheticConfig::default().universe;
    let live = generate("live", 300, 0, universe);
    let marked: Vec<GeneratedEvent> = generate("bulk", 200, 0, universe)
        .into_iter()
        .map(|mut e| {
            let mut json: serde_json::Value = serde_json::from_slice(&e.json).expect("JSON");
            json["priority"] = "bulk".into();
            e.json = serde_json::to_vec(&json).expect("JSON");
            e
        })
        .collect();
    let twin = generate("twin", 100, 0, universe);
    let backfill =
        br#"{"kind":"stock","event_id":"bf-1","symbol":"S0001","as_of":"2024-06-28","from":"2024-03-01","stride":2}"#;
    let steps = match sluice_messages::events::RequestEvent::from_json(backfill).expect("a valid backfill") {
        sluice_messages::events::RequestEvent::Stock(request) => request.steps().len(),
        other => panic!("{other:?}"),
    };
    let mut expected = reference_predictions(&live, "1");
    expected.extend(reference_predictions(&marked, "1"));
    expected.extend(reference_predictions(&twin, "1"));

    let reader = p.reader(&["predictions", "dead-letters"]);
    let between = p.reader(&["fetched", "fetched.bulk", "inferred", "inferred.bulk"]);
    p.produce("live", live.iter().map(|e| &e.json).chain(marked.iter().map(|e| &e.json)));
    p.produce("backfill", [backfill.to_vec()]);
    let dir = p.dir.join("twin");
    std::fs::create_dir_all(&dir).expect("events dir");
    let file = write_events(&dir, twin.iter().map(|e| &e.json));
    let published = p.sluice(&["produce", "--bulk", "--file", file.to_str().expect("utf-8")]);
    assert!(published.contains(&format!("published 100 events to {}", p.topic("requests.bulk"))), "{published}");

    let want = expected.len() + steps;
    let mut seen = Seen::default();
    read_until(&reader, &p.topic("predictions"), &mut seen, Duration::from_secs(300), Duration::from_secs(3), |s| {
        s.prediction_count() >= want
    })
    .await;
    let logs = p.logs(40);
    assert!(seen.dead.is_empty(), "unexpected dead letters: {:?}\n{logs}", seen.dead.values().next());
    for (id, (r, c)) in &expected {
        let records = seen.predictions.get(id).unwrap_or_else(|| panic!("no prediction for {id}\n{logs}"));
        assert_eq!(records.len(), 1, "{id} has {} predictions", records.len());
        let worst = (records[0].predicted_return - r).abs().max((records[0].confidence - c).abs());
        assert!(worst <= TOLERANCE, "{id} differs from the reference by {worst}");
    }
    let backfilled = seen.predictions.keys().filter(|id| id.starts_with("bf-1:")).count();
    assert_eq!(backfilled, steps, "every step of the backfill answered");
    assert_eq!(seen.prediction_count(), want, "nothing else");

    // Which lane each event travelled in, from the envelopes between the stages.
    let mut lanes: HashMap<String, HashSet<String>> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while lanes.values().map(HashSet::len).sum::<usize>() < 2 * (expected.len() + 1) && Instant::now() < deadline {
        let Some(record) = between.next(Duration::from_millis(200)).await else { continue };
        let record = record.expect("read");
        let (header, _) = sluice_messages::codec::decode(&record.payload).expect("an envelope").into_parts();
        let topic = record.topic.strip_prefix(&format!("{}.", p.prefix)).expect("prefixed").to_string();
        // A backfill's steps travel as one series under the backfill's own id.
        let id = header.event_id.split(':').next().expect("an id").to_string();
        lanes.entry(topic).or_default().insert(id);
    }
    for topic in ["fetched", "inferred"] {
        let live_ids = &lanes[topic];
        let bulk_ids = &lanes[&format!("{topic}.bulk")];
        assert_eq!(live_ids.len(), live.len(), "{topic}: the live events");
        assert!(live_ids.iter().all(|id| id.starts_with("live-")), "{topic}: live only");
        assert_eq!(bulk_ids.len(), marked.len() + twin.len() + 1, "{topic}.bulk: the bulk events and the backfill");
        assert!(bulk_ids.iter().all(|id| !id.starts_with("live-")), "{topic}.bulk: bulk only");
    }
}
