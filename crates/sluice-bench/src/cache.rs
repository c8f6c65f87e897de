//! `sluice bench cache`: the per-event cost of a cache hit against a model run,
//! in process (no broker), measured side by side in one run and written to
//! `docs/benchmarks.md`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;

use sluice_app::config::SluiceConfig;
use sluice_control::Settings;
use sluice_control::cache::{LruConfig, PredictionCache};
use sluice_control::keys::KeyLayout;
use sluice_control::link::RedisLink;
use sluice_stages::{Inferrer, InferrerStats};
use sluice_torch::{ModelWorker, TorchLoader};
use tokio::sync::watch;

use crate::{inputs, run, write_section};

/// One measured path.
struct Row {
    path: String,
    events: usize,
    seconds: f64,
}

impl Row {
    fn micros_per_event(&self) -> f64 {
        self.seconds * 1e6 / self.events as f64
    }
}

pub async fn cache(
    config: SluiceConfig,
    events: usize,
    batch: usize,
    redis_url: Option<String>,
    out: &Path,
) -> anyhow::Result<()> {
    let inputs = inputs(&config, events)?;
    let base = Settings { max_batch_size: batch, cache_ttl_s: 3600, ..config.base_settings() };
    let model = config.inferrer.model.clone();
    let threads = model.threads();
    let new_inferrer = |settings: Settings, cache: Option<Arc<PredictionCache>>| {
        let model = model.clone();
        async move {
            let worker =
                ModelWorker::start(sluice_model::ModelConfig { warmup_batch_size: batch, ..model.clone() }).await?;
            let settings = watch::channel(settings).1;
            anyhow::Ok(Inferrer::new(
                TorchLoader,
                worker,
                model,
                settings,
                cache,
                "bench",
                Arc::new(InferrerStats::default()),
            )?)
        }
    };
    let mut rows = Vec::new();

    // The model path: the cache off, every event computed, batches of `batch`.
    let mut plain = new_inferrer(Settings { cache_enabled: false, ..base.clone() }, None).await?;
    run(&mut plain, &inputs[..batch.min(inputs.len())], batch).await?; // warm
    rows.push(Row {
        path: format!("model, batches of {batch} (cache off)"),
        events: inputs.len(),
        seconds: run(&mut plain, &inputs, batch).await?,
    });
    let one = inputs.len().min(2000);
    rows.push(Row {
        path: "model, one at a time (cache off)".into(),
        events: one,
        seconds: run(&mut plain, &inputs[..one], 1).await?,
    });

    // The cache-hit path, in-process tier: fill once, then every event is a hit.
    let lru = Arc::new(PredictionCache::new(LruConfig::default(), None));
    let mut cached = new_inferrer(base.clone(), Some(lru)).await?;
    run(&mut cached, &inputs, batch).await?;
    rows.push(Row {
        path: format!("cache hit, in-process LRU, batches of {batch}"),
        events: inputs.len(),
        seconds: run(&mut cached, &inputs, batch).await?,
    });

    // The cache-hit path through Redis: a second inferrer with an empty LRU.
    if let Some(url) = &redis_url {
        let keys = KeyLayout::new("sluice-bench", &format!("cache-{}", std::process::id()));
        let link = Arc::new(RedisLink::new(url)?);
        let fill = Arc::new(PredictionCache::new(LruConfig::default(), Some((link.clone(), keys.clone()))));
        run(&mut new_inferrer(base.clone(), Some(fill)).await?, &inputs, batch).await?;
        let tiny = LruConfig { max_entries: 1, max_bytes: 1 << 20 };
        let remote = Arc::new(PredictionCache::new(tiny, Some((link.clone(), keys.clone()))));
        let mut from_redis = new_inferrer(base.clone(), Some(remote)).await?;
        rows.push(Row {
            path: format!("cache hit, Redis tier (one MGET per batch of {batch})"),
            events: inputs.len(),
            seconds: run(&mut from_redis, &inputs, batch).await?,
        });
        sluice_control::admin::clear_cache(&link, &keys).await?;
    }

    let model_cost = rows[0].micros_per_event();
    let mut table = String::new();
    table.push_str("| path | events | µs per event | events/s | model path ÷ this path |\n|---|---:|---:|---:|---:|\n");
    for r in &rows {
        let us = r.micros_per_event();
        table.push_str(&format!(
            "| {} | {} | {:.1} | {:.0} | {:.1}× |\n",
            r.path,
            r.events,
            us,
            1e6 / us,
            model_cost / us
        ));
    }
    let section = format!(
        "## Prediction cache: hit path against model path (in process)\n\n\
         Command: `cargo run --release --bin sluice -- bench cache --events {events} --batch {batch}{redis}`\n\
         (measured on {when}, this 2-core machine, CPU, libtorch intra-op threads: {threads}).\n\
         Each path runs the inferrer stage's `process` on the same {n} distinct normalised\n\
         windows (30 × 105) from memory, with no broker: decode, cache look-up or model,\n\
         encode. Ratios are within this one run.\n\n{table}",
        redis = redis_url
            .as_ref()
            .map_or(String::new(), |u| format!(" --redis-url {}", sluice_core::Secret::new(u.as_str()).shown())),
        when = chrono::Utc::now().format("%Y-%m-%d"),
        n = inputs.len(),
    );
    write_section(out, "cache", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}
