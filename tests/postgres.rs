//! The PostgreSQL side against the real server on localhost, each test in a
//! schema of its own: migrations, seeding, and the fetcher's history source,
//! whose windows must equal a hand-written query's and the synthetic source's.

use chrono::NaiveDate;
use sluice_postgres::PostgresConfig;
use sluice_postgres::history::PgHistory;
use sluice_postgres::migrate::migrate;
use sluice_postgres::seed::seed;
use sluice_stages::fetcher::{
    HistorySource, SyntheticConfig, SyntheticHistory, SyntheticSource, WindowRequest, WindowShape,
};
use sluice_testkit::{
    Broker, LOCAL_POSTGRES, StageProcess, free_port, heavy_test_lock, sluice, temp_dir, unique, unique_schema,
    wait_for_http, write_config,
};

const SHAPE: WindowShape = WindowShape { days: 30, features: 105 };

fn date(y: i32, m: u32, d: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(y, m, d).expect("date")
}

/// A migrated schema of its own, dropped at the end.
struct Schema {
    config: PostgresConfig,
    pool: deadpool_postgres::Pool,
}

impl Schema {
    async fn new(name: &str) -> Self {
        let config =
            PostgresConfig { dsn: LOCAL_POSTGRES.into(), schema: unique_schema(name), ..PostgresConfig::default() };
        let pool = config.pool().expect("pool");
        let applied = migrate(&pool, &config.schema).await.expect("migrate");
        assert_eq!(applied, vec!["0001_initial", "0002_packed_features", "0003_shadow"]);
        assert!(migrate(&pool, &config.schema).await.expect("again").is_empty(), "migrations apply once");
        Self { config, pool }
    }

    async fn drop_it(self) {
        let client = self.pool.get().await.expect("client");
        client.batch_execute(&format!("DROP SCHEMA {} CASCADE", self.config.schema)).await.expect("drop schema");
    }
}

#[tokio::test]
async fn fetched_windows_equal_a_hand_written_query_and_the_synthetic_source() {
    let schema = Schema::new("pg_windows").await;
    let end = date(2024, 5, 31);
    let rows = seed(&schema.pool, 5, 60, end, SHAPE.features, SyntheticHistory::Noise).await.expect("seed");
    assert_eq!(rows, 5 * 60);
    // Seeding again replaces rather than duplicates.
    seed(&schema.pool, 5, 60, end, SHAPE.features, SyntheticHistory::Noise).await.expect("seed again");
    let client = schema.pool.get().await.expect("client");
    let count: i64 = client.query_one("SELECT count(*) FROM features", &[]).await.expect("count").get(0);
    assert_eq!(count, 300);

    let requests: Vec<WindowRequest> =
        [("S0000", end), ("S0003", date(2024, 5, 20)), ("S0004", date(2024, 5, 25)), ("S0000", date(2024, 5, 1))]
            .iter()
            .map(|(s, d)| WindowRequest { symbol: (*s).into(), as_of: *d })
            .collect();
    let history = PgHistory::new(schema.pool.clone());
    let fetched = history.fetch(&requests, SHAPE).await.expect("fetch");
    let synthetic = SyntheticSource::new(SyntheticConfig {
        universe: 5,
        history_start: date(2000, 1, 1),
        ..SyntheticConfig::default()
    });
    for (request, window) in requests.iter().zip(fetched) {
        let window = window.expect("enough history");
        let by_hand: Vec<f32> = client
            .query(
                "SELECT sluice_unpack_features(features) FROM features \
                 WHERE symbol = $1 AND trade_date <= $2 ORDER BY trade_date DESC LIMIT 30",
                &[&request.symbol, &request.as_of],
            )
            .await
            .expect("query")
            .iter()
            .rev()
            .flat_map(|row| row.get::<_, Vec<f32>>(0))
            .collect();
        assert_eq!(window, by_hand, "{request:?}");
        assert_eq!(window, synthetic.window(request, SHAPE).expect("synthetic"), "{request:?}");
    }

    // History loaded from SQL with sluice_pack_features has the layout the fetcher reads.
    let day: Vec<f32> = (0..SHAPE.features).map(|f| (f as f32 - 52.0) * 0.37).collect();
    let packed: Vec<u8> =
        client.query_one("SELECT sluice_pack_features($1)", &[&day]).await.expect("pack in SQL").get(0);
    assert_eq!(packed, sluice_postgres::packed::pack(&day));
    drop(client);
    schema.drop_it().await;
}

#[tokio::test]
async fn short_or_missing_history_is_insufficient_history() {
    let schema = Schema::new("pg_short").await;
    seed(&schema.pool, 2, 40, date(2024, 5, 31), SHAPE.features, SyntheticHistory::Noise).await.expect("seed");
    let history = PgHistory::new(schema.pool.clone());
    let requests = vec![
        // 40 trading days up to 2024-05-31 start on 2024-04-08: 9 of them by 2024-04-18.
        WindowRequest { symbol: "S0001".into(), as_of: date(2024, 4, 18) },
        WindowRequest { symbol: "ZZZZ".into(), as_of: date(2024, 5, 31) },
        WindowRequest { symbol: "S0001".into(), as_of: date(2024, 5, 31) },
    ];
    let results = history.fetch(&requests, SHAPE).await.expect("fetch");
    let short = results[0].as_ref().expect_err("short");
    assert_eq!(short.reason(), "insufficient_history");
    assert!(short.to_string().contains("has 9 trading days"), "{short}");
    let missing = results[1].as_ref().expect_err("missing");
    assert_eq!(missing.reason(), "insufficient_history");
    assert!(results[2].is_ok(), "one bad request does not fail the others");
    schema.drop_it().await;
}

/// A backfill's series read from PostgreSQL: each step's window, cut from the
/// series, equals the window fetched alone for its date, also around a day
/// the table has no row for (a holiday), which shifts every window across it.
#[tokio::test]
async fn a_backfill_series_equals_its_windows_fetched_one_by_one_across_a_missing_day() {
    use sluice_core::{Incoming, Output, Stage};
    use sluice_messages::codec;
    use sluice_messages::envelope::Payload;
    use sluice_stages::Fetcher;

    let schema = Schema::new("pg_series").await;
    seed(&schema.pool, 1, 120, date(2024, 6, 28), SHAPE.features, SyntheticHistory::Noise).await.expect("seed");
    let client = schema.pool.get().await.expect("client");
    assert_eq!(client.execute("DELETE FROM features WHERE trade_date = '2024-05-27'", &[]).await.expect("delete"), 1);
    drop(client);
    let history = PgHistory::new(schema.pool.clone());
    let mut fetcher = Fetcher::new(Box::new(history.clone()), SHAPE, "fetched");
    let json =
        r#"{"kind":"stock","event_id":"b-1","symbol":"S0000","from":"2024-04-01","as_of":"2024-06-28","stride":5}"#;
    let outputs = fetcher.process(&[Incoming::new("requests", 0, 0, json.as_bytes().to_vec())]).await.expect("fetched");
    let [Output::Send { payload, .. }] = &outputs[..] else { panic!("one series: {outputs:?}") };
    let Payload::FetchedSeries(series) = codec::decode(payload).expect("envelope").payload else { panic!("a series") };
    assert_eq!(series.steps.len(), 13);
    assert!(series.steps.iter().any(|s| s.as_of == date(2024, 5, 27)), "a step on the missing day");
    for step in &series.steps {
        let request = WindowRequest { symbol: "S0000".into(), as_of: step.as_of };
        let alone = history.fetch(&[request], SHAPE).await.expect("fetch").remove(0).expect("window");
        assert_eq!(series.step_values(step), Some(&alone[..]), "{}", step.event_id);
    }
    schema.drop_it().await;
}

#[tokio::test]
async fn a_missing_table_is_not_retried_but_a_bad_dsn_names_its_key() {
    // A schema without migrations: the statement is refused, which retrying cannot fix.
    let config =
        PostgresConfig { dsn: LOCAL_POSTGRES.into(), schema: unique_schema("pg_empty"), ..PostgresConfig::default() };
    let history = PgHistory::new(config.pool().expect("pool"));
    let failure = history
        .fetch(&[WindowRequest { symbol: "S0001".into(), as_of: date(2024, 5, 31) }], SHAPE)
        .await
        .expect_err("no table");
    assert!(!failure.retryable, "{}", failure.message);

    let bad =
        PostgresConfig { dsn: "host=127.0.0.1 port=notaport password=hunter2".into(), ..PostgresConfig::default() };
    let e = bad.pool().expect_err("bad dsn").to_string();
    assert!(e.contains("postgres.dsn") && !e.contains("hunter2"), "{e}");
    let e = PostgresConfig { schema: "x; DROP TABLE y".into(), ..config }.pool().expect_err("bad schema").to_string();
    assert!(e.contains("postgres.schema"), "{e}");
}

/// The whole pipeline with the fetcher reading PostgreSQL (`sluice db migrate`,
/// `sluice db seed`, `sluice pipeline` on the tansu broker): every event's
/// prediction equals the reference computed from the same history.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn the_pipeline_predicts_from_postgres_history() {
    use std::collections::HashMap;
    use std::time::{Duration, Instant};

    use sluice_messages::prediction::PredictionRecord;
    use sluice_stages::generate::generate;
    use sluice_testkit::{Processes, StageProcess, TestPipeline, reference_predictions};

    let schema = unique_schema("pg_e2e");
    let extra = format!(
        "[fetcher]\nsource = \"postgres\"\nbatch = {{ max_batch_size = 256, max_wait_ms = 5 }}\n\n[writer]\nbatch = {{ max_batch_size = 256, max_wait_ms = 5 }}\nmin_confidence = 0.0\npostgres = true\n\n[postgres]\ndsn = \"{LOCAL_POSTGRES}\"\nschema = \"{schema}\"\n"
    );
    let mut p = TestPipeline::start("pg-e2e", 2, &extra, Processes::None);
    assert!(p.sluice(&["db", "migrate"]).contains("applied 3 migration"));
    // Enough trading days before every generated as_of (March to mid-September 2024).
    assert!(
        p.sluice(&["db", "seed", "--symbols", "50", "--days", "260", "--end", "2024-12-31"])
            .contains("seeded 13000 rows")
    );

    let events = generate("pg", 1000, 0, 50);
    let mut expected = reference_predictions(&events, "1");
    // A backfill: about 60 trading days, every fifth. Each step must equal the
    // single-date event for its day.
    let backfill = r#"{"kind":"stock","event_id":"backfill-1","symbol":"S0007","from":"2024-04-01","as_of":"2024-06-21","stride":5}"#;
    let sluice_messages::events::RequestEvent::Stock(range) =
        sluice_messages::events::RequestEvent::from_json(backfill.as_bytes()).expect("a valid backfill")
    else {
        unreachable!()
    };
    let steps = range.steps();
    assert_eq!(steps.len(), 12, "60 trading days, stride 5: {steps:?}");
    let singles: Vec<sluice_stages::generate::GeneratedEvent> = steps
        .iter()
        .map(|(id, day)| sluice_stages::generate::GeneratedEvent {
            event_id: id.clone(),
            json: Vec::new(),
            expected: sluice_stages::generate::Expected::Prediction { symbol: "S0007".into(), as_of: *day },
        })
        .collect();
    expected.extend(reference_predictions(&singles, "1"));
    let total = events.len() + steps.len();
    p.stages.push(StageProcess::command(&p.config, &["pipeline"], "pipeline", &p.dir));
    let dead = p.topic("dead-letters");
    let reader = p.reader(&["predictions", "dead-letters"]);
    // History starts in January 2024: a week in, the window is short.
    let short = r#"{"kind":"stock","event_id":"short-1","symbol":"S0001","as_of":"2024-01-10"}"#;
    p.produce("events", events.iter().map(|e| e.json.as_slice()).chain([backfill.as_bytes(), short.as_bytes()]));

    let mut seen: HashMap<String, PredictionRecord> = HashMap::new();
    let mut letters = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(180);
    while (seen.len() < total || letters.is_empty()) && Instant::now() < deadline {
        if let Some(r) = reader.next(Duration::from_millis(200)).await {
            let r = r.expect("read");
            if r.topic == dead {
                letters.push(
                    serde_json::from_slice::<sluice_messages::dead_letter::DeadLetter>(&r.payload).expect("letter"),
                );
            } else {
                let record: PredictionRecord = serde_json::from_slice(&r.payload).expect("record");
                seen.insert(record.event_id.clone(), record);
            }
        }
    }
    assert_eq!(letters.len(), 1, "{letters:?}");
    assert_eq!(
        (letters[0].event_id.as_deref(), letters[0].reason.as_str(), letters[0].stage.as_str()),
        (Some("short-1"), "insufficient_history", "fetcher")
    );
    assert_eq!(seen.len(), total, "predictions missing\n{}", p.logs(40));
    for (id, day) in &steps {
        assert_eq!(seen[id].as_of, *day, "a backfill step carries its window's date");
    }
    for (id, record) in &seen {
        let (r, c) = expected[id];
        let close = (record.predicted_return - r).abs() <= 1e-5 && (record.confidence - c).abs() <= 1e-5;
        assert!(close, "{record:?} vs ({r}, {c})");
    }
    p.stages[0].signal("TERM");
    assert!(p.stages[0].wait(Duration::from_secs(30)).is_some_and(|s| s.success()), "pipeline did not drain");
    // The PostgreSQL sink holds exactly what the output topic carried.
    let pool = PostgresConfig { dsn: LOCAL_POSTGRES.into(), schema: schema.clone(), ..PostgresConfig::default() }
        .pool()
        .expect("pool");
    let client = pool.get().await.expect("client");
    let rows = client
        .query("SELECT event_id, predicted_return, confidence, model_version, as_of FROM stock_predictions", &[])
        .await
        .expect("rows");
    assert_eq!(rows.len(), total);
    for row in rows {
        let record = &seen[&row.get::<_, String>(0)];
        assert_eq!((row.get::<_, f32>(1), row.get::<_, f32>(2)), (record.predicted_return, record.confidence));
        let (version, as_of) = (row.get::<_, String>(3), row.get::<_, chrono::NaiveDate>(4));
        assert_eq!((version, as_of), (record.model.version.clone(), record.as_of));
    }
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.expect("drop");
}

#[tokio::test]
async fn a_batch_delivered_twice_leaves_the_same_rows() {
    use std::sync::Arc;

    use sluice_control::Settings;
    use sluice_core::{Incoming, Stage};
    use sluice_messages::codec;
    use sluice_messages::envelope::{Envelope, Payload, StockPrediction};
    use sluice_postgres::sink::PgPredictions;
    use sluice_stages::{Writer, WriterStats};

    let schema = Schema::new("pg_twice").await;
    let settings = Settings { min_confidence: 0.5, ..sluice_testkit::settings() };
    let mut writer =
        Writer::new(tokio::sync::watch::channel(settings).1, None, "out", Arc::new(WriterStats::default()))
            .expect("writer")
            .with_sink(Box::new(PgPredictions::new(schema.pool.clone())));
    let batch: Vec<Incoming> = (0..10)
        .map(|i| {
            let envelope = Envelope {
                event_id: format!("twice-{i}"),
                traceparent: None,
                requested_at_ms: 1,
                updated_at_ms: 1,
                attempt: 0,
                deadline_ms: None,
                payload: Payload::Prediction(StockPrediction {
                    symbol: "S0001".into(),
                    as_of: date(2024, 5, 31),
                    predicted_return: 0.001 * i as f32,
                    confidence: 0.1 * i as f32 + 0.01,
                    model_name: "stock-lstm".into(),
                    model_version: "1".into(),
                    batch_size: 10,
                    cached: false,
                    inferred_at_ms: 2,
                }),
            };
            Incoming::new("t", 0, i, codec::encode(&envelope))
        })
        .collect();
    let client = schema.pool.get().await.expect("client");
    let rows =
        client.prepare("SELECT event_id, confidence FROM stock_predictions ORDER BY event_id").await.expect("prepare");
    let read = || async {
        let found = client.query(&rows, &[]).await.expect("rows");
        found.iter().map(|r| (r.get::<_, String>(0), r.get::<_, f32>(1))).collect::<Vec<_>>()
    };
    writer.process(&batch).await.expect("first delivery");
    let first = read().await;
    // Confidences 0.01 .. 0.91 against min_confidence 0.5: five are saved.
    assert_eq!(first.len(), 5, "{first:?}");
    writer.process(&batch).await.expect("re-delivery");
    writer.process(&batch[3..8]).await.expect("a partial re-delivery");
    assert_eq!(read().await, first, "re-deliveries add or change nothing");
    drop(client);
    schema.drop_it().await;
}

/// Kill the writer (`kill -9`) in the middle of a stream and start it again:
/// the sink ends with exactly one row per valid event.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn killing_the_writer_mid_stream_neither_loses_nor_duplicates_rows() {
    use std::time::{Duration, Instant};

    use sluice_stages::generate::{Expected, generate};
    use sluice_testkit::{Processes, SinkRows, TestPipeline, start_stages};

    let schema = unique_schema("pg_kill");
    // Small writer batches keep the stream going long enough to be cut.
    let extra = format!(
        "[writer]\nbatch = {{ max_batch_size = 4, max_wait_ms = 5 }}\nmin_confidence = 0.0\npostgres = true\n\n[postgres]\ndsn = \"{LOCAL_POSTGRES}\"\nschema = \"{schema}\"\n"
    );
    let mut p = TestPipeline::start("pg-kill", 2, &extra, Processes::None);
    p.sluice(&["db", "migrate"]);
    let events = generate("kill", 3000, 100, 5000);
    let valid = events.iter().filter(|e| matches!(e.expected, Expected::Prediction { .. })).count();
    p.stages = start_stages(&p.config, &p.dir);
    p.produce("events", events.iter().map(|e| &e.json));

    let sink = SinkRows::connect(&schema).await;
    let count = || sink.count();
    let started = Instant::now();
    while count().await.0 < 300 {
        assert!(started.elapsed() < Duration::from_secs(120), "no rows arrived\n{}", p.logs(40));
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    p.stages[3].signal("KILL");
    assert!(p.stages[3].wait(Duration::from_secs(10)).is_some(), "the writer did not die");
    let at_kill = count().await.0;
    assert!(at_kill < valid, "the stream was over before the kill ({at_kill} rows): make it longer");
    p.restart(3);

    let started = Instant::now();
    while count().await.0 < valid && started.elapsed() < Duration::from_secs(180) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // anything extra would show now
    let (rows, distinct) = count().await;
    assert_eq!((rows, distinct), (valid, valid), "rows after the restart ({at_kill} at the kill)\n{}", p.logs(40));
    p.stages.clear();
    sink.drop_schema().await;
}

/// PostgreSQL connections killed (`pg_terminate_backend`) again and again in
/// the middle of a stream, for both the fetcher's reads and the writer's
/// writes: the stages retry with backoff and resume by themselves, and every
/// valid event ends with exactly one row.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn killed_database_connections_are_retried_and_lose_nothing() {
    use std::time::{Duration, Instant};

    use sluice_stages::generate::{Expected, generate};
    use sluice_testkit::{Processes, SinkRows, TestPipeline, start_stages};

    let schema = unique_schema("pg_terminate");
    // The stages' connections carry a name of their own, to be found and killed.
    let app = unique("sluice-pgterm").replace('-', "_");
    let extra = format!(
        "[fetcher]\nsource = \"postgres\"\nbatch = {{ max_batch_size = 16, max_wait_ms = 5 }}\n\n\
         [writer]\nbatch = {{ max_batch_size = 8, max_wait_ms = 5 }}\nmin_confidence = 0.0\npostgres = true\n\n\
         [postgres]\ndsn = \"{LOCAL_POSTGRES} application_name={app}\"\nschema = \"{schema}\"\n"
    );
    let mut p = TestPipeline::start("pg-terminate", 2, &extra, Processes::None);
    p.sluice(&["db", "migrate"]);
    p.sluice(&["db", "seed", "--symbols", "50", "--days", "260", "--end", "2024-12-31"]);
    let events = generate("term", 2000, 0, 50);
    let valid = events.iter().filter(|e| matches!(e.expected, Expected::Prediction { .. })).count();
    p.stages = start_stages(&p.config, &p.dir);
    p.produce("events", events.iter().map(|e| &e.json));

    let sink = SinkRows::connect(&schema).await;
    let count = || sink.count();
    let logs = || p.logs(20);
    let mut killed = 0;
    let started = Instant::now();
    for at in [150, 600, 1200] {
        while count().await.0 < at.min(valid) {
            assert!(started.elapsed() < Duration::from_secs(180), "stuck at {:?}\n{}", count().await, logs());
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let n: i64 = sink
            .client
            .query_one(
                "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = $1",
                &[&app],
            )
            .await
            .expect("terminate")
            .get(0);
        killed += n;
    }
    assert!(killed >= 3, "the stages' connections were found and killed ({killed})");
    while count().await.0 < valid && started.elapsed() < Duration::from_secs(240) {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await; // anything extra would show now
    assert_eq!(count().await, (valid, valid), "rows after {killed} killed connections\n{}", logs());
    // The logs say why the connections ended, not only "db error".
    let all_logs: String = p.stages.iter().map(|s| s.logs()).collect();
    assert!(all_logs.contains("SQLSTATE 57P01"), "no stage logged the termination's SQLSTATE\n{}", logs());
    p.stages.clear();
    sink.drop_schema().await;
}

/// TLS to PostgreSQL: off by default, encrypted (unverified, as libpq's
/// `require`) with `sslmode=require`, and verified against `tls_ca_file`,
/// where a certificate that does not name the host is refused.
#[tokio::test]
async fn tls_is_used_when_asked_and_verified_against_a_ca_file() {
    let ssl_of = |dsn: String, ca: Option<std::path::PathBuf>| async move {
        let config = PostgresConfig { dsn: dsn.into(), tls_ca_file: ca, ..PostgresConfig::default() };
        let pool = config.pool().map_err(|e| e.to_string())?;
        let client = pool.get().await.map_err(|e| format!("{e:?}"))?;
        let row = client
            .query_one("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()", &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok::<bool, String>(row.get(0))
    };
    // The server's own certificate (self-signed here) is the trust anchor.
    let plain = PostgresConfig { dsn: LOCAL_POSTGRES.into(), ..PostgresConfig::default() }.pool().expect("pool");
    let client = plain.get().await.expect("client");
    let on: String = client.query_one("SHOW ssl", &[]).await.expect("show").get(0);
    assert_eq!(on, "on", "this test needs PostgreSQL with TLS on (Debian's default)");
    let cert: String = client.query_one("SHOW ssl_cert_file", &[]).await.expect("show").get(0);

    assert_eq!(ssl_of(LOCAL_POSTGRES.into(), None).await, Ok(false), "no TLS unless asked");
    assert_eq!(ssl_of(format!("{LOCAL_POSTGRES} sslmode=require"), None).await, Ok(true));
    let localhost = LOCAL_POSTGRES.replace("host=127.0.0.1", "host=localhost");
    assert_eq!(ssl_of(localhost, Some(cert.clone().into())).await, Ok(true), "verified against {cert}");
    let wrong_name =
        ssl_of(LOCAL_POSTGRES.into(), Some(cert.into())).await.expect_err("127.0.0.1 is not in the certificate");
    assert!(wrong_name.to_lowercase().contains("certificate"), "{wrong_name}");
    let missing = ssl_of(LOCAL_POSTGRES.into(), Some("/nonexistent/ca.pem".into())).await.expect_err("no such file");
    assert!(missing.contains("postgres.tls_ca_file"), "{missing}");
}

/// `/readyz` of a writer that saves to PostgreSQL: ready once it has joined
/// its group and PostgreSQL answers; not ready, with the reason in the body,
/// while PostgreSQL cannot be reached.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the guard serialises whole tests; nothing else takes it")]
async fn a_writer_is_ready_only_while_postgres_answers() {
    let _heavy = heavy_test_lock();
    let schema = Schema::new("pg_ready").await;
    let broker = Broker::start();
    let dir = temp_dir("pg-ready");
    let prefix = unique("pgready");
    let writer = |dsn: &str| {
        let port = free_port();
        let extra = format!(
            "[writer]\npostgres = true\n\n[postgres]\ndsn = \"{dsn}\"\nschema = \"{}\"\n",
            schema.config.schema
        );
        let config = write_config(&dir, &broker.addr, &prefix, 1, &extra);
        let text = std::fs::read_to_string(&config).expect("config");
        let path = dir.join(format!("writer-{port}.toml"));
        std::fs::write(&path, text.replace("listen = \"127.0.0.1:0\"", &format!("listen = \"127.0.0.1:{port}\"")))
            .expect("config");
        (StageProcess::start(&path, "writer", &dir), port, path)
    };
    let (good, good_port, config) = writer(LOCAL_POSTGRES);
    sluice(&config, &["topics", "create"]);
    let (bad, bad_port, _) = writer("host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=1");

    // Each until its stage has joined the group, whatever PostgreSQL says.
    let joined = |port: u16| {
        let ready = |_: u16, body: &str| {
            serde_json::from_str::<serde_json::Value>(body).is_ok_and(|v| v["stages"]["writer"]["ready"] == true)
        };
        let (code, body) = wait_for_http(port, "/readyz", std::time::Duration::from_secs(60), ready);
        (code, serde_json::from_str::<serde_json::Value>(&body).expect("JSON"))
    };
    let (code, body) = joined(good_port);
    assert_eq!(code, 200, "{body}\n{}", good.logs());
    assert_eq!(body["dependencies"]["postgres"], true, "{body}");
    let (code, body) = joined(bad_port);
    assert_eq!(code, 503, "ready without PostgreSQL: {body}\n{}", bad.logs());
    assert_eq!((&body["ready"], &body["dependencies"]["postgres"]), (&false.into(), &false.into()), "{body}");
}

/// Rows PostgreSQL refuses for good (a text with U+0000, SQLSTATE 22021; a
/// CHECK an operator added, 23514) no longer stop the writer: they are
/// isolated and dead-lettered with the SQLSTATE and the server's message, and
/// the rest of their batch is saved, published and appended to the file once.
#[tokio::test]
async fn rows_postgres_refuses_are_dead_letters_and_the_rest_is_saved_once() {
    use std::sync::Arc;

    use sluice_core::{Incoming, Output, Stage};
    use sluice_messages::codec;
    use sluice_messages::envelope::{Envelope, LabelScore, Payload, QueryIntent, StockPrediction};
    use sluice_postgres::sink::PgPredictions;
    use sluice_stages::Writer;

    let schema = Schema::new("pg_refused").await;
    let client = schema.pool.get().await.expect("client");
    client
        .batch_execute("ALTER TABLE stock_predictions ADD CONSTRAINT no_s0666 CHECK (symbol <> 'S0666')")
        .await
        .expect("constraint");
    let dir = temp_dir("pg-refused");
    let file = dir.join("predictions.jsonl");
    let settings = sluice_testkit::settings();
    let mut writer = Writer::new(tokio::sync::watch::channel(settings).1, Some(&file), "out", Arc::default())
        .expect("writer")
        .with_sink(Box::new(PgPredictions::new(schema.pool.clone())));
    let envelope = |i: usize, payload: Payload| Envelope {
        event_id: format!("refused-{i}"),
        traceparent: None,
        requested_at_ms: 1,
        updated_at_ms: 1,
        attempt: 0,
        deadline_ms: None,
        payload,
    };
    let batch: Vec<Incoming> = (0..12)
        .map(|i| {
            let payload = if i % 2 == 0 {
                Payload::Intent(QueryIntent {
                    // What a fetcher before the fix let through.
                    text: if i == 4 { "what is my balance\u{0}".into() } else { format!("question {i}") },
                    label: "check_balance".into(),
                    confidence: 0.9,
                    top: vec![LabelScore { label: "check_balance".into(), score: 0.9 }],
                    model_name: "query-intent".into(),
                    model_version: "1".into(),
                    batch_size: 6,
                    padded_length: 8,
                    cached: false,
                    inferred_at_ms: 2,
                })
            } else {
                Payload::Prediction(StockPrediction {
                    symbol: if i == 7 { "S0666".into() } else { "S0001".into() },
                    as_of: date(2024, 5, 31),
                    predicted_return: 0.01,
                    confidence: 0.8,
                    model_name: "stock-lstm".into(),
                    model_version: "1".into(),
                    batch_size: 6,
                    cached: false,
                    inferred_at_ms: 2,
                })
            };
            Incoming::new("t", 0, i as i64, codec::encode(&envelope(i, payload)))
        })
        .collect();
    let outputs = writer.process(&batch).await.expect("the batch goes through");
    let mut dead: Vec<(usize, &str, &str)> = outputs
        .iter()
        .filter_map(|o| match o {
            Output::DeadLetter { source, reason, detail, .. } => Some((*source, reason.as_str(), detail.as_str())),
            Output::Send { .. } => None,
        })
        .collect();
    dead.sort();
    assert_eq!(dead.iter().map(|d| (d.0, d.1)).collect::<Vec<_>>(), vec![(4, "sink_refused"), (7, "sink_refused")]);
    assert!(dead[0].2.contains("SQLSTATE 22021") && dead[0].2.contains("0x00"), "{}", dead[0].2);
    assert!(dead[1].2.contains("SQLSTATE 23514") && dead[1].2.contains("no_s0666"), "{}", dead[1].2);
    let sent = outputs.iter().filter(|o| matches!(o, Output::Send { .. })).count();
    assert_eq!(sent, 10);
    let saved: i64 = client
        .query_one("SELECT (SELECT count(*) FROM stock_predictions) + (SELECT count(*) FROM query_intents)", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(saved, 10, "the rest of the batch is saved");
    // A re-delivery (a crash before the commit) adds nothing, and the file got each once.
    writer.process(&batch).await.expect("re-delivery");
    let lines = std::fs::read_to_string(&file).expect("file");
    assert_eq!(lines.lines().count(), 20, "two deliveries, ten lines each");
    drop(client);
    schema.drop_it().await;
}

/// Database failures say what happened: the SQLSTATE and the server's
/// message, or the client's cause, never a bare "db error"; and each is
/// retryable.
#[tokio::test]
async fn database_errors_say_what_happened() {
    use sluice_messages::prediction::{ModelRef, PredictionRecord};
    use sluice_postgres::Retry;
    use sluice_postgres::sink::PgPredictions;

    let schema = Schema::new("pg_errors").await;
    let row = PredictionRecord {
        event_id: "e-1".into(),
        kind: "stock".into(),
        symbol: "S0001".into(),
        as_of: date(2024, 5, 31),
        predicted_return: 0.0,
        confidence: 0.5,
        model: ModelRef { name: "stock-lstm".into(), version: "1".into() },
        batch_size: 1,
        cached: false,
        requested_at_ms: 0,
        inferred_at_ms: 0,
        written_at_ms: 0,
    };
    let insert = |config: PostgresConfig| {
        let row = row.clone();
        async move { PgPredictions::new(config.pool().expect("pool")).insert(&[row], &[]).await.expect_err("refused") }
    };

    // Refused connections.
    let refused = insert(PostgresConfig {
        dsn: "host=127.0.0.1 port=1 user=postgres dbname=test connect_timeout=2".into(),
        ..schema.config.clone()
    })
    .await;
    assert!(refused.to_string().contains("Connection refused"), "{refused}");
    assert_eq!(refused.retry(), Retry::Later);

    // A read-only database (a role whose transactions are read-only).
    let role = schema.config.schema.replace("sluice_", "ro_");
    let admin = schema.pool.get().await.expect("client");
    admin
        .batch_execute(&format!(
            "CREATE ROLE {role} LOGIN; GRANT USAGE ON SCHEMA {s} TO {role}; \
             GRANT ALL ON ALL TABLES IN SCHEMA {s} TO {role}; \
             ALTER ROLE {role} SET default_transaction_read_only = on",
            s = schema.config.schema
        ))
        .await
        .expect("read-only role");
    let read_only = insert(PostgresConfig {
        dsn: format!("host=127.0.0.1 user={role} dbname=test").into(),
        ..schema.config.clone()
    })
    .await;
    assert!(
        read_only.to_string().contains("SQLSTATE 25006") && read_only.to_string().contains("read-only"),
        "{read_only}"
    );
    assert_eq!(read_only.retry(), Retry::Later);

    // A lock held past the statement timeout.
    let mut locker = schema.pool.get().await.expect("client");
    let tx = locker.transaction().await.expect("tx");
    tx.batch_execute("LOCK TABLE stock_predictions IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    let timed_out = insert(PostgresConfig { statement_timeout_ms: 300, ..schema.config.clone() }).await;
    assert!(
        timed_out.to_string().contains("SQLSTATE 57014") && timed_out.to_string().contains("timeout"),
        "{timed_out}"
    );
    assert_eq!(timed_out.retry(), Retry::Later);
    drop(tx);
    drop(locker);

    admin.batch_execute(&format!("DROP OWNED BY {role}; DROP ROLE {role}")).await.expect("drop role");
    drop(admin);
    schema.drop_it().await;
}

/// A stored day of the wrong width names its symbol and date, not the window.
#[tokio::test]
async fn a_history_row_of_the_wrong_width_names_its_symbol_and_date() {
    let schema = Schema::new("pg_short_row").await;
    seed(&schema.pool, 1, 40, date(2024, 5, 31), SHAPE.features, SyntheticHistory::Noise).await.expect("seed");
    let client = schema.pool.get().await.expect("client");
    let short = sluice_postgres::packed::pack(&[0.5; 104]);
    client
        .execute("UPDATE features SET features = $1 WHERE symbol = 'S0000' AND trade_date = '2024-05-28'", &[&short])
        .await
        .expect("a short row");
    let history = PgHistory::new(schema.pool.clone());
    let requests = [WindowRequest { symbol: "S0000".into(), as_of: date(2024, 5, 31) }];
    let results = history.fetch(&requests, SHAPE).await.expect("fetch");
    let e = results[0].as_ref().expect_err("a short row");
    assert_eq!(e.reason(), "invalid_window_shape");
    assert!(
        e.to_string().contains("S0000")
            && e.to_string().contains("2024-05-28")
            && e.to_string().contains("104 features"),
        "{e}"
    );
    drop(client);
    schema.drop_it().await;
}
