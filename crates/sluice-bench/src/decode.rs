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

use serde::Serialize;
use sluice_app::config::SluiceConfig;

use crate::batching::{Point, machine, median, with_spread};
use crate::{inferrer_at, inputs, models, run, write_section};

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
    let mut rows = Vec::new();
    for (name, config) in &models(&config, options.light_model.as_deref()) {
        for &size in &options.sizes {
            let mut stages = Vec::new();
            for &threads in &options.threads {
                let mut stage = inferrer_at(config, size).await?.with_decode_threads(threads);
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
            rows.push(Row { model: (*name).to_string(), batch_size: size, by_threads });
        }
    }
    let section = markdown(&rows, &options);
    write_section(&options.out, "decode", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
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
