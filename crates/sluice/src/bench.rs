//! `sluice bench cache`: the per-event cost of a cache hit against a model run,
//! in process (no broker), measured side by side in one run and written to
//! `docs/benchmarks.md`.

use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use sluice_control::Settings;
use sluice_control::cache::{LruConfig, PredictionCache};
use sluice_control::keys::KeyLayout;
use sluice_control::link::RedisLink;
use sluice_kafka::{Incoming, Stage};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload};
use sluice_model::{ModelMetadata, ModelWorker};
use sluice_stages::fetcher::{SyntheticConfig, SyntheticSource, WindowRequest, WindowShape};
use sluice_stages::generate::{Expected, generate};
use sluice_stages::{Inferrer, InferrerStats, Normalizer};
use tokio::sync::watch;

use crate::config::SluiceConfig;

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

/// Normalised inputs for `n` distinct events, encoded as the inferrer reads them.
pub(crate) fn inputs(config: &SluiceConfig, n: usize) -> anyhow::Result<Vec<Incoming>> {
    let model = &config.inferrer.model;
    let metadata = ModelMetadata::load(&model.version_dir(&model.version))?;
    let shape = WindowShape { days: metadata.days(), features: metadata.features() };
    let source = SyntheticSource::new(SyntheticConfig::default());
    let stats = metadata.normalization.as_ref().ok_or_else(|| anyhow::anyhow!("no normalization statistics"))?;
    let normalizer = Normalizer::new(stats, metadata.days(), "bench");
    let mut out = Vec::with_capacity(n);
    for (i, e) in generate("bench", n, 0, 5000).into_iter().enumerate() {
        let Expected::Prediction { symbol, as_of } = e.expected else { continue };
        let values = source.window(&WindowRequest { symbol: symbol.clone(), as_of }, shape)?;
        let window = sluice_messages::envelope::StockWindow { symbol, as_of, rows: 30, cols: 105, values };
        let envelope = Envelope {
            event_id: e.event_id,
            traceparent: None,
            requested_at_ms: 0,
            updated_at_ms: 0,
            attempt: 0,
            payload: Payload::Normalized(normalizer.normalize(&window)?),
        };
        out.push(Incoming {
            key: None,
            payload: codec::encode(&envelope),
            topic: "bench".into(),
            partition: 0,
            offset: i as i64,
            timestamp_ms: None,
            traceparent: None,
        });
    }
    Ok(out)
}

pub(crate) async fn run(inferrer: &mut Inferrer, inputs: &[Incoming], batch: usize) -> anyhow::Result<f64> {
    let started = Instant::now();
    for chunk in inputs.chunks(batch) {
        inferrer.process(chunk).await.map_err(|f| anyhow::anyhow!(f.message))?;
    }
    Ok(started.elapsed().as_secs_f64())
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
            anyhow::Ok(Inferrer::new(worker, model, settings, cache, "bench", Arc::new(InferrerStats::default()))?)
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
        redis = redis_url.as_ref().map_or(String::new(), |u| format!(" --redis-url {}", crate::config::redact_url(u))),
        when = chrono::Utc::now().format("%Y-%m-%d"),
        n = inputs.len(),
    );
    write_section(out, "cache", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}

/// Replaces (or appends) the section between `<!-- bench:NAME -->` markers, so
/// that each benchmark rewrites only its own part of the file.
pub fn write_section(path: &Path, name: &str, section: &str) -> anyhow::Result<()> {
    let (start, end) = (format!("<!-- bench:{name} -->"), format!("<!-- /bench:{name} -->"));
    let text = std::fs::read_to_string(path).unwrap_or_else(|_| {
        "# Benchmarks\n\nFigures written by `sluice bench`; each section says how it was measured.\n".into()
    });
    let block = format!("{start}\n{section}{end}\n");
    let updated = match (text.find(&start), text.find(&end)) {
        (Some(a), Some(b)) if b > a => {
            format!("{}{block}{}", &text[..a], text[b + end.len()..].trim_start_matches('\n'))
        }
        _ => format!("{}\n{block}", text.trim_end()),
    };
    std::fs::write(path, updated)?;
    Ok(())
}
