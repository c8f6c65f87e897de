//! The prediction cache: a bounded in-process LRU in front of Redis.
//!
//! Keys are the model name, the model version and a 128-bit hash of the
//! normalised input, so a model switch never serves an older version's answer.
//! Both tiers expire entries (`cache_ttl_s`). The LRU is bounded in entries and
//! in bytes and evicts in O(1). Redis is asked once per batch (one pipelined
//! `MGET`) and written once per batch (one pipeline of `SET .. EX`); when Redis
//! is down, its look-ups are misses, never errors.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use lru::LruCache;
use serde::{Deserialize, Serialize};
use xxhash_rust::xxh3::Xxh3;

use crate::keys::KeyLayout;
use crate::link::RedisLink;
use crate::telemetry;

/// Bounds of the in-process tier.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LruConfig {
    pub max_entries: usize,
    pub max_bytes: usize,
}

impl Default for LruConfig {
    fn default() -> Self {
        Self { max_entries: 100_000, max_bytes: 64 * 1024 * 1024 }
    }
}

/// A cache key: model, version and input, hashed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CacheKey(pub u128);

impl CacheKey {
    /// Hashes the model's identity and the exact bytes of the normalised input.
    pub fn of(model: &str, version: &str, input: &[f32]) -> Self {
        Self::of_words(model, version, input.iter().map(|v| v.to_le_bytes()))
    }

    /// The key of a query model's input: its token ids, that is the text as
    /// the tokenizer normalised and truncated it (what the model sees).
    pub fn of_tokens(model: &str, version: &str, ids: &[u32]) -> Self {
        Self::of_words(model, version, ids.iter().map(|v| v.to_le_bytes()))
    }

    fn of_words(model: &str, version: &str, words: impl Iterator<Item = [u8; 4]>) -> Self {
        let mut hasher = Xxh3::new();
        hasher.update(model.as_bytes());
        hasher.update(&[0]);
        hasher.update(version.as_bytes());
        hasher.update(&[0]);
        let mut chunk = [0u8; 4 * 256];
        let mut filled = 0;
        for word in words {
            chunk[filled..filled + 4].copy_from_slice(&word);
            filled += 4;
            if filled == chunk.len() {
                hasher.update(&chunk);
                filled = 0;
            }
        }
        hasher.update(&chunk[..filled]);
        Self(hasher.digest128())
    }
}

/// Which tier answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tier {
    Lru,
    Redis,
}

impl Tier {
    fn label(self) -> &'static str {
        match self {
            Self::Lru => "lru",
            Self::Redis => "redis",
        }
    }
}

/// Counters of one process's cache.
#[derive(Debug, Default)]
pub struct CacheStats {
    pub lru_hits: AtomicU64,
    pub lru_misses: AtomicU64,
    pub redis_hits: AtomicU64,
    pub redis_misses: AtomicU64,
    pub redis_errors: AtomicU64,
    pub evictions: AtomicU64,
    pub expirations: AtomicU64,
}

/// A point-in-time copy of the statistics, for `/status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatsSnapshot {
    pub lru_hits: u64,
    pub lru_misses: u64,
    pub redis_hits: u64,
    pub redis_misses: u64,
    pub redis_errors: u64,
    pub evictions: u64,
    pub expirations: u64,
    pub entries: u64,
    pub bytes: u64,
}

const ENTRY_OVERHEAD: usize = 64;

struct Entry {
    values: Vec<f32>,
    /// When it was stored here: with the TTL in force at look-up time, so that
    /// lowering `cache_ttl_s` also shortens the lives of existing entries.
    stored: Instant,
    /// A cap from Redis's remaining TTL, for entries copied from Redis.
    expires: Instant,
}

/// Budget of one batch's Redis look-up: a slow Redis must not stall batches.
const LOOKUP_BUDGET: Duration = Duration::from_millis(100);
/// Budget of one batch's Redis writes.
const WRITE_BUDGET: Duration = Duration::from_millis(250);

struct Local {
    map: LruCache<CacheKey, Entry>,
    bytes: usize,
    config: LruConfig,
}

impl Local {
    fn cost(values: &[f32]) -> usize {
        ENTRY_OVERHEAD + 16 + values.len() * 4
    }

    fn insert(&mut self, key: CacheKey, values: Vec<f32>, expires: Instant, stats: &CacheStats) {
        let cost = Self::cost(&values);
        if let Some(old) = self.map.put(key, Entry { values, stored: Instant::now(), expires }) {
            self.bytes -= Self::cost(&old.values);
        }
        self.bytes += cost;
        while self.map.len() > self.config.max_entries.max(1) || self.bytes > self.config.max_bytes {
            let Some((_, evicted)) = self.map.pop_lru() else { break };
            self.bytes -= Self::cost(&evicted.values);
            stats.evictions.fetch_add(1, Ordering::Relaxed);
            telemetry::cache_evicted();
        }
    }
}

/// The two-tier cache, shared by the inferrer and the control plane.
pub struct PredictionCache {
    local: Mutex<Local>,
    remote: Option<(Arc<RedisLink>, KeyLayout)>,
    stats: CacheStats,
}

impl std::fmt::Debug for PredictionCache {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PredictionCache").field("redis", &self.remote.is_some()).finish_non_exhaustive()
    }
}

impl PredictionCache {
    /// An LRU tier with `lru` bounds, in front of Redis when `remote` is given.
    pub fn new(lru: LruConfig, remote: Option<(Arc<RedisLink>, KeyLayout)>) -> Self {
        Self {
            local: Mutex::new(Local { map: LruCache::unbounded(), bytes: 0, config: lru }),
            remote,
            stats: CacheStats::default(),
        }
    }

    fn local(&self) -> std::sync::MutexGuard<'_, Local> {
        self.local.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Looks up every key: the LRU first, then Redis for the LRU's misses in one
    /// round trip. Redis answers are kept in the LRU for at most `ttl`.
    pub async fn get_many(
        &self,
        model: &str,
        version: &str,
        keys: &[CacheKey],
        ttl: Duration,
    ) -> Vec<Option<(Vec<f32>, Tier)>> {
        let started = Instant::now();
        let mut found: Vec<Option<(Vec<f32>, Tier)>> = vec![None; keys.len()];
        let mut missing = Vec::new();
        {
            let mut local = self.local();
            for (i, key) in keys.iter().enumerate() {
                match local.map.get(key) {
                    Some(entry) if entry.expires > started && entry.stored + ttl > started => {
                        found[i] = Some((entry.values.clone(), Tier::Lru));
                    }
                    Some(_) => {
                        if let Some(expired) = local.map.pop(key) {
                            local.bytes -= Local::cost(&expired.values);
                        }
                        self.stats.expirations.fetch_add(1, Ordering::Relaxed);
                        missing.push(i);
                    }
                    None => missing.push(i),
                }
            }
        }
        self.count(Tier::Lru, (keys.len() - missing.len()) as u64, missing.len() as u64);
        if let (Some((link, layout)), false) = (&self.remote, missing.is_empty()) {
            let names: Vec<String> = missing.iter().map(|i| layout.cache_entry(model, version, keys[*i].0)).collect();
            // Values and their remaining lives, in one round trip.
            let mut pipe = redis::pipe();
            pipe.cmd("MGET").arg(&names);
            for name in &names {
                pipe.pttl(name);
            }
            // A pipeline answers one value per command: the MGET's list, then each PTTL.
            let answer = link
                .run_within(LOOKUP_BUDGET, |mut conn| async move {
                    let mut replies = pipe.query_async::<Vec<redis::Value>>(&mut conn).await?.into_iter();
                    let values: Vec<Option<Vec<u8>>> =
                        redis::from_redis_value(replies.next().unwrap_or(redis::Value::Nil))?;
                    let lives: Vec<i64> = replies.map(redis::from_redis_value::<i64>).collect::<Result<_, _>>()?;
                    Ok((values, lives))
                })
                .await;
            match answer {
                Ok((values, lives)) => {
                    let mut hits = 0;
                    let now = Instant::now();
                    let mut local = self.local();
                    for ((i, value), life_ms) in missing.iter().zip(values).zip(lives) {
                        if let Some(values) = value.as_deref().and_then(decode) {
                            // Never outlive the Redis copy (-1: no TTL; -2: gone since).
                            let life = u64::try_from(life_ms).map_or(ttl, Duration::from_millis).min(ttl);
                            local.insert(keys[*i], values.clone(), now + life, &self.stats);
                            found[*i] = Some((values, Tier::Redis));
                            hits += 1;
                        }
                    }
                    drop(local);
                    self.count(Tier::Redis, hits, missing.len() as u64 - hits);
                }
                Err(_) => {
                    // The link reports the outage; a look-up that failed is a miss.
                    self.stats.redis_errors.fetch_add(missing.len() as u64, Ordering::Relaxed);
                    self.count(Tier::Redis, 0, missing.len() as u64);
                }
            }
        }
        telemetry::cache_lookup(started.elapsed());
        self.publish_size();
        found
    }

    /// Stores computed answers in both tiers (Redis: one pipeline, `SET .. EX`),
    /// and adds this batch's counts to the pipeline-wide statistics in Redis.
    pub async fn put_many(&self, model: &str, version: &str, entries: Vec<(CacheKey, Vec<f32>)>, ttl: Duration) {
        let expires = Instant::now() + ttl;
        let ttl_s = ttl.as_secs().max(1);
        let mut pipe = redis::pipe();
        if let Some((_, layout)) = &self.remote {
            for (key, values) in &entries {
                pipe.set_ex(layout.cache_entry(model, version, key.0), encode(values), ttl_s).ignore();
            }
        }
        {
            let mut local = self.local();
            for (key, values) in entries {
                local.insert(key, values, expires, &self.stats);
            }
        }
        self.publish_size();
        if let Some((link, _)) = &self.remote
            && pipe.cmd_iter().next().is_some()
        {
            let _ =
                link.run_within(WRITE_BUDGET, |mut conn| async move { pipe.query_async::<()>(&mut conn).await }).await;
        }
    }

    /// Adds counts to the pipeline-wide statistics in Redis (best effort).
    pub async fn record_shared_stats(&self, counts: &[(&'static str, u64)]) {
        let Some((link, layout)) = &self.remote else { return };
        let mut pipe = redis::pipe();
        for (field, n) in counts.iter().filter(|(_, n)| *n > 0) {
            pipe.hincr(layout.cache_stats(), *field, *n).ignore();
        }
        if pipe.cmd_iter().next().is_some() {
            let _ =
                link.run_within(WRITE_BUDGET, |mut conn| async move { pipe.query_async::<()>(&mut conn).await }).await;
        }
    }

    /// Whether Redis answers (`None`: no Redis tier).
    pub fn redis_up(&self) -> Option<bool> {
        self.remote.as_ref().map(|(link, _)| link.is_up())
    }

    /// Empties the in-process tier (on `sluice cache clear`).
    pub fn clear_local(&self) {
        let mut local = self.local();
        local.map.clear();
        local.bytes = 0;
        drop(local);
        self.publish_size();
    }

    pub fn stats(&self) -> StatsSnapshot {
        let local = self.local();
        let s = &self.stats;
        StatsSnapshot {
            lru_hits: s.lru_hits.load(Ordering::Relaxed),
            lru_misses: s.lru_misses.load(Ordering::Relaxed),
            redis_hits: s.redis_hits.load(Ordering::Relaxed),
            redis_misses: s.redis_misses.load(Ordering::Relaxed),
            redis_errors: s.redis_errors.load(Ordering::Relaxed),
            evictions: s.evictions.load(Ordering::Relaxed),
            expirations: s.expirations.load(Ordering::Relaxed),
            entries: local.map.len() as u64,
            bytes: local.bytes as u64,
        }
    }

    fn count(&self, tier: Tier, hits: u64, misses: u64) {
        let (h, m) = match tier {
            Tier::Lru => (&self.stats.lru_hits, &self.stats.lru_misses),
            Tier::Redis => (&self.stats.redis_hits, &self.stats.redis_misses),
        };
        h.fetch_add(hits, Ordering::Relaxed);
        m.fetch_add(misses, Ordering::Relaxed);
        telemetry::cache_counted(tier.label(), hits, misses);
    }

    fn publish_size(&self) {
        let local = self.local();
        telemetry::cache_size(local.map.len(), local.bytes);
    }
}

fn encode(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

fn decode(bytes: &[u8]) -> Option<Vec<f32>> {
    (bytes.len().is_multiple_of(4) && !bytes.is_empty())
        .then(|| bytes.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    const MODEL: &str = "m";

    fn key(n: u8) -> CacheKey {
        CacheKey::of(MODEL, "1", &[f32::from(n)])
    }

    #[test]
    fn keys_depend_on_model_version_and_input() {
        let input = [0.5f32; 600];
        assert_eq!(CacheKey::of("m", "1", &input), CacheKey::of("m", "1", &input));
        assert_ne!(CacheKey::of("m", "1", &input), CacheKey::of("m", "2", &input));
        assert_ne!(CacheKey::of("m", "1", &input), CacheKey::of("n", "1", &input));
        let mut other = input;
        other[599] = 0.25;
        assert_ne!(CacheKey::of("m", "1", &input), CacheKey::of("m", "1", &other));
    }

    #[tokio::test]
    async fn hit_miss_and_expiry_in_process() {
        let cache = PredictionCache::new(LruConfig::default(), None);
        let ttl = Duration::from_millis(50);
        assert!(cache.get_many(MODEL, "1", &[key(1)], ttl).await[0].is_none());
        cache.put_many(MODEL, "1", vec![(key(1), vec![0.1, 0.9])], ttl).await;
        let hit = cache.get_many(MODEL, "1", &[key(1), key(2)], ttl).await;
        assert_eq!(hit[0], Some((vec![0.1, 0.9], Tier::Lru)));
        assert!(hit[1].is_none());
        tokio::time::sleep(Duration::from_millis(80)).await;
        assert!(cache.get_many(MODEL, "1", &[key(1)], ttl).await[0].is_none(), "expired");
        let stats = cache.stats();
        assert_eq!((stats.lru_hits, stats.lru_misses, stats.expirations, stats.entries), (1, 3, 1, 0));
    }

    #[tokio::test]
    async fn the_lru_is_bounded_in_entries_and_bytes() {
        let ttl = Duration::from_secs(60);
        let cache = PredictionCache::new(LruConfig { max_entries: 3, max_bytes: 1 << 20 }, None);
        for n in 0..5 {
            cache.put_many(MODEL, "1", vec![(key(n), vec![0.0; 2])], ttl).await;
        }
        let found = cache.get_many(MODEL, "1", &[key(0), key(1), key(2), key(3), key(4)], ttl).await;
        assert_eq!(found.iter().map(Option::is_some).collect::<Vec<_>>(), vec![false, false, true, true, true]);
        assert_eq!(cache.stats().evictions, 2);

        let per_entry = Local::cost(&[0.0; 2]);
        let cache = PredictionCache::new(LruConfig { max_entries: 1000, max_bytes: 2 * per_entry }, None);
        for n in 0..4 {
            cache.put_many(MODEL, "1", vec![(key(n), vec![0.0; 2])], ttl).await;
        }
        let stats = cache.stats();
        assert_eq!((stats.entries, stats.bytes), (2, 2 * per_entry as u64));
        // The least recently used goes first: touch 2, insert 4, and 3 is evicted.
        cache.get_many(MODEL, "1", &[key(2)], ttl).await;
        cache.put_many(MODEL, "1", vec![(key(4), vec![0.0; 2])], ttl).await;
        let found = cache.get_many(MODEL, "1", &[key(2), key(3), key(4)], ttl).await;
        assert_eq!(found.iter().map(Option::is_some).collect::<Vec<_>>(), vec![true, false, true]);
    }
}
