//! Sluice's benchmarks (`sluice bench ...`), apart from the binary that
//! dispatches to them and from the tests: each measures within one run,
//! repeats where it says so, and writes its section of `docs/benchmarks.md`
//! (or its own files under `docs/benchmarks/`).
//!
//! - [`cache`]: a cache hit against a model run, in process.
//! - [`query`]: the query model by batch size and token budget.
//! - [`postgres`]: the users' 5,000-stock job through PostgreSQL.
//! - [`batching`]: what batching buys, from the raw model to the pipeline.
//! - [`baseline`]: the inferrer against a plain Python consumer loop.
//! - [`decode`]: a large batch decoded on several threads, in process.
//! - [`backlog`]: a backlog drained with bounded memory.
//! - [`recovery`]: answers again after the inferrer is killed.
//! - [`compression`]: producer compression by codec, on realistic history.
//! - [`traffic`]: live latency while a bulk backlog drains, with and without lanes.
//! - [`ramp`]: the latency controller against fixed batch sizes on a load ramp.
//! - [`cluster`]: a local deployment (tansu and stage processes) they share.

pub mod backlog;
pub mod baseline;
pub mod batching;
pub mod cache;
pub mod cluster;
pub mod compression;
pub mod decode;
pub mod postgres;
pub mod query;
pub mod ramp;
pub mod recovery;
pub mod rollout;
pub mod traffic;

use std::path::Path;
use std::time::Instant;

use chrono::NaiveDate;
use sluice_app::config::SluiceConfig;
use sluice_core::{Incoming, Stage};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload, StockWindow, WindowPrecision};
use sluice_model::ModelMetadata;
use sluice_stages::fetcher::{SyntheticConfig, SyntheticHistory, SyntheticSource, WindowRequest, WindowShape};
use sluice_stages::generate::{Expected, generate};
use sluice_stages::{Inferrer, Normalizer};
use sluice_torch::TorchLoader;

/// Normalised inputs for `n` distinct events, encoded as the inferrer reads them
/// (in `normalizer.window_precision`).
pub(crate) fn inputs(config: &SluiceConfig, n: usize) -> anyhow::Result<Vec<Incoming>> {
    let requests = job_requests("bench", n);
    let windows = normalized_windows(config, SyntheticHistory::Noise, config.normalizer.window_precision, &requests)?;
    Ok(windows.into_iter().enumerate().map(|(i, (_, payload))| Incoming::new("bench", 0, i as i64, payload)).collect())
}

/// (event id, symbol, as_of) of `n` generated stock events (5,000 symbols).
pub(crate) fn job_requests(prefix: &str, n: usize) -> Vec<(String, String, NaiveDate)> {
    generate(prefix, n, 0, 5000)
        .into_iter()
        .filter_map(|e| match e.expected {
            Expected::Prediction { symbol, as_of } => Some((e.event_id, symbol, as_of)),
            Expected::DeadLetter { .. } | Expected::Intent { .. } => None,
        })
        .collect()
}

/// The serving stock model's window shape, the synthetic source with
/// `history`, and a normalizer that sends windows on in `precision`.
pub(crate) fn synthetic_stages(
    config: &SluiceConfig,
    history: SyntheticHistory,
    precision: WindowPrecision,
) -> anyhow::Result<(WindowShape, SyntheticSource, Normalizer)> {
    let model = &config.inferrer.model;
    let metadata = ModelMetadata::load(&model.version_dir(&model.version))?;
    let shape = WindowShape { days: metadata.days(), features: metadata.features() };
    let source = SyntheticSource::new(SyntheticConfig { history, ..SyntheticConfig::default() });
    let stats = metadata.normalization.as_ref().ok_or_else(|| anyhow::anyhow!("no normalization statistics"))?;
    Ok((shape, source, Normalizer::new(stats, shape.days, "normalized").with_precision(precision)))
}

/// The synthetic source's window for each (event id, symbol, as_of) of
/// `requests`, normalised in `precision` and encoded as the inferrer reads it:
/// (event id, envelope).
pub(crate) fn normalized_windows(
    config: &SluiceConfig,
    history: SyntheticHistory,
    precision: WindowPrecision,
    requests: &[(String, String, NaiveDate)],
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let (shape, source, normalizer) = synthetic_stages(config, history, precision)?;
    let mut out = Vec::with_capacity(requests.len());
    for (event_id, symbol, as_of) in requests {
        let values = source.window(&WindowRequest { symbol: symbol.clone(), as_of: *as_of }, shape)?;
        let window = StockWindow::new(symbol, *as_of, shape.days as u32, shape.features as u32, values);
        let envelope = Envelope::new(event_id, Payload::Normalized(normalizer.normalize(&window)?));
        out.push((event_id.clone(), codec::encode(&envelope)));
    }
    Ok(out)
}

/// The stock inferrer of `config` at batch `size`, no cache, warmed up at
/// that size, as the in-memory scenarios run it.
pub(crate) async fn inferrer_at(config: &SluiceConfig, size: usize) -> anyhow::Result<Inferrer<TorchLoader>> {
    let model = config.inferrer.model.clone();
    let worker =
        sluice_torch::ModelWorker::start(sluice_model::ModelConfig { warmup_batch_size: size, ..model.clone() })
            .await?;
    let settings = sluice_control::Settings { max_batch_size: size, cache_enabled: false, ..config.base_settings() };
    let stats = std::sync::Arc::new(sluice_stages::InferrerStats::default());
    Ok(Inferrer::new(TorchLoader, worker, model, tokio::sync::watch::channel(settings).1, None, "bench", stats)?)
}

/// `config` serving the stock model in `dir` instead (the near-free model).
pub(crate) fn with_model_dir(config: &SluiceConfig, dir: &Path) -> SluiceConfig {
    let mut other = config.clone();
    other.inferrer.model.dir = dir.to_path_buf();
    other
}

/// The LSTM of `config`, then the near-free model in `light` if there is one,
/// each named for the reports.
pub(crate) fn models(config: &SluiceConfig, light: Option<&Path>) -> Vec<(&'static str, SluiceConfig)> {
    let mut models = vec![("LSTM", config.clone())];
    models.extend(light.map(|dir| ("near-free", with_model_dir(config, dir))));
    models
}

pub(crate) async fn run(
    inferrer: &mut Inferrer<TorchLoader>,
    inputs: &[Incoming],
    batch: usize,
) -> anyhow::Result<f64> {
    let started = Instant::now();
    for chunk in inputs.chunks(batch) {
        inferrer.process(chunk).await.map_err(|f| anyhow::anyhow!(f.message))?;
    }
    Ok(started.elapsed().as_secs_f64())
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
