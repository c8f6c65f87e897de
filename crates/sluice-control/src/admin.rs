//! Operator actions on the shared cache tier (`sluice cache stats|clear`).

use std::collections::HashMap;
use std::time::Duration;

use redis::aio::ConnectionManager;

use crate::ControlError;
use crate::keys::{KeyLayout, NOTIFY_CACHE_CLEAR};
use crate::link::RedisLink;

/// The pipeline-wide cache counters and the number of entries in Redis.
pub async fn cache_stats(link: &RedisLink, keys: &KeyLayout) -> Result<(HashMap<String, u64>, u64), ControlError> {
    let mut conn = link.conn().await?;
    let counters: HashMap<String, u64> = redis::cmd("HGETALL").arg(keys.cache_stats()).query_async(&mut conn).await?;
    let entries = scan(&mut conn, &keys.cache_pattern()).await?.len() as u64;
    Ok((counters, entries))
}

/// Deletes every cache entry and the counters, and tells running inferrers
/// to empty their in-process tier. Returns the number of entries deleted.
pub async fn clear_cache(link: &RedisLink, keys: &KeyLayout) -> Result<u64, ControlError> {
    let mut conn = link.conn().await?;
    let names = scan(&mut conn, &keys.cache_pattern()).await?;
    let mut deleted = 0;
    for chunk in names.chunks(500) {
        deleted += redis::cmd("UNLINK").arg(chunk).query_async::<u64>(&mut conn).await?;
    }
    redis::pipe()
        .del(keys.cache_stats())
        .incr(keys.cache_epoch(), 1)
        .publish(keys.channel(), NOTIFY_CACHE_CLEAR)
        .query_async::<()>(&mut conn)
        .await?;
    Ok(deleted)
}

/// Every key matching `pattern`, with SCAN (never KEYS, which blocks Redis).
async fn scan(conn: &mut ConnectionManager, pattern: &str) -> Result<Vec<String>, ControlError> {
    let mut cursor = 0u64;
    let mut all = Vec::new();
    loop {
        let mut cmd = redis::cmd("SCAN");
        cmd.arg(cursor).arg("MATCH").arg(pattern).arg("COUNT").arg(1000);
        let (next, keys): (u64, Vec<String>) = tokio::time::timeout(Duration::from_secs(10), cmd.query_async(conn))
            .await
            .map_err(|_| ControlError::Redis("SCAN timed out".into()))??;
        all.extend(keys);
        if next == 0 {
            return Ok(all);
        }
        cursor = next;
    }
}
