//! A stage's memory is bounded in bytes, not in messages: while the fetcher is
//! stalled (its PostgreSQL table locked), 150 requests of 5 MB arrive; its
//! resident memory stays under its start plus the stated bound
//! (docs/operations.md, "Memory"), and once it moves again every one of them
//! is a `request_too_large` dead letter, never parsed.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use sluice_kafka::KafkaConfig;
use sluice_kafka::client::Publisher;
use sluice_messages::dead_letter::DeadLetter;
use sluice_postgres::PostgresConfig;
use sluice_testkit::{LOCAL_POSTGRES, Processes, StageProcess, TestPipeline, rss_bytes, tail, unique_schema};

const BIG: usize = 150;
const BIG_BYTES: usize = 5 << 20;
/// What the defaults let a stage hold beyond its own working memory:
/// runtime.queue_max_bytes (32 MiB) + librdkafka's prefetch (32 MiB, overshot
/// by at most one 16 MiB fetch) + the producer's queue (64 MiB), with room for
/// the allocator. Without the byte bound, the queue alone held 2,048 messages.
const BOUND: u64 = 200 << 20;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[allow(clippy::await_holding_lock, reason = "the pipeline holds the heavy-test lock; nothing else takes it")]
async fn a_stalled_stage_holds_a_bounded_number_of_bytes_whatever_the_message_sizes() {
    let schema = unique_schema("memory");
    let extra = format!(
        "[fetcher]\nsource = \"postgres\"\n\n[postgres]\ndsn = \"{LOCAL_POSTGRES}\"\nschema = \"{schema}\"\nstatement_timeout_ms = 60000\n"
    );
    let p = TestPipeline::start("memory", 1, &extra, Processes::None);
    p.sluice(&["db", "migrate"]);
    p.sluice(&["db", "seed", "--symbols", "5", "--days", "40", "--end", "2024-05-31"]);

    let mut fetcher = StageProcess::start(&p.config, "fetcher", &p.dir);
    fetcher.wait_for_log("rebalance", 1, Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(1));
    let start_rss = rss_bytes(fetcher.pid()).0;

    // Stall it: its next history query waits on a lock.
    let pool = PostgresConfig { dsn: LOCAL_POSTGRES.into(), schema: schema.clone(), ..PostgresConfig::default() }
        .pool()
        .expect("pool");
    let mut locker = pool.get().await.expect("client");
    let lock = locker.transaction().await.expect("transaction");
    lock.batch_execute("LOCK TABLE features IN ACCESS EXCLUSIVE MODE").await.expect("lock");

    let kafka = KafkaConfig {
        producer_properties: BTreeMap::from([("message.max.bytes".to_string(), "8000000".into())]),
        ..p.kafka.clone()
    };
    let requests = p.topic("requests");
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
        peak = peak.max(rss_bytes(fetcher.pid()).0);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(fetcher.running(), "the fetcher died\n{}", tail(&fetcher.logs(), 20));
    lock.rollback().await.expect("unlock");
    drop(locker);

    let dead = p.topic("dead-letters");
    let reader = p.reader(&["dead-letters", "fetched"]);
    let (mut letters, mut fetched) = (0, 0);
    let deadline = Instant::now() + Duration::from_secs(120);
    while (letters < BIG || fetched < 1) && Instant::now() < deadline {
        peak = peak.max(rss_bytes(fetcher.pid()).0);
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
    let high_water = rss_bytes(fetcher.pid()).1.max(peak);
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
