//! Live control of a running pipeline (`sluice pipeline` on the tansu broker,
//! Redis from a private `redis-server`): while events flow, an override
//! changes the inferrer's batch size, Redis is killed and restarted, and the
//! model version is switched. No event may be lost, and every prediction must
//! equal the reference computation of the version it names.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_control::keys::KeyLayout;
use sluice_control::link::RedisLink;
use sluice_control::store::{OverrideStore, Scope};
use sluice_kafka::client::Publisher;
use sluice_messages::prediction::PredictionRecord;
use sluice_stages::fetcher::SyntheticConfig;
use sluice_stages::generate::generate;
use sluice_testkit::{
    Processes, RedisServer, StageProcess, TestPipeline, heavy_test_lock, reference_predictions, sluice, tail, temp_dir,
    unique, write_config,
};

fn now_ms() -> i64 {
    sluice_messages::now_ms()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn overrides_a_redis_restart_and_a_model_switch_under_load_lose_nothing() {
    let mut redis = RedisServer::start();
    let pipeline = unique("pipeline");
    let extra =
        format!("[control]\nredis_url = \"{}\"\nprefix = \"sluice-test\"\npipeline = \"{pipeline}\"\n", redis.url());
    let mut p = TestPipeline::start("control-e2e", 2, &extra, Processes::OneProcess);
    let link = std::sync::Arc::new(RedisLink::new(&redis.url()).expect("url"));
    let store = OverrideStore::Redis { link, keys: KeyLayout::new("sluice-test", &pipeline) };

    let events = generate("ctl", 9000, 0, SyntheticConfig::default().universe);
    let expected = [("1", reference_predictions(&events, "1")), ("2", reference_predictions(&events, "2"))];
    // Every stage has joined its group and got partitions: events flow at once.
    p.stages[0].wait_for_log("kind=\"assign\"", 4, Duration::from_secs(60));

    let reader = p.reader(&["predictions"]);
    let mut publisher = Publisher::new(&p.kafka, "control-e2e").expect("publisher");
    let requests = p.topic("requests");

    // Publish 1,000 events a second for 9 s, acting on the pipeline as time passes.
    let mut seen: HashMap<String, Vec<PredictionRecord>> = HashMap::new();
    let mut marks: HashMap<&str, i64> = HashMap::new();
    let started = Instant::now();
    for (n, chunk) in events.chunks(100).enumerate() {
        for e in chunk {
            publisher.send(&requests, Some(e.event_id.as_bytes()), &e.json).await.expect("publish");
        }
        let at = Duration::from_millis(100 * n as u64);
        match n {
            20 => {
                store.set(&Scope::All, "max_batch_size", "4").await.expect("set");
                marks.insert("batch 4", now_ms());
            }
            40 => {
                redis.kill();
                marks.insert("redis killed", now_ms());
            }
            55 => {
                redis.restart();
                marks.insert("redis back", now_ms());
            }
            60 => {
                // The test's own connection notices the restart on its first command.
                let started = Instant::now();
                while let Err(e) = store.set(&Scope::All, "max_batch_size", "2").await {
                    assert!(started.elapsed() < Duration::from_secs(5), "set after the restart: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                marks.insert("batch 2", now_ms());
            }
            85 => {
                store.set(&Scope::All, "model_version", "2").await.expect("set");
                marks.insert("version 2", now_ms());
            }
            _ => {}
        }
        if let Some(wait) = at.checked_sub(started.elapsed()) {
            // Read while we wait, so the observer keeps up.
            let deadline = Instant::now() + wait;
            while let Some(left) = deadline.checked_duration_since(Instant::now()) {
                if let Some(r) = reader.next(left.min(Duration::from_millis(20))).await {
                    let p: PredictionRecord = serde_json::from_slice(&r.expect("read").payload).expect("record");
                    seen.entry(p.event_id.clone()).or_default().push(p);
                }
            }
        }
    }
    publisher.finish().await.expect("all published");
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.len() < events.len() && Instant::now() < deadline {
        if let Some(r) = reader.next(Duration::from_millis(200)).await {
            let p: PredictionRecord = serde_json::from_slice(&r.expect("read").payload).expect("record");
            seen.entry(p.event_id.clone()).or_default().push(p);
        }
    }
    let logs = p.stages[0].logs();
    let tail = tail(&logs, 40);

    // Nothing lost; every answer equals its version's reference.
    let missing = events.iter().filter(|e| !seen.contains_key(&e.event_id)).count();
    assert_eq!(missing, 0, "{missing} events lost\n{tail}");
    let all: Vec<&PredictionRecord> = seen.values().flatten().collect();
    for p in &all {
        let (_, reference) = expected.iter().find(|(v, _)| *v == p.model.version).expect("version 1 or 2");
        let (r, c) = reference[&p.event_id];
        assert!((p.predicted_return - r).abs() <= 1e-5 && (p.confidence - c).abs() <= 1e-5, "{p:?} vs ({r}, {c})");
    }

    // The batch sizes followed the overrides within a second of each change
    // (plus 200 ms for the batch already cut), by the inferrer's own clock;
    // right after a Redis restart, within two (reconnect, resubscribe, re-read).
    let computed = |from: i64, to: i64| -> Vec<u32> {
        all.iter()
            .filter(|p| !p.cached && p.inferred_at_ms > from && p.inferred_at_ms < to)
            .map(|p| p.batch_size)
            .collect()
    };
    let t0 = marks["batch 4"] - 2000;
    let mut timeline: std::collections::BTreeMap<i64, (usize, u32)> = std::collections::BTreeMap::new();
    for p in &all {
        let e = timeline.entry((p.inferred_at_ms - t0) / 500).or_default();
        e.0 += 1;
        e.1 = e.1.max(p.batch_size);
    }
    let marks_rel: Vec<(&str, i64)> = marks.iter().map(|(k, v)| (*k, v - t0)).collect();
    eprintln!("marks {marks_rel:?}\ntimeline (500 ms buckets: writes, largest batch) {timeline:?}");
    let before = computed(0, marks["batch 4"]);
    assert!(before.iter().any(|b| *b > 4), "batches were never above 4 before the override: {before:?}");
    let during = computed(marks["batch 4"] + 1200, marks["redis killed"]);
    assert!(!during.is_empty() && during.iter().all(|b| *b <= 4), "max_batch_size=4 not applied: {during:?}");
    let outage = computed(marks["batch 4"] + 1200, marks["redis back"]);
    assert!(outage.iter().all(|b| *b <= 4), "the last good value must hold while Redis is down: {outage:?}");
    let after = computed(marks["batch 2"] + 2000, marks["version 2"]);
    assert!(
        !after.is_empty() && after.iter().all(|b| *b <= 2),
        "max_batch_size=2 (after the restart) not applied: {after:?}"
    );
    let switched = all.iter().filter(|p| p.model.version == "2").count();
    assert!(switched > 0, "the model version never switched\n{tail}");
    assert!(
        logs.contains("redis is unreachable") && logs.contains("redis is reachable again"),
        "outage not reported\n{tail}"
    );
    assert_eq!(logs.matches("redis is unreachable").count(), 1, "an outage is reported once\n{tail}");
    let duplicates = all.len() - seen.len();
    eprintln!("control e2e: {} predictions, {duplicates} duplicates, {switched} by version 2", all.len());

    p.stages[0].signal("TERM");
    assert!(p.stages[0].wait(Duration::from_secs(30)).is_some_and(|s| s.success()), "pipeline did not drain\n{tail}");
}

/// Garbage in the override hashes, as a careless client could write it into
/// Redis: a value and a field name that are not UTF-8, a megabyte value, and
/// one scope's hash replaced by a string. An inferrer serving both models
/// (two controllers) refuses each bad field alone, logs and counts it once,
/// with the key, cut to a sane length, and every good change still applies;
/// `sluice overrides get` and `set` name the key that is wrong.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the guard serialises whole tests; nothing else takes it")]
async fn garbage_in_the_override_hashes_is_refused_field_by_field_and_reported_once() {
    use sluice_testkit::{LOCAL_REDIS, free_port, http_get};

    let _heavy = heavy_test_lock();
    let dir = temp_dir("override-garbage");
    let pipeline = unique("garbage");
    let port = free_port();
    // No broker: the controllers follow Redis whether or not a broker answers.
    let extra = format!(
        "[control]\nredis_url = \"{LOCAL_REDIS}\"\nprefix = \"sluice-test\"\npipeline = \"{pipeline}\"\nreconcile_ms = 100\n"
    );
    let config = write_config(&dir, "127.0.0.1:1", &unique("garbage"), 1, &extra);
    let listen = format!("127.0.0.1:{port}");
    let inferrer = StageProcess::command(&config, &["--listen", &listen, "run", "inferrer"], "inferrer", &dir);
    let status = || -> Option<serde_json::Value> { serde_json::from_str(&http_get(port, "/status")?.1).ok() };
    let started = Instant::now();
    while status().is_none() {
        assert!(started.elapsed() < Duration::from_secs(60), "no /status\n{}", tail(&inferrer.logs(), 20));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let setting = |model: &str, field: &str| status().map(|s| s["settings"][model][field].clone());
    let until = |what: &str, ok: &dyn Fn() -> bool| {
        let started = Instant::now();
        while !ok() {
            assert!(started.elapsed() < Duration::from_secs(10), "{what}\n{}", tail(&inferrer.logs(), 30));
            std::thread::sleep(Duration::from_millis(100));
        }
    };

    let keys = KeyLayout::new("sluice-test", &pipeline);
    let client = redis::Client::open(LOCAL_REDIS).expect("url");
    let mut conn = client.get_multiplexed_async_connection().await.expect("redis");
    let all = keys.overrides();
    let _: () = redis::pipe()
        .hset(&all, "max_batch_size", &[0xffu8, 0xfe][..])
        .hset(&all, &[0xc3u8, 0x28][..], "1")
        .hset(&all, "min_confidence", "x".repeat(1 << 20))
        .hset(&all, "max_wait_ms", "7")
        .query_async(&mut conn)
        .await
        .expect("garbage");
    until("max_wait_ms = 7 applies beside the garbage", &|| {
        setting("stock-lstm", "max_wait_ms") == Some(7.into())
            && setting("query-intent", "max_wait_ms") == Some(7.into())
    });
    // One scope's hash replaced by a string: that scope keeps its values, the other follows.
    let model_key = keys.model_overrides("stock-lstm");
    let _: () = redis::cmd("SET").arg(&model_key).arg("oops").query_async(&mut conn).await.expect("set a string");
    let _: () = redis::cmd("HSET").arg(&all).arg("max_wait_ms").arg("9").query_async(&mut conn).await.expect("hset");
    until("a later good change applies", &|| {
        setting("stock-lstm", "max_wait_ms") == Some(9.into())
            && setting("query-intent", "max_wait_ms") == Some(9.into())
    });
    std::thread::sleep(Duration::from_millis(500));

    let logs = inferrer.logs();
    let refusals: Vec<&str> = logs.lines().filter(|l| l.contains("override refused")).collect();
    assert_eq!(
        refusals.len(),
        4,
        "each bad field and the bad key once, though two models follow the hash:\n{}",
        refusals.join("\n")
    );
    assert!(
        refusals.iter().all(|l| l.len() < 1000),
        "a refusal line is not cut: {} bytes",
        refusals.iter().map(|l| l.len()).max().unwrap_or(0)
    );
    assert!(refusals.iter().any(|l| l.contains(&model_key) && l.contains("not a hash")), "{refusals:?}");
    assert!(refusals.iter().any(|l| l.contains("(1048576 bytes)")), "{refusals:?}");
    let metrics = http_get(port, "/metrics").expect("metrics").1;
    let refused = sluice_testkit::prometheus::sum(&metrics, "sluice_overrides_refused_total", &[]);
    assert_eq!(refused, 4.0, "{metrics}");

    // The operator's tools name the key.
    let got: serde_json::Value = serde_json::from_str(&sluice(&config, &["overrides", "get"])).expect("json");
    assert!(got[&model_key]["error"].as_str().is_some_and(|e| e.contains("WRONGTYPE")), "{got:#}");
    assert_eq!(got["effective"]["max_wait_ms"], 9);
    assert_eq!(got["effective"]["max_batch_size"], 64, "the device's batch size, not 0: {got:#}");
    let set = std::process::Command::new(sluice_testkit::sluice_bin())
        .arg("--config")
        .arg(&config)
        .args(["overrides", "set", "max_batch_size", "8", "--model", "stock-lstm"])
        .output()
        .expect("run");
    let stderr = String::from_utf8_lossy(&set.stderr);
    assert!(!set.status.success() && stderr.contains(&model_key) && stderr.contains("redis-cli DEL"), "{stderr}");
    let _: () = redis::cmd("DEL").arg(&all).arg(&model_key).query_async(&mut conn).await.expect("clean up");
}
