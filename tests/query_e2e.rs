//! Stock and query events on one `requests` topic, through the real broker
//! (tansu) and the four stages as separate processes, with the writer saving
//! to PostgreSQL: every query gets one intent (on the output topic and in
//! `query_intents`), every stock event one prediction, every invalid event one
//! dead letter with its reason, and repeated queries come from the cache.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use sluice_messages::dead_letter::DeadLetter;
use sluice_messages::prediction::{IntentRecord, PredictionRecord};
use sluice_postgres::PostgresConfig;
use sluice_stages::generate::{Expected, generate, generate_queries};
use sluice_testkit::{LOCAL_POSTGRES, Processes, TestPipeline, start_stages, unique_schema};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline's guard serialises whole tests; nothing else takes it")]
async fn a_mixed_stream_of_stock_and_query_events_end_to_end() {
    let schema = unique_schema("query_e2e");
    let extra = format!(
        "[writer]\nbatch = {{ max_batch_size = 256, max_wait_ms = 5 }}\nmin_confidence = 0.0\npostgres = true\n\n\
         [postgres]\ndsn = \"{LOCAL_POSTGRES}\"\nschema = \"{schema}\"\n"
    );
    let mut pipeline = TestPipeline::start("query-e2e", 2, &extra, Processes::None);
    pipeline.sluice(&["db", "migrate"]);

    // 300 stock events (every 10th invalid, of every kind, an oversized query
    // among them) with the first 12 queries (one per text) among them, and two
    // bad queries the fetcher sees: bytes that are not UTF-8, and an empty
    // text. The other 108 queries repeat those texts; they are sent once the
    // first twelve are answered, so every one of them must be a cache hit.
    let stocks = generate("mix", 300, 10, 5000);
    let queries = generate_queries("mix", 120);
    let (first, repeats) = queries.split_at(12);
    let mut lines: Vec<Vec<u8>> = Vec::new();
    for (i, s) in stocks.iter().enumerate() {
        lines.push(s.json.clone());
        if i % 25 == 24 {
            lines.push(first[i / 25].json.clone());
        }
    }
    let latin1: &[u8] = b"{\"kind\":\"query\",\"event_id\":\"latin1\",\"text\":\"caf\xe9\"}";
    lines.push(latin1.to_vec());
    lines.push(br#"{"kind":"query","event_id":"blank","text":"   "}"#.to_vec());
    assert_eq!(lines.len(), stocks.len() + first.len() + 2);
    let repeat_lines: Vec<Vec<u8>> = repeats.iter().map(|q| q.json.clone()).collect();

    let dead = pipeline.topic("dead-letters");
    let reader = pipeline.reader(&["predictions", "dead-letters"]);
    pipeline.stages = start_stages(&pipeline.config, &pipeline.dir);
    pipeline.produce("events", &lines);

    let expected_dead: Vec<&str> = stocks
        .iter()
        .filter_map(|e| match e.expected {
            Expected::DeadLetter { reason } => Some(reason),
            _ => None,
        })
        .chain(["invalid_utf8", "invalid_field"])
        .collect();
    let valid_stocks = stocks.iter().filter(|e| matches!(e.expected, Expected::Prediction { .. })).count();
    let mut stock_seen: HashMap<String, PredictionRecord> = HashMap::new();
    let mut intents: HashMap<String, Vec<IntentRecord>> = HashMap::new();
    let mut letters: Vec<DeadLetter> = Vec::new();
    let mut repeats_sent = false;
    let deadline = Instant::now() + Duration::from_secs(180);
    while (stock_seen.len() < valid_stocks || intents.len() < queries.len() || letters.len() < expected_dead.len())
        && Instant::now() < deadline
    {
        if !repeats_sent && first.iter().all(|q| intents.contains_key(&q.event_id)) {
            pipeline.produce("events", &repeat_lines);
            repeats_sent = true;
        }
        let Some(r) = reader.next(Duration::from_millis(200)).await else { continue };
        let r = r.expect("read");
        if r.topic == dead {
            letters.push(serde_json::from_slice(&r.payload).expect("dead letter"));
            continue;
        }
        let value: serde_json::Value = serde_json::from_slice(&r.payload).expect("json");
        if value["kind"] == "query" {
            let q: IntentRecord = serde_json::from_value(value).expect("intent record");
            intents.entry(q.event_id.clone()).or_default().push(q);
        } else {
            let p: PredictionRecord = serde_json::from_value(value).expect("prediction record");
            stock_seen.insert(p.event_id.clone(), p);
        }
    }
    let logs = || pipeline.logs(15);
    assert_eq!(stock_seen.len(), valid_stocks, "stock predictions\n{}", logs());
    assert_eq!(intents.len(), queries.len(), "one intent per query\n{}", logs());

    // Every query: one intent, for its own text, with a label from the model's
    // list, its top 3, and the right label for these plain phrasings.
    let right = |text: &str| match text {
        t if t.contains("balance") => "check_balance",
        t if t.contains("lost my") => "report_lost_card",
        t if t.contains("mortgage") => "mortgage_rates",
        t if t.contains("exchange rate") => "exchange_rates",
        _ => "",
    };
    for q in &queries {
        let got = &intents[&q.event_id];
        assert_eq!(got.len(), 1, "duplicates for {}: {got:?}", q.event_id);
        let Expected::Intent { text } = &q.expected else { unreachable!() };
        let intent = &got[0];
        assert_eq!(&intent.text, text);
        assert_eq!(intent.top.len(), 3);
        assert_eq!(intent.top[0].label, intent.label);
        if !right(text).is_empty() {
            assert_eq!(intent.label, right(text), "{text:?}: {intent:?}");
        }
    }
    // The first query of each text was computed; every repeat, sent after
    // those answers, came from the cache, with the same answer.
    for q in first {
        assert!(!intents[&q.event_id][0].cached, "the first {:?} cannot be a cache hit", q.event_id);
    }
    let missed: Vec<&str> =
        repeats.iter().filter(|q| !intents[&q.event_id][0].cached).map(|q| q.event_id.as_str()).collect();
    assert!(missed.is_empty(), "repeats not answered from the cache: {missed:?}\n{}", logs());
    let mut by_text: HashMap<&str, f32> = HashMap::new();
    for q in intents.values().flatten() {
        let first = *by_text.entry(q.text.as_str()).or_insert(q.confidence);
        assert!((first - q.confidence).abs() < 1e-5, "the same text got different answers: {q:?}");
    }

    // Dead letters: the reasons expected, each once, and from the right stage.
    let mut reasons: Vec<&str> = letters.iter().map(|d| d.reason.as_str()).collect();
    let mut want = expected_dead.clone();
    reasons.sort_unstable();
    want.sort_unstable();
    assert_eq!(reasons, want, "{letters:#?}");
    let too_long = letters.iter().find(|d| d.reason == "text_too_long").expect("an oversized query");
    assert_eq!(too_long.stage, "normalizer");
    let letter = letters.iter().find(|d| d.reason == "invalid_utf8").expect("the latin-1 query");
    assert_eq!(letter.stage, "fetcher");
    assert_eq!(letter.payload().expect("base64"), latin1, "the original bytes, as sent");

    for stage in &mut pipeline.stages {
        stage.signal("TERM");
    }
    for stage in &mut pipeline.stages {
        assert!(stage.wait(Duration::from_secs(30)).is_some_and(|s| s.success()), "{} did not drain", stage.stage);
    }

    // The sink: one row per query, equal to what the topic carried.
    let pool = PostgresConfig { dsn: LOCAL_POSTGRES.into(), schema: schema.clone(), ..PostgresConfig::default() }
        .pool()
        .expect("pool");
    let client = pool.get().await.expect("client");
    let rows = client
        .query(
            "SELECT event_id, query_text, label, confidence, top_labels::text, model_name, cached FROM query_intents",
            &[],
        )
        .await
        .expect("rows");
    assert_eq!(rows.len(), queries.len());
    for row in rows {
        let q = &intents[&row.get::<_, String>(0)][0];
        assert_eq!((row.get::<_, String>(1), row.get::<_, String>(2)), (q.text.clone(), q.label.clone()));
        assert_eq!((row.get::<_, f32>(3), row.get::<_, bool>(6)), (q.confidence, q.cached));
        assert_eq!(row.get::<_, String>(5), "query-intent");
        let top: serde_json::Value = serde_json::from_str(&row.get::<_, String>(4)).expect("jsonb");
        assert_eq!(top[0]["label"], q.label.as_str());
    }
    let stock_rows: i64 = client.query_one("SELECT count(*) FROM stock_predictions", &[]).await.expect("count").get(0);
    assert_eq!(stock_rows as usize, valid_stocks);
    client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.expect("drop");
}
