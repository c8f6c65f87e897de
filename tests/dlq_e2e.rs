//! `sluice dlq replay` after a fix, through the real broker (tansu): query
//! events dead-lettered by a normalizer that did not tokenize them come back
//! as intents once it does, only the dead letters selected are replayed, and
//! each replayed envelope counts its attempt. Events past their deadline
//! are not computed, and a replay computes them.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_kafka::client::TopicReader;
use sluice_messages::codec;
use sluice_messages::dead_letter::DeadLetter;
use sluice_messages::prediction::{IntentRecord, PredictionRecord};
use sluice_stages::generate::{generate, generate_queries};
use sluice_testkit::{Processes, StageProcess, TestPipeline, free_port, http_get, sluice, write_config};

/// Answers (intents and predictions) by event id, and dead letters.
type Seen = (HashMap<String, String>, Vec<DeadLetter>);

/// How many queries were answered.
fn intents(seen: &Seen) -> usize {
    seen.0.values().filter(|kind| *kind == "query").count()
}

/// Reads until `done` or 120 s: the kind of each answer by event id, and dead letters.
async fn read(reader: &TopicReader, seen: &mut Seen, done: impl Fn(&Seen) -> bool) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while !done(seen) && Instant::now() < deadline {
        let Some(r) = reader.next(Duration::from_millis(200)).await else { continue };
        let r = r.expect("read");
        let value: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
        if value.get("reason").is_some() {
            seen.1.push(serde_json::from_value(value).expect("dead letter"));
        } else if value["kind"] == "query" {
            let q: IntentRecord = serde_json::from_value(value).expect("intent");
            seen.0.insert(q.event_id, "query".into());
        } else {
            let p: PredictionRecord = serde_json::from_value(value).expect("prediction");
            seen.0.insert(p.event_id, "stock".into());
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn replayed_dead_letters_are_processed_again_after_a_fix() {
    let mut p = TestPipeline::start("dlq", 2, "[normalizer]\ntokenize_queries = false\n", Processes::EachStage);
    let broken = p.config.clone();
    let fixed_dir = p.path("fixed");
    std::fs::create_dir_all(&fixed_dir).expect("dir");
    let fixed = write_config(&fixed_dir, &p.broker.addr, &p.prefix, 2, "");
    let reader = p.reader(&["predictions", "dead-letters"]);

    let queries = generate_queries("dlq", 10);
    let stocks = generate("dlq", 20, 0, 5000);
    p.produce("events", queries.iter().chain(&stocks).map(|e| e.json.as_slice()));
    let mut seen = (HashMap::new(), Vec::new());
    read(&reader, &mut seen, |s| s.1.len() >= 10).await;
    assert_eq!(seen.1.len(), 10, "{:?}", seen.1);
    assert!(seen.1.iter().all(|d| d.reason == "unsupported_kind" && d.stage == "normalizer"), "{:?}", seen.1);
    assert_eq!(intents(&seen), 0);

    // A dry run and a selection that matches nothing publish nothing.
    let dry = sluice(&broken, &["dlq", "replay", "--reason", "unsupported_kind", "--dry-run", "--idle-ms", "1500"]);
    let dry: serde_json::Value = serde_json::from_str(&dry).expect("report");
    assert_eq!((dry["matched"].as_u64(), dry["republished"].as_u64()), (Some(10), Some(0)), "{dry}");
    let none = sluice(&broken, &["dlq", "replay", "--reason", "malformed_json", "--idle-ms", "1500"]);
    let none: serde_json::Value = serde_json::from_str(&none).expect("report");
    assert_eq!((none["read"].as_u64(), none["matched"].as_u64()), (Some(10), Some(0)), "{none}");

    // The fix: a normalizer that tokenizes queries. Then replay.
    let normalizer = p.stages.iter().position(|s| s.stage == "normalizer").expect("normalizer");
    p.stages[normalizer].signal("TERM");
    assert!(p.stages[normalizer].wait(Duration::from_secs(30)).is_some_and(|s| s.success()));
    p.stages[normalizer] = StageProcess::start(&fixed, "normalizer", &fixed_dir);
    let replayed = sluice(&fixed, &["dlq", "replay", "--reason", "unsupported_kind", "--idle-ms", "1500"]);
    let replayed: serde_json::Value = serde_json::from_str(&replayed).expect("report");
    assert_eq!(replayed["republished"].as_u64(), Some(10), "{replayed}");
    assert_eq!(replayed["by_topic"][p.topic("fetched")].as_u64(), Some(10), "{replayed}");

    read(&reader, &mut seen, |s| intents(s) >= 10).await;
    assert_eq!(intents(&seen), 10, "every replayed query gets its intent\n{}", p.logs(40));
    for q in &queries {
        assert!(seen.0.contains_key(&q.event_id), "{} missing", q.event_id);
    }
    assert_eq!(seen.1.len(), 10, "no new dead letters: {:?}", &seen.1[10..]);
    // On the fetched topic, each query twice: as the fetcher wrote it
    // (attempt 0) and as the replay republished it (attempt 1).
    let fetched = p.reader(&["fetched"]);
    let mut attempts: HashMap<String, Vec<u32>> = HashMap::new();
    // The first read waits for the group join too.
    let mut wait = Duration::from_secs(15);
    while let Some(r) = fetched.next(wait).await {
        wait = Duration::from_secs(3);
        let envelope = codec::decode(&r.expect("read").payload).expect("an envelope");
        attempts.entry(envelope.event_id).or_default().push(envelope.attempt);
    }
    for q in &queries {
        let mut seen = attempts.get(&q.event_id).cloned().unwrap_or_default();
        seen.sort_unstable();
        assert_eq!(seen, [0, 1], "{}'s envelopes on the fetched topic", q.event_id);
    }
    for stage in &mut p.stages {
        stage.signal("TERM");
        assert!(stage.wait(Duration::from_secs(30)).is_some_and(|s| s.success()), "{} did not drain", stage.stage);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn events_past_their_deadline_are_dead_letters_and_a_replay_computes_them() {
    // Every stock event is older than a millisecond when the inferrer cuts its batch.
    let mut p = TestPipeline::start("deadline", 2, "[inferrer]\nmax_age_ms = 1\n", Processes::None);
    let port = free_port();
    let listen = format!("127.0.0.1:{port}");
    p.stages.push(StageProcess::command(&p.config, &["--listen", &listen, "pipeline"], "pipeline", &p.dir));
    let reader = p.reader(&["predictions", "dead-letters"]);
    let with = |json: &[u8], field: &str, value: i64| {
        let mut event: serde_json::Value = serde_json::from_slice(json).expect("json");
        event[field] = value.into();
        serde_json::to_vec(&event).expect("json")
    };
    let ahead = sluice_messages::now_ms() + 600_000;
    let queries = generate_queries("deadline", 10);
    // Five queries whose own age (1 ms) has passed before the fetcher sees them, five in time.
    let mut events: Vec<Vec<u8>> = queries
        .iter()
        .enumerate()
        .map(|(i, q)| if i < 5 { with(&q.json, "max_age_ms", 1) } else { with(&q.json, "deadline_ms", ahead) })
        .collect();
    let stocks = generate("deadline", 10, 0, 5000);
    events.extend(stocks.iter().map(|e| e.json.clone()));
    p.produce("events", events.iter().map(Vec::as_slice));

    let mut seen = (HashMap::new(), Vec::new());
    read(&reader, &mut seen, |s| s.0.len() >= 5 && s.1.len() >= 15).await;
    let mut dead: Vec<(String, String)> = seen.1.iter().map(|d| (d.stage.clone(), d.reason.clone())).collect();
    dead.sort();
    dead.dedup();
    assert_eq!(
        dead,
        [("fetcher".to_string(), "deadline_exceeded".to_string()), ("inferrer".into(), "deadline_exceeded".into())],
        "{:?}\n{}",
        seen.1,
        p.logs(40)
    );
    assert_eq!(seen.1.len(), 15, "five queries at the fetcher, ten stock events at the inferrer: {:?}", seen.1);
    let answered: Vec<&str> = seen.0.keys().map(String::as_str).collect();
    for (i, q) in queries.iter().enumerate() {
        assert_eq!(seen.0.contains_key(&q.event_id), i >= 5, "{}: {answered:?}", q.event_id);
    }
    let metrics = http_get(port, "/metrics").expect("metrics").1;
    for (stage, kind, count) in [("fetcher", "query", "5"), ("inferrer", "stock", "10")] {
        let counted = metrics.lines().any(|l| {
            l.starts_with("sluice_deadline_exceeded_total{")
                && l.contains(&format!("stage=\"{stage}\""))
                && l.contains(&format!("kind=\"{kind}\""))
                && l.ends_with(&format!(" {count}"))
        });
        assert!(counted, "no {count} {kind} events past their deadline at the {stage} in\n{metrics}");
    }

    // A replay clears the deadlines: every event is answered, no new dead letter.
    let replayed = sluice(&p.config, &["dlq", "replay", "--reason", "deadline_exceeded", "--idle-ms", "1500"]);
    let replayed: serde_json::Value = serde_json::from_str(&replayed).expect("report");
    assert_eq!(replayed["republished"].as_u64(), Some(15), "{replayed}");
    read(&reader, &mut seen, |s| s.0.len() >= 20).await;
    assert_eq!(seen.0.len(), 20, "every replayed event is answered\n{}", p.logs(40));
    assert!(stocks.iter().all(|e| seen.0.get(&e.event_id).is_some_and(|k| k == "stock")));
    assert_eq!(seen.1.len(), 15, "no new dead letters: {:?}", &seen.1[15..]);
    for stage in &mut p.stages {
        stage.signal("TERM");
        assert!(stage.wait(Duration::from_secs(30)).is_some_and(|s| s.success()), "{} did not drain", stage.stage);
    }
}
