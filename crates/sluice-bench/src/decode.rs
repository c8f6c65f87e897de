//! `sluice bench decode`: what decoding a large batch on several threads
//! (`inferrer.decode_threads`) brings to the inferrer in memory, with the
//! LSTM and with the near-free model (where decoding is most of the time).
//!
//! For each model and batch size, one inferrer per thread count, warmed up,
//! then the counts measured in turn, `--repeats` rounds, so that each
//! comparison is between runs made side by side. Every figure is the median
//! with the lowest and highest run.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;

use serde::Serialize;
use sluice_app::config::SluiceConfig;
use sluice_control::Settings;
use sluice_stages::{Inferrer, InferrerStats};
use sluice_torch::TorchLoader;
use tokio::sync::watch;

use crate::batching::{Point, machine, median, with_spread};
use crate::{inputs, run, write_section};

#[derive(Debug, Clone)]
pub struct Options {
    /// Events per measured run.
    pub events: usize,
    pub sizes: Vec<usize>,
    /// The thread counts compared (the first is the baseline).
    pub threads: Vec<usize>,
    pub repeats: usize,
    /// The near-free model, measured after the LSTM (none: the LSTM alone).
    pub light_model: Option<PathBuf>,
    /// The Markdown file whose `decode` section is rewritten.
    pub out: PathBuf,
}

/// One model at one batch size: a point per thread count.
#[derive(Debug, Serialize)]
struct Row {
    model: String,
    batch_size: usize,
    by_threads: Vec<(usize, Point)>,
}

pub async fn decode(config: SluiceConfig, options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(!options.threads.is_empty() && options.threads.iter().all(|t| *t >= 1), "--threads ≥ 1 each");
    anyhow::ensure!(!options.sizes.is_empty() && options.sizes.iter().all(|s| *s >= 1), "--sizes ≥ 1 each");
    let incoming = inputs(&config, options.events)?;
    let mut models = vec![("LSTM".to_string(), config.clone())];
    if let Some(dir) = &options.light_model {
        let mut light = config.clone();
        light.inferrer.model.dir.clone_from(dir);
        models.push(("near-free".to_string(), light));
    }
    let mut rows = Vec::new();
    for (name, config) in &models {
        for &size in &options.sizes {
            let mut stages = Vec::new();
            for &threads in &options.threads {
                let mut stage = inferrer(config, size, threads).await?;
                run(&mut stage, &incoming[..size.min(incoming.len())], size).await?;
                stages.push((threads, stage, Vec::new()));
            }
            for _ in 0..options.repeats.max(1) {
                for (threads, stage, runs) in &mut stages {
                    let per_s = incoming.len() as f64 / run(stage, &incoming, size).await?;
                    tracing::info!(model = %name, size, threads, per_s, "inferrer in memory");
                    runs.push(Point::rate(size, per_s));
                }
            }
            let by_threads = stages.into_iter().map(|(threads, _, runs)| (threads, median(runs))).collect();
            rows.push(Row { model: name.clone(), batch_size: size, by_threads });
        }
    }
    let section = markdown(&rows, &options);
    write_section(&options.out, "decode", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}

/// The stock inferrer at batch `size`, decoding on `threads`, no cache.
async fn inferrer(config: &SluiceConfig, size: usize, threads: usize) -> anyhow::Result<Inferrer<TorchLoader>> {
    let model = config.inferrer.model.clone();
    let worker =
        sluice_torch::ModelWorker::start(sluice_model::ModelConfig { warmup_batch_size: size, ..model.clone() })
            .await?;
    let settings = Settings { max_batch_size: size, cache_enabled: false, ..config.base_settings() };
    let stats = Arc::new(InferrerStats::default());
    let stage = Inferrer::new(TorchLoader, worker, model, watch::channel(settings).1, None, "bench", stats)?;
    Ok(stage.with_decode_threads(threads))
}

fn markdown(rows: &[Row], options: &Options) -> String {
    let baseline = options.threads[0];
    let mut md = format!(
        "## Decoding a batch on several threads (`inferrer.decode_threads`)\n\n\
         Measured {} on {}. The stock inferrer's `process` on {} encoded windows from memory\n\
         (no broker, no cache), by batch size and decode threads; each thread count measured in\n\
         turn with the others, {} rounds: events/s, median (lowest–highest), and the median's ratio\n\
         to {baseline} thread(s). Written by `sluice bench decode`.\n\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        machine(),
        options.events,
        options.repeats.max(1),
    );
    md.push_str("| model | batch |");
    for t in &options.threads {
        md.push_str(&format!(" {t} thread(s) |"));
    }
    for t in &options.threads[1..] {
        md.push_str(&format!(" {t} ÷ {baseline} |"));
    }
    md.push('\n');
    md.push_str(&"|---".repeat(2 + options.threads.len() * 2 - 1));
    md.push_str("|\n");
    for row in rows {
        md.push_str(&format!("| {} | {} |", row.model, row.batch_size));
        for (_, point) in &row.by_threads {
            md.push_str(&format!(" {} |", with_spread(point)));
        }
        let base = row.by_threads[0].1.events_per_s;
        for (_, point) in &row.by_threads[1..] {
            md.push_str(&format!(" {:.2} |", point.events_per_s / base));
        }
        md.push('\n');
    }
    md.push_str(
        "\nA batch is split only where each part has at least 128 inputs, so batches under 256 decode\n\
         on one thread whatever the setting.\n",
    );
    md
}
