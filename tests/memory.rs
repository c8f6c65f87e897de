//! A stage's memory is bounded in bytes, not in messages: while the fetcher is
//! stalled (its PostgreSQL table locked), 150 requests of 5 MB arrive; its
//! resident memory stays under its start plus the stated bound
//! (docs/operations.md, "Memory"), and once it moves again every one of them
//! is a `request_too_large` dead letter, never parsed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sluice_kafka::KafkaConfig;
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_messages::dead_letter::DeadLetter;
use sluice_postgres::PostgresConfig;
use sluice_testkit::{
    Broker, LOCAL_POSTGRES, StageProcess, heavy_test_lock, peak_rss_bytes, sluice, tail, temp_dir, unique,
    unique_schema, write_config,
};

const BIG: usize = 150;
const BIG_BYTES: usize = 5 << 20;
/// What the defaults let a stage hold beyond its own working memory:
/// runtime.queue_max_bytes (32 MiB) + librdkafka's prefetch (32 MiB, overshot
/// by at most one 16 MiB fetch) + the producer's queue (64 MiB), with room for
/// the allocator. Without the byte bound, the queue alone held 2,048 messages.
const BOUND: u64 = 200 << 20;

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the guard serialises whole tests; nothing else takes it")]
async fn a_stalled_stage_holds_a_bounded_number_of_bytes_whatever_the_message_sizes() {
    let _heavy = heavy_test_lock();
    let broker = Broker::start();
    let dir = temp_dir("memory");
    let prefix = unique("memory");
    let schema = unique_schema("memory");
    let extra = format!(
        "[fetcher]\nsource = \"postgres\"\n\n[postgres]\ndsn = \"{LOCAL_POSTGRES}\"\nschema = \"{schema}\"\nstatement_timeout_ms = 60000\n"
    );
    let config = write_config(&dir, &broker.addr, &prefix, 1, &extra);
    sluice(&config, &["topics", "create"]);
    sluice(&config, &["db", "migrate"]);
    sluice(&config, &["db", "seed", "--symbols", "5", "--days", "40", "--end", "2024-05-31"]);

    let mut fetcher = StageProcess::start(&config, "fetcher", &dir);
    fetcher.wait_for_log("rebalance", 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let start_rss = rss_bytes(fetcher.pid());

    // Stall it: its next history query waits on a lock.
    let pool = PostgresConfig { dsn: LOCAL_POSTGRES.into(), schema: schema.clone(), ..PostgresConfig::default() }
        .pool()
        .expect("pool");
    let mut locker = pool.get().await.expect("client");
    let lock = locker.transaction().await.expect("transaction");
    lock.batch_execute("LOCK TABLE features IN ACCESS EXCLUSIVE MODE").await.expect("lock");

    let kafka = KafkaConfig {
        brokers: broker.addr.clone(),
        producer_properties: BTreeMap::from([("message.max.bytes".to_string(), "8000000".into())]),
        ..KafkaConfig::default()
    };
    let requests = format!("{prefix}.requests");
    let mut publisher = Publisher::new(&kafka, "memory-test").expect("publisher");
    publisher
        .send(&requests, None, br#"{"kind":"stock","event_id":"first","symbol":"S0001","as_of":"2024-05-31"}"#)
        .await
        .expect("send");
    let filler = "x".repeat(BIG_BYTES);
    for i in 0..BIG {
        let json = format!(r#"{{"kind":"query","event_id":"big-{i}","text":"{filler}"}}"#);
        publisher.send(&requests, None, json.as_bytes()).await.expect("send");
        if i % 10 == 9 {
            publisher.settle().await.expect("published");
        }
    }
    publisher.finish().await.expect("published");

    // It reads while it waits on the lock: give it time to take all it may.
    let stalled = Instant::now();
    let mut peak = 0;
    while stalled.elapsed() < Duration::from_secs(15) {
        peak = peak.max(rss_bytes(fetcher.pid()));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fetcher.running(), "the fetcher died\n{}", tail(&fetcher.logs(), 20));
    lock.rollback().await.expect("unlock");
    drop(locker);

    let dead = format!("{prefix}.dead-letters");
    let reader = TopicReader::new(&kafka, &unique("observer"), &[&dead, &format!("{prefix}.fetched")]).expect("reader");
    let (mut letters, mut fetched) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (letters < BIG || fetched < 1) && Instant::now() < deadline {
        peak = peak.max(rss_bytes(fetcher.pid()));
        let Some(record) = reader.next(Duration::from_millis(200)).await else { continue };
        let record = record.expect("read");
        if record.topic == dead {
            let letter: DeadLetter = serde_json::from_slice(&record.payload).expect("a dead letter");
            assert_eq!((letter.reason.as_str(), letter.stage.as_str()), ("request_too_large", "fetcher"));
            assert!(letter.payload_truncated && letter.payload_bytes > BIG_BYTES as u64);
            letters += 1;
        } else {
            fetched += 1;
        }
    }
    let high_water = peak_rss_bytes(fetcher.pid()).max(peak);
    eprintln!(
        "fetcher resident memory: {} MiB at start, {} MiB at most with {BIG} x 5 MiB requests",
        start_rss >> 20,
        high_water >> 20
    );
    assert_eq!((letters, fetched), (BIG, 1), "every request came through\n{}", tail(&fetcher.logs(), 20));
    assert!(
        high_water < start_rss + BOUND,
        "the fetcher grew from {} MiB to {} MiB (bound: start + {} MiB)",
        start_rss >> 20,
        high_water >> 20,
        BOUND >> 20
    );
    drop(fetcher);
    pool.get().await.expect("client").batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.expect("drop");
}
