//! Safe model rollout, with the parts it runs on in production: the rollout
//! and its tally in the machine's Redis (a pipeline name of each test's own),
//! the overrides followed by the real controller, and the stock fixture's
//! versions (deploy/models/export_test_fixtures.py) loaded and run by
//! libtorch. The inferrer stages are driven directly, batch by batch (the
//! broker carries their outputs unchanged; tests/pipeline_e2e.rs shows that).

use std::sync::Arc;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use sluice_control::Settings;
use sluice_control::controller::Controller;
use sluice_control::keys::KeyLayout;
use sluice_control::link::RedisLink;
use sluice_control::rollout::follow::follow;
use sluice_control::rollout::{Gates, Phase, Rollout, RolloutLink, RolloutStore, in_canary};
use sluice_control::store::OverrideStore;
use sluice_core::{Incoming, Output, Stage};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload, StockPrediction, StockWindow};
use sluice_model::ModelConfig;
use sluice_stages::{Inferrer, InferrerStats, QueryInferrer};
use sluice_testkit::{LOCAL_REDIS, model_config, settings, unique};
use sluice_torch::{ModelWorker, TorchLoader};
use tokio_util::sync::CancellationToken;

const MODEL: &str = "stock-lstm";
/// The first value of a window that makes the `poisoned` candidate's call fail.
const SENTINEL: f32 = 12345.0;

/// A version of the stock fixture: 1 serves; same, shifted, poisoned and slow are candidates.
fn variant(version: &str) -> ModelConfig {
    ModelConfig { dir: sluice_testkit::cache_dir().join("models/fixtures/stock-variants"), ..model_config(version) }
}

/// One pipeline's control plane in the machine's Redis.
struct Control {
    overrides: OverrideStore,
    rollouts: RolloutStore,
    shutdown: CancellationToken,
}

impl Control {
    fn new() -> Self {
        let link = Arc::new(RedisLink::new(LOCAL_REDIS).expect("url"));
        let overrides = OverrideStore::Redis { link, keys: KeyLayout::new("sluice-test", &unique("rollout")) };
        let rollouts = RolloutStore::beside(&overrides);
        Self { overrides, rollouts, shutdown: CancellationToken::new() }
    }

    async fn start(&self, candidate: &str, shadow: f64, canary: f64, gates: Gates) -> Rollout {
        let rollout = Rollout::new(MODEL, "1", candidate, shadow, canary, gates, vec![], 0).expect("a valid rollout");
        assert!(self.rollouts.replace(None, &rollout).await.expect("redis"), "started");
        rollout
    }

    async fn phase(&self) -> Phase {
        self.phase_of(MODEL).await
    }

    async fn phase_of(&self, model: &str) -> Phase {
        self.rollouts.get(model).await.expect("redis").expect("a rollout").rollout.phase
    }
}

impl Drop for Control {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// An inferrer replica, as `sluice run inferrer` builds it: its settings
/// from the overrides, its rollout followed in Redis.
struct Replica {
    stage: Inferrer<TorchLoader>,
    stats: Arc<InferrerStats>,
    link: RolloutLink,
}

/// What a model stage of `model` (its versions as `config` gives them)
/// follows: its settings from the overrides, its rollout, and its version 1 loaded.
async fn followed(
    control: &Control,
    model: &str,
    config: fn(&str) -> ModelConfig,
) -> (tokio::sync::watch::Receiver<Settings>, RolloutLink, ModelWorker) {
    let base = Settings { cache_enabled: false, max_batch_size: 32, ..settings() };
    let versions = Arc::new(move |v: &str| config(v).has_version(v));
    let settings = Controller::new(control.overrides.clone(), model, base, versions, Duration::from_millis(200))
        .start(control.shutdown.clone())
        .await;
    let link = follow(control.rollouts.clone(), model, control.shutdown.clone()).await;
    let worker = ModelWorker::start(config("1")).await.expect("version 1 loads");
    (settings, link, worker)
}

async fn replica(control: &Control) -> Replica {
    let (settings, link, worker) = followed(control, MODEL, variant).await;
    let stats = Arc::new(InferrerStats::default());
    let stage = Inferrer::new(TorchLoader, worker, variant("1"), settings, None, "out", stats.clone())
        .expect("inferrer")
        .with_rollout(link.clone(), "shadow");
    Replica { stage, stats, link }
}

/// Batch `n` of 32 windows, over 400 symbols; every 8th batch's first window
/// starts with the sentinel when `poison` is set.
fn batch(n: i64, poison: bool) -> Vec<Incoming> {
    let date = NaiveDate::from_ymd_opt(2024, 5, 31).expect("date");
    (0..32)
        .map(|i| {
            let k = n * 32 + i;
            let mut values: Vec<f32> = (0..3150).map(|j| ((k * 7 + j) as f32 * 0.013).sin()).collect();
            if poison && i == 0 && n % 8 == 0 {
                values[0] = SENTINEL;
            }
            let symbol = format!("S{:04}", (k * 37) % 400);
            let envelope = Envelope {
                event_id: format!("e-{k}"),
                traceparent: None,
                requested_at_ms: 1,
                updated_at_ms: 1,
                attempt: 0,
                deadline_ms: None,
                payload: Payload::Normalized(StockWindow::new(&symbol, date, 30, 105, values)),
            };
            Incoming {
                key: None,
                payload: codec::encode(&envelope),
                topic: "in".into(),
                partition: 0,
                offset: k,
                timestamp_ms: None,
                traceparent: None,
            }
        })
        .collect()
}

/// What one batch gave: (topic, prediction) per send, and the dead letters.
#[derive(Debug, Default)]
struct Served {
    sent: Vec<(String, StockPrediction)>,
    dead: usize,
}

fn decoded(outputs: Vec<Output>, served: &mut Served) {
    for output in outputs {
        match output {
            Output::Send { topic, payload, .. } => match codec::decode(&payload).expect("envelope").payload {
                Payload::Prediction(p) => served.sent.push((topic.to_string(), p)),
                other => panic!("not a prediction: {other:?}"),
            },
            Output::DeadLetter { .. } => served.dead += 1,
        }
    }
}

/// Serves batches round-robin on `replicas` until `done` or 120 s; returns
/// what they gave and the batches served.
async fn serve(
    replicas: &mut [Replica],
    from: i64,
    poison: bool,
    mut done: impl AsyncFnMut() -> bool,
) -> (Served, i64) {
    let mut served = Served::default();
    let started = Instant::now();
    let mut n = from;
    while !done().await {
        assert!(started.elapsed() < Duration::from_secs(120), "no decision within 120 s");
        for r in replicas.iter_mut() {
            decoded(r.stage.process(&batch(n, poison)).await.expect("process"), &mut served);
            n += 1;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    (served, n)
}

/// Every user-facing answer the candidate gave is for a symbol in its canary
/// share; every shadow answer is the candidate's; returns how many each.
fn only_its_share(served: &Served, rollout: &Rollout) -> (usize, usize) {
    let mut canary = 0;
    let mut shadow = 0;
    for (topic, p) in &served.sent {
        if topic == "shadow" {
            assert_eq!(p.model_version, rollout.candidate, "a shadow answer is the candidate's: {p:?}");
            shadow += 1;
        } else if p.model_version == rollout.candidate {
            assert!(in_canary(&rollout.id, p.symbol.as_bytes(), rollout.canary), "outside the canary: {p:?}");
            canary += 1;
        } else {
            assert_eq!(p.model_version, "1", "{p:?}");
        }
    }
    (canary, shadow)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_equal_candidate_is_promoted_once_for_two_replicas_and_a_restarted_one_rejoins() {
    let control = Control::new();
    let mut replicas = vec![replica(&control).await, replica(&control).await];
    let gates = Gates { min_compared: 1500, max_time_ratio: 3.0, ..Gates::default() };
    let rollout = control.start("same", 0.5, 0.1, gates).await;

    // A replica that starts mid-rollout (a restart) joins it on its first read.
    let (mut served, n) = serve(&mut replicas, 0, false, async || {
        control.phase().await != Phase::Running || replicas_compared(&control, &rollout).await >= 300
    })
    .await;
    let late = replica(&control).await;
    assert_eq!(late.link.running().map(|r| r.id.clone()), Some(rollout.id.clone()), "joined at start");
    replicas.push(late);
    let (more, n) = serve(&mut replicas, n, false, async || control.phase().await != Phase::Running).await;
    served.sent.extend(more.sent);

    let phase = control.phase().await;
    assert!(matches!(&phase, Phase::Promoted { figures, .. } if figures.contains("0 errors")), "{phase:?}");
    let taken: u64 = replicas.iter().map(|r| r.link.decisions_taken()).sum();
    assert_eq!(taken, 1, "one decision for all replicas");
    let tally = control.rollouts.tally(MODEL, &rollout.id).await.expect("tally");
    assert!(tally.compared >= 1500 && tally.errors == 0, "{tally:?}");
    // Answered before the promotion (after it, a replica may swap the candidate in at once).
    let Phase::Promoted { at_ms, .. } = phase else { unreachable!() };
    served.sent.retain(|(_, p)| p.inferred_at_ms < at_ms);
    let (canary, shadow) = only_its_share(&served, &rollout);
    eprintln!("promoted: {phase:?}, {canary} canary and {shadow} shadow answers, {tally:?}");
    assert!(canary > 0 && shadow > 0, "the candidate answered its canary ({canary}) and in shadow ({shadow})");
    assert_eq!(served.dead, 0);
    assert!(overridden(&control, "same").await, "the promotion set the model_version override");

    // The promoted candidate is swapped in on every replica, and serves every key.
    let stats: Vec<Arc<InferrerStats>> = replicas.iter().map(|r| r.stats.clone()).collect();
    serve(&mut replicas, n, false, async || stats.iter().all(|s| s.serving_version() == "same")).await;
    let mut last = Served::default();
    for r in &mut replicas {
        decoded(r.stage.process(&batch(n + 10, false)).await.expect("process"), &mut last);
    }
    assert!(last.sent.iter().all(|(t, p)| t == "out" && p.model_version == "same"), "{:?}", last.sent);
}

async fn replicas_compared(control: &Control, rollout: &Rollout) -> u64 {
    control.rollouts.tally(MODEL, &rollout.id).await.map_or(0, |t| t.compared)
}

/// Whether the model's `model_version` override names `version`.
async fn overridden(control: &Control, version: &str) -> bool {
    let raw = control.overrides.read(MODEL).await.expect("overrides");
    raw.model.is_ok_and(|fields| fields.iter().any(|(f, v)| f == b"model_version" && v == version.as_bytes()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_candidate_that_disagrees_fails_or_is_slow_is_rolled_back_having_answered_only_its_canary() {
    let gates = Gates {
        min_compared: 1200,
        max_return_diff_p99: 0.001,
        max_error_rate: 0.001,
        max_time_ratio: 1.6,
        ..Gates::default()
    };
    for (candidate, gate, poison) in [
        ("shifted", "max_return_diff_p99", false),
        ("poisoned", "max_error_rate", true),
        ("slow", "max_time_ratio", false),
    ] {
        let control = Control::new();
        let mut replicas = vec![replica(&control).await];
        let rollout = control.start(candidate, 1.0, 0.2, gates.clone()).await;
        let (served, n) = serve(&mut replicas, 0, poison, async || control.phase().await != Phase::Running).await;
        let phase = control.phase().await;
        assert!(matches!(&phase, Phase::RolledBack { gate: g, .. } if g == gate), "{candidate}: {phase:?}");
        let (canary, shadow) = only_its_share(&served, &rollout);
        eprintln!("{candidate}: {phase:?} after {n} batches, {canary} canary and {shadow} shadow answers");
        if candidate != "poisoned" {
            assert!(canary > 0, "{candidate} answered its canary before the rollback");
        }
        // The serving version answered every sentinel window: nothing is lost to the candidate.
        assert_eq!(served.dead, 0, "{candidate}");

        // Once the replica has read the decision, the candidate answers nothing more.
        let decided = Instant::now();
        while replicas[0].link.running().is_some() {
            assert!(decided.elapsed() < Duration::from_secs(5), "the replica never read the decision");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let mut after = Served::default();
        for k in 0..5 {
            decoded(replicas[0].stage.process(&batch(n + k, poison)).await.expect("process"), &mut after);
        }
        assert!(after.sent.iter().all(|(t, p)| t == "out" && p.model_version == "1"), "{candidate}: {:?}", after.sent);
        assert_eq!(replicas[0].stats.serving_version(), "1");
    }
}

/// The whole pipeline through the tansu broker, its writer saving to
/// PostgreSQL, while a rollout is started with `sluice rollout start`, runs in
/// shadow and canary, and is promoted by its gates: every event has exactly
/// one row at the sink, answered by the serving version or, inside the
/// canary and after the promotion, by the candidate; the candidate's shadow
/// answers are on the shadow topic and in the sink's shadow table only.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn a_rollout_through_the_broker_loses_and_duplicates_nothing_at_the_postgres_sink() {
    use sluice_stages::generate::generate;
    use sluice_testkit::{LOCAL_POSTGRES, Processes, SinkRows, StageProcess, TestPipeline, model_dir, unique_schema};

    let schema = unique_schema("rollout");
    let pipeline = unique("rollout-e2e");
    let extra = format!(
        "[control]\nredis_url = \"{LOCAL_REDIS}\"\nprefix = \"sluice-test\"\npipeline = \"{pipeline}\"\n\n\
         [writer]\nmin_confidence = 0.0\npostgres = true\n\n[postgres]\ndsn = \"{LOCAL_POSTGRES}\"\nschema = \"{schema}\"\n"
    );
    let mut p = TestPipeline::start("rollout-e2e", 2, &extra, Processes::None);
    // The pipeline serves the stock fixture's variants, version 1 first.
    let config = std::fs::read_to_string(&p.config).expect("config");
    let dir = |d: &std::path::Path| format!("dir = \"{}\"", d.display());
    std::fs::write(&p.config, config.replace(&dir(&model_dir()), &dir(&variant("1").dir))).expect("config");
    p.sluice(&["db", "migrate"]);
    let port = sluice_testkit::free_port();
    let listen = format!("127.0.0.1:{port}");
    p.stages = vec![StageProcess::command(&p.config, &["--listen", &listen, "pipeline"], "pipeline", &p.dir)];
    p.stages[0].wait_for_log("kind=\"assign\"", 4, Duration::from_secs(90));

    let started = p.sluice(&[
        "rollout",
        "start",
        "--candidate",
        "same",
        "--shadow",
        "50%",
        "--canary",
        "10%",
        "--min-compared",
        "1000",
        "--max-time-ratio",
        "3",
    ]);
    let rollout: Rollout = serde_json::from_str(&started).expect("the started rollout");
    let events = generate("ro", 6000, 0, 500);
    p.produce("first", events[..3000].iter().map(|e| &e.json));
    let status = || -> serde_json::Value { serde_json::from_str(&p.sluice(&["rollout", "status"])).expect("status") };
    let begun = Instant::now();
    while status()["rollout"]["phase"]["phase"] == "running" {
        assert!(begun.elapsed() < Duration::from_secs(120), "not decided: {}\n{}", status(), p.logs(30));
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let decided = status();
    assert_eq!(decided["rollout"]["phase"]["phase"], "promoted", "{decided}\n{}", p.logs(30));
    assert!(decided["tally"]["compared"].as_u64() >= Some(1000), "{decided}");
    // The process shows the decision in /status, with the figures that made it.
    let status = sluice_testkit::http_get(port, "/status").expect("/status answers").1;
    let status: serde_json::Value = serde_json::from_str(&status).expect("JSON");
    let shown = &status["models"]["stock-lstm"]["rollout"];
    assert_eq!(shown["id"], rollout.id.as_str(), "{status}");
    assert_eq!(shown["phase"]["phase"], "promoted", "{shown}");
    assert!(shown["phase"]["figures"].as_str().is_some_and(|f| f.contains("compared")), "{shown}");
    p.produce("second", events[3000..].iter().map(|e| &e.json));

    let sink = SinkRows::connect(&schema).await;
    let begun = Instant::now();
    while sink.count().await.0 < events.len() && begun.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // anything extra would show now
    assert_eq!(sink.count().await, (events.len(), events.len()), "one row per event\n{}", p.logs(30));
    let by_version = sink
        .client
        .query("SELECT model_version, count(*) FROM stock_predictions GROUP BY 1 ORDER BY 1", &[])
        .await
        .expect("versions");
    let by_version: Vec<(String, i64)> = by_version.iter().map(|r| (r.get(0), r.get(1))).collect();
    eprintln!("rows by version: {by_version:?}");
    assert!(by_version.iter().all(|(v, _)| v == "1" || v == "same"), "{by_version:?}");
    assert_eq!(by_version.len(), 2, "both versions answered: {by_version:?}");
    let late = sink
        .client
        .query_one("SELECT count(*) FROM stock_predictions WHERE model_version = '1' AND event_id >= 'ro-0005000'", &[])
        .await
        .expect("late rows");
    assert_eq!(late.get::<_, i64>(0), 0, "version 1 answered long after the promotion");

    // The candidate's shadow answers went to the shadow topics, as JSON too, not to the users.
    let read_all = async |topic: &str| -> Vec<Vec<u8>> {
        let reader = p.reader(&[topic]);
        let mut records = Vec::new();
        // The first read waits for the reader to join its group.
        while let Some(r) = reader.next(Duration::from_secs(if records.is_empty() { 30 } else { 3 })).await {
            records.push(r.expect("read").payload);
        }
        records
    };
    let mut shadowed = std::collections::HashSet::new();
    for payload in read_all("inferred.shadow").await {
        let envelope = codec::decode(&payload).expect("envelope");
        let Payload::Prediction(answer) = envelope.payload else { panic!("not a prediction") };
        assert_eq!(answer.model_version, "same");
        shadowed.insert(envelope.event_id);
    }
    assert!(!shadowed.is_empty(), "no shadow answers");
    let mut published = std::collections::HashSet::new();
    for payload in read_all("predictions.shadow").await {
        let record: sluice_messages::prediction::PredictionRecord = serde_json::from_slice(&payload).expect("JSON");
        assert_eq!(record.model.version, "same");
        published.insert(record.event_id);
    }
    assert_eq!(published, shadowed, "every shadow answer published as JSON, once each");
    // ... and, the writer saving to PostgreSQL, to the shadow tables: each once.
    let shadow_rows = async || -> (i64, i64, i64) {
        let sql = "SELECT count(*), count(DISTINCT event_id), count(*) FILTER (WHERE model_version <> 'same') \
                   FROM stock_predictions_shadow";
        let row = sink.client.query_one(sql, &[]).await.expect("shadow rows");
        (row.get(0), row.get(1), row.get(2))
    };
    let begun = Instant::now();
    while shadow_rows().await.0 < shadowed.len() as i64 && begun.elapsed() < Duration::from_secs(60) {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let n = shadowed.len() as i64;
    assert_eq!(shadow_rows().await, (n, n, 0), "one shadow row per shadow answer\n{}", p.logs(30));
    eprintln!("{} rows, {n} shadow answers and rows, rollout {}", events.len(), rollout.id);
    p.stages.clear();
    sink.drop_schema().await;
}

/// A version of the query model: 1 serves; relabelled and confused are candidates.
fn query_variant(version: &str) -> ModelConfig {
    ModelConfig {
        dir: sluice_testkit::cache_dir().join("models/fixtures/query-variants"),
        ..sluice_testkit::query_model_config(version)
    }
}

/// The query model's rollouts: a candidate that lists its labels in another
/// order but gives the same answers (compared by label name) is promoted; one
/// that gives other labels is rolled back on label agreement, having answered
/// only the event ids in its canary share.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_candidates_are_judged_by_label_agreement() {
    use sluice_messages::envelope::{QueryIntent, QueryTokens};
    use sluice_model::{ModelMetadata, QueryTokenizer};

    const QUERY: &str = "query-intent";
    let dir = query_variant("1").version_dir("1");
    let metadata = ModelMetadata::load(&dir).expect("metadata");
    let tokenizer = QueryTokenizer::load(&dir, &metadata).expect("tokenizer");
    let events = sluice_stages::generate::generate_queries("rq", 20_000);
    let tokens: Vec<(String, Vec<u8>)> = events
        .iter()
        .map(|e| {
            let sluice_stages::generate::Expected::Intent { text } = &e.expected else { unreachable!() };
            let ids = tokenizer.encode(text).expect("tokens");
            let envelope = Envelope::new(&e.event_id, Payload::Tokens(QueryTokens { text: text.clone(), ids }));
            (e.event_id.clone(), codec::encode(&envelope))
        })
        .collect();

    for (candidate, promoted) in [("relabelled", true), ("confused", false)] {
        let control = Control::new();
        let (settings, link, worker) = followed(&control, QUERY, query_variant).await;
        let stats = Arc::new(InferrerStats::default());
        let mut stage = QueryInferrer::new(TorchLoader, worker, query_variant("1"), settings, None, "out", stats)
            .expect("query inferrer")
            .with_rollout(link.clone(), "shadow");
        let gates = Gates { min_compared: 600, max_time_ratio: 3.0, ..Gates::default() };
        let rollout = Rollout::new(QUERY, "1", candidate, 0.5, 0.2, gates, vec![], 0).expect("valid");
        assert!(control.rollouts.replace(None, &rollout).await.expect("redis"));

        let mut answers: Vec<(String, String, QueryIntent)> = Vec::new();
        let started = Instant::now();
        for (n, chunk) in tokens.chunks(32).enumerate() {
            if link.current().is_some_and(|r| !r.is_running()) {
                break;
            }
            assert!(started.elapsed() < Duration::from_secs(120), "{candidate}: no decision");
            let batch: Vec<Incoming> = chunk
                .iter()
                .enumerate()
                .map(|(i, (_, payload))| Incoming::new("in", 0, (n * 32 + i) as i64, payload.clone()))
                .collect();
            for output in stage.process(&batch).await.expect("process") {
                let Output::Send { topic, payload, .. } = output else { panic!("{candidate}: a dead letter") };
                let envelope = codec::decode(&payload).expect("envelope");
                let Payload::Intent(intent) = envelope.payload else { panic!("not an intent") };
                answers.push((topic.to_string(), envelope.event_id, intent));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let phase = control.phase_of(QUERY).await;
        if promoted {
            assert!(
                matches!(&phase, Phase::Promoted { figures, .. } if figures.contains("labels agreed on 100.0%")),
                "{phase:?}"
            );
        } else {
            assert!(matches!(&phase, Phase::RolledBack { gate, .. } if gate == "min_label_agreement"), "{phase:?}");
        }
        let at_ms = match &phase {
            Phase::Promoted { at_ms, .. } | Phase::RolledBack { at_ms, .. } => *at_ms,
            other => panic!("{other:?}"),
        };
        let mut canary = 0;
        for (topic, event_id, intent) in answers.iter().filter(|(_, _, i)| i.inferred_at_ms < at_ms) {
            if topic == "out" && intent.model_version == candidate {
                assert!(in_canary(&rollout.id, event_id.as_bytes(), 0.2), "{event_id} outside the canary");
                canary += 1;
            }
        }
        assert!(canary > 0, "{candidate} answered its canary");
        // A relabelled candidate's answers carry the same labels as the serving version's.
        let serving: std::collections::HashMap<&str, &str> = answers
            .iter()
            .filter(|(t, _, i)| t == "out" && i.model_version == "1")
            .map(|(_, _, i)| (i.text.as_str(), i.label.as_str()))
            .collect();
        for (_, _, i) in answers.iter().filter(|(t, _, _)| t == "shadow") {
            assert_eq!(serving.get(i.text.as_str()).is_some_and(|l| *l == i.label), promoted, "{candidate}: {i:?}");
        }
        eprintln!("{candidate}: {phase:?}, {canary} canary answers");
    }
}
