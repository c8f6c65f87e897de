//! The control plane against real Redis: overrides followed live (pub/sub and
//! reconcile), bad values refused with the last good one kept, the two-tier
//! cache (hit, miss, TTL expiry, invalidation by version, clearing), and a
//! Redis outage and restart. Each test has its own key prefix.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use sluice_control::Settings;
use sluice_control::admin::clear_cache;
use sluice_control::cache::{CacheKey, LruConfig, PredictionCache, Tier};
use sluice_control::controller::Controller;
use sluice_control::keys::KeyLayout;
use sluice_control::link::RedisLink;
use sluice_control::store::{OverrideStore, Scope};
use sluice_testkit::{LOCAL_REDIS, RedisServer, settings, unique};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

const MODEL: &str = "stock-lstm";

/// The configured settings; `max_wait_ms` apart from the override tests' 5.
fn base() -> Settings {
    Settings { max_wait_ms: 20, cache_ttl_s: 3600, ..settings() }
}

fn layout() -> KeyLayout {
    KeyLayout::new("sluice-test", &unique("control"))
}

fn store(url: &str, keys: KeyLayout) -> (OverrideStore, Arc<RedisLink>) {
    let link = Arc::new(RedisLink::new(url).expect("url"));
    (OverrideStore::Redis { link: link.clone(), keys }, link)
}

async fn controller(store: OverrideStore, shutdown: &CancellationToken) -> watch::Receiver<Settings> {
    Controller::new(store, MODEL, base(), Arc::new(|v: &str| v == "1" || v == "2"), Duration::from_millis(200))
        .start(shutdown.clone())
        .await
}

/// Waits until `settings` satisfies `ok`; returns how long that took.
async fn until(settings: &mut watch::Receiver<Settings>, within: Duration, ok: impl Fn(&Settings) -> bool) -> Duration {
    let started = Instant::now();
    while !ok(&settings.borrow_and_update()) {
        let left = within.checked_sub(started.elapsed()).unwrap_or_else(|| {
            panic!("not applied within {within:?}: {:?}", *settings.borrow());
        });
        let _ = tokio::time::timeout(left, settings.changed()).await;
    }
    started.elapsed()
}

#[tokio::test]
async fn overrides_apply_live_and_bad_values_keep_the_last_good_one() {
    let shutdown = CancellationToken::new();
    let (store, _) = store(LOCAL_REDIS, layout());
    let mut settings = controller(store.clone(), &shutdown).await;
    assert_eq!(*settings.borrow(), base());

    store.set(&Scope::All, "max_batch_size", "8").await.expect("set");
    // A notification wakes the controller at once; the reconcile timer (200 ms
    // here, 500 ms by default) is the fallback. Generous bound for a busy machine.
    let took = until(&mut settings, Duration::from_secs(3), |s| s.max_batch_size == 8).await;
    eprintln!("max_batch_size applied after {took:?}");

    // Bad values, one after the other: each refused, 8 kept.
    for bad in ["0", "-1", "lots", "1e9", ""] {
        store.set(&Scope::All, "max_batch_size", bad).await.expect("set");
        tokio::time::sleep(Duration::from_millis(450)).await;
        assert_eq!(settings.borrow().max_batch_size, 8, "{bad:?} must be refused");
    }
    store.set(&Scope::All, "min_confidence", "NaN").await.expect("set");
    store.set(&Scope::All, "model_version", "9").await.expect("set");
    store.set(&Scope::All, "surprise", "1").await.expect("set");
    tokio::time::sleep(Duration::from_millis(450)).await;
    assert_eq!(*settings.borrow(), Settings { max_batch_size: 8, ..base() }, "bad fields change nothing");

    // The per-model scope wins; unsetting falls back to the configuration.
    store.set(&Scope::Model(MODEL.into()), "max_batch_size", "128").await.expect("set");
    store.set(&Scope::All, "max_wait_ms", "5").await.expect("set");
    until(&mut settings, Duration::from_secs(3), |s| s.max_batch_size == 128 && s.max_wait_ms == 5).await;
    store.unset(&Scope::Model(MODEL.into()), "max_batch_size").await.expect("unset");
    store.set(&Scope::All, "max_batch_size", "16").await.expect("set");
    until(&mut settings, Duration::from_secs(3), |s| s.max_batch_size == 16).await;
    store.unset(&Scope::All, "max_batch_size").await.expect("unset");
    until(&mut settings, Duration::from_secs(3), |s| s.max_batch_size == 64).await;
    shutdown.cancel();
}

#[tokio::test]
async fn the_cache_hits_expires_and_is_per_version_in_redis() {
    let keys = layout();
    let (_, link) = store(LOCAL_REDIS, keys.clone());
    let writer = PredictionCache::new(LruConfig::default(), Some((link.clone(), keys.clone())));
    let k = CacheKey::of(MODEL, "1", &[0.25; 3150]);
    let ttl = Duration::from_secs(60);
    assert!(writer.get_many(MODEL, "1", &[k], ttl).await[0].is_none(), "miss");
    writer.put_many(MODEL, "1", vec![(k, vec![0.01, 0.7])], ttl).await;

    // Another replica (an empty LRU) finds it in Redis, then in its own LRU.
    let reader = PredictionCache::new(LruConfig::default(), Some((link.clone(), keys.clone())));
    assert_eq!(reader.get_many(MODEL, "1", &[k], ttl).await[0], Some((vec![0.01, 0.7], Tier::Redis)));
    assert_eq!(reader.get_many(MODEL, "1", &[k], ttl).await[0], Some((vec![0.01, 0.7], Tier::Lru)));

    // Another version is another key: a switch never serves a stale answer.
    let v2 = CacheKey::of(MODEL, "2", &[0.25; 3150]);
    assert_ne!(k, v2);
    assert!(reader.get_many(MODEL, "2", &[v2], ttl).await[0].is_none());

    // Entries expire in Redis too.
    let short = CacheKey::of(MODEL, "1", &[0.5; 3150]);
    writer.put_many(MODEL, "1", vec![(short, vec![0.0, 0.5])], Duration::from_secs(1)).await;
    let fresh = PredictionCache::new(LruConfig::default(), Some((link.clone(), keys.clone())));
    assert!(fresh.get_many(MODEL, "1", &[short], ttl).await[0].is_some());
    tokio::time::sleep(Duration::from_millis(2100)).await;
    // The copy `fresh` took into its LRU lives no longer than the Redis entry did.
    assert!(fresh.get_many(MODEL, "1", &[short], ttl).await[0].is_none(), "expired in both tiers");

    // Clearing deletes the shared entries and tells running processes to empty their LRU.
    let shutdown = CancellationToken::new();
    let cleared = Arc::new(AtomicUsize::new(0));
    let seen = cleared.clone();
    let (store, _) = store(LOCAL_REDIS, keys.clone());
    let _settings = Controller::new(store, MODEL, base(), Arc::new(|_: &str| true), Duration::from_millis(200))
        .on_cache_clear(Arc::new(move || {
            seen.fetch_add(1, Ordering::Relaxed);
        }))
        .start(shutdown.clone())
        .await;
    tokio::time::sleep(Duration::from_millis(500)).await; // subscribed
    assert!(clear_cache(&link, &keys).await.expect("clear") >= 1);
    let empty = PredictionCache::new(LruConfig::default(), Some((link.clone(), keys.clone())));
    assert!(empty.get_many(MODEL, "1", &[k], ttl).await[0].is_none(), "cleared");
    let started = Instant::now();
    while cleared.load(Ordering::Relaxed) == 0 {
        assert!(started.elapsed() < Duration::from_secs(3), "the clear notification never arrived");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    shutdown.cancel();
}

#[tokio::test]
async fn a_redis_outage_keeps_the_last_good_settings_and_the_cache_misses() {
    let mut redis = RedisServer::start();
    let keys = layout();
    let shutdown = CancellationToken::new();
    let (store, link) = store(&redis.url(), keys.clone());
    let mut settings = controller(store.clone(), &shutdown).await;
    let cache =
        PredictionCache::new(LruConfig { max_entries: 1, max_bytes: 1 << 20 }, Some((link.clone(), keys.clone())));
    let ttl = Duration::from_secs(60);
    let (a, b) = (CacheKey::of(MODEL, "1", &[1.0]), CacheKey::of(MODEL, "1", &[2.0]));
    cache.put_many(MODEL, "1", vec![(a, vec![0.1, 0.9])], ttl).await;
    store.set(&Scope::All, "max_batch_size", "8").await.expect("set");
    until(&mut settings, Duration::from_secs(3), |s| s.max_batch_size == 8).await;

    redis.kill();
    tokio::time::sleep(Duration::from_millis(800)).await; // several reconciles fail
    assert_eq!(settings.borrow().max_batch_size, 8, "the last good value stays while Redis is down");
    assert!(!link.is_up());
    // b pushes a out of the one-entry LRU; a's Redis copy is unreachable: a miss, not an error.
    cache.put_many(MODEL, "1", vec![(b, vec![0.2, 0.8])], ttl).await;
    let started = Instant::now();
    let found = cache.get_many(MODEL, "1", &[a, b], ttl).await;
    assert!(found[0].is_none() && found[1].is_some(), "{found:?}");
    assert!(started.elapsed() < Duration::from_secs(2), "a down Redis must not stall look-ups");

    // Back (empty, as nothing is kept on disk): the controller re-syncs, resubscribes, and applies new overrides.
    redis.restart();
    until(&mut settings, Duration::from_secs(10), |s| s.max_batch_size == 64).await;
    store.set(&Scope::All, "max_batch_size", "4").await.expect("set after the restart");
    until(&mut settings, Duration::from_secs(3), |s| s.max_batch_size == 4).await;
    assert!(link.is_up());
    // And the shared cache tier works again.
    cache.put_many(MODEL, "1", vec![(a, vec![0.1, 0.9])], ttl).await;
    let other = PredictionCache::new(LruConfig::default(), Some((link.clone(), keys.clone())));
    assert_eq!(other.get_many(MODEL, "1", &[a], ttl).await[0], Some((vec![0.1, 0.9], Tier::Redis)));
    shutdown.cancel();
}

/// Redis over TLS (`rediss://`): overrides round-trip through a TLS-only
/// `redis-server` (Debian's is built with TLS), and the same port refuses a
/// plain `redis://` connection, so TLS really carried them. `#insecure` skips
/// the certificate check: the server's certificate here is self-signed.
#[tokio::test]
async fn overrides_travel_over_tls_with_rediss_urls() {
    use std::process::{Command, Stdio};

    let port = std::net::TcpListener::bind("127.0.0.1:0").expect("port").local_addr().expect("addr").port();
    let mut server = Command::new("redis-server")
        .args([
            "--port",
            "0",
            "--tls-port",
            &port.to_string(),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ])
        .args(["--tls-cert-file", "/etc/ssl/certs/ssl-cert-snakeoil.pem"])
        .args(["--tls-key-file", "/etc/ssl/private/ssl-cert-snakeoil.key"])
        .args(["--tls-auth-clients", "no"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("redis-server with TLS");
    let started = Instant::now();
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(started.elapsed() < Duration::from_secs(10), "redis-server (TLS) did not start");
        std::thread::sleep(Duration::from_millis(50));
    }
    let keys = KeyLayout::new("sluice", &unique("tls"));
    let over_tls = OverrideStore::Redis {
        link: Arc::new(RedisLink::new(&format!("rediss://localhost:{port}/#insecure")).expect("link")),
        keys: keys.clone(),
    };
    over_tls.set(&Scope::All, "max_batch_size", "12").await.expect("set over TLS");
    let raw = over_tls.read("stock-lstm").await.expect("read over TLS");
    assert_eq!(raw.all, Ok(vec![(b"max_batch_size".to_vec(), b"12".to_vec())]));

    let plain = OverrideStore::Redis {
        link: Arc::new(RedisLink::new(&format!("redis://127.0.0.1:{port}")).expect("link")),
        keys,
    };
    assert!(plain.read("stock-lstm").await.is_err(), "the TLS port must refuse plain connections");
    let _ = server.kill();
    let _ = server.wait();
}

/// A Redis that answers late once (a loaded machine) is not reported down;
/// one that hangs is, after three calls in a row ran out of their budget, and
/// then callers fail fast.
#[tokio::test]
async fn a_slow_answer_is_not_an_outage_but_a_hung_redis_is() {
    let server = RedisServer::start();
    let link = RedisLink::new(&server.url()).expect("url");
    let get = |budget: Duration| {
        link.run_within(budget, |mut conn| async move {
            redis::cmd("GET").arg("k").query_async::<Option<String>>(&mut conn).await
        })
    };
    get(Duration::from_secs(1)).await.expect("connected");
    let admin = redis::Client::open(server.url()).expect("url");
    let mut admin = admin.get_multiplexed_async_connection().await.expect("admin connection");
    let pause = |ms: u64| redis::cmd("CLIENT").arg("PAUSE").arg(ms).arg("ALL").to_owned();

    let _: () = pause(400).query_async(&mut admin).await.expect("pause");
    assert!(get(Duration::from_millis(100)).await.is_err(), "the paused Redis answered within the budget");
    assert!(link.is_up(), "one slow answer is not an outage");
    tokio::time::sleep(Duration::from_millis(500)).await;
    get(Duration::from_secs(1)).await.expect("answers again");

    let _: () = pause(3000).query_async(&mut admin).await.expect("pause");
    for _ in 0..3 {
        assert!(get(Duration::from_millis(100)).await.is_err());
    }
    assert!(!link.is_up(), "three calls in a row without an answer: down");
    let started = std::time::Instant::now();
    assert!(get(Duration::from_secs(1)).await.is_err());
    assert!(started.elapsed() < Duration::from_millis(50), "callers fail fast while it is down");
}
