//! `sluice bench rollout`: what a model rollout costs the inferrer. The
//! stock inferrer in memory (no broker, no cache) with no rollout, with a
//! candidate in 20% shadow, and with 20% shadow and a 5% canary, measured in
//! turn, `--repeats` rounds, so that each comparison is between runs made side
//! by side. The candidate is another version of the same model (the
//! fixture's version 2), under gates that never decide, so that the rollout
//! runs for the whole measurement.

use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use sluice_app::config::SluiceConfig;
use sluice_control::keys::KeyLayout;
use sluice_control::rollout::follow::follow;
use sluice_control::rollout::{Gates, Rollout, RolloutStore};
use sluice_control::store::OverrideStore;
use sluice_core::{Output, Stage};
use sluice_stages::Inferrer;
use sluice_torch::TorchLoader;
use tokio_util::sync::CancellationToken;

use crate::batching::{Point, machine, median, with_spread};
use crate::{inferrer_at, inputs, run, write_section};

#[derive(Debug, Clone)]
pub struct Options {
    /// Events per measured run.
    pub events: usize,
    pub batch: usize,
    /// The candidate version (installed beside the serving one).
    pub candidate: String,
    pub repeats: usize,
    /// The Markdown file whose `rollout` section is rewritten.
    pub out: PathBuf,
}

/// (name, shadow share, canary share) of each scenario; the first is the baseline.
const SCENARIOS: [(&str, f64, f64); 3] =
    [("no rollout", 0.0, 0.0), ("20% shadow", 0.2, 0.0), ("20% shadow, 5% canary", 0.2, 0.05)];

/// Gates no figure reaches: the rollout runs throughout.
fn never_decide() -> Gates {
    Gates {
        min_compared: u64::MAX,
        max_return_diff_p99: 1e9,
        min_label_agreement: 0.0,
        max_error_rate: 1.0,
        max_time_ratio: 1e9,
    }
}

/// An inferrer in `scenario`, its candidate loaded (it has answered in shadow).
async fn inferrer_in(
    config: &SluiceConfig,
    options: &Options,
    (shadow, canary): (f64, f64),
    shutdown: &CancellationToken,
) -> anyhow::Result<Inferrer<TorchLoader>> {
    let stage = inferrer_at(config, options.batch).await?;
    if shadow == 0.0 && canary == 0.0 {
        return Ok(stage);
    }
    let overrides = OverrideStore::memory(KeyLayout::new("bench", "rollout"));
    let store = RolloutStore::beside(&overrides);
    let model = sluice_app::launch::model_name(&config.inferrer.model);
    let serving = config.inferrer.model.version.clone();
    let rollout = Rollout::new(&model, &serving, &options.candidate, shadow, canary, never_decide(), vec![], 0)
        .map_err(anyhow::Error::msg)?;
    store.replace(None, &rollout).await?;
    let link = follow(store, &model, shutdown.clone()).await;
    let mut stage = stage.with_rollout(link, "shadow");
    // Batches until the candidate answers in shadow: it is loaded and warm.
    let probe = inputs(config, options.batch)?;
    let started = Instant::now();
    loop {
        let outputs = stage.process(&probe).await.map_err(|f| anyhow::anyhow!(f.message))?;
        if outputs.iter().any(|o| matches!(o, Output::Send { topic, .. } if &**topic == "shadow")) {
            return Ok(stage);
        }
        anyhow::ensure!(started.elapsed() < Duration::from_secs(60), "the candidate never answered in shadow");
    }
}

pub async fn rollout(config: SluiceConfig, options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.batch >= 1 && options.events >= options.batch, "--events ≥ --batch ≥ 1");
    anyhow::ensure!(
        config.inferrer.model.has_version(&options.candidate),
        "candidate: version {} is not installed under {}",
        options.candidate,
        config.inferrer.model.dir.display()
    );
    let incoming = inputs(&config, options.events)?;
    let shutdown = CancellationToken::new();
    let mut stages = Vec::new();
    for (name, shadow, canary) in SCENARIOS {
        stages.push((name, inferrer_in(&config, &options, (shadow, canary), &shutdown).await?, Vec::new()));
    }
    for _ in 0..options.repeats.max(1) {
        for (name, stage, runs) in &mut stages {
            let per_s = incoming.len() as f64 / run(stage, &incoming, options.batch).await?;
            tracing::info!(scenario = %name, per_s, "inferrer in memory");
            runs.push(Point::rate(options.batch, per_s));
        }
    }
    shutdown.cancel();
    let points: Vec<(&str, Point)> = stages.into_iter().map(|(name, _, runs)| (name, median(runs))).collect();
    let section = markdown(&points, &options);
    write_section(&options.out, "rollout", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}

fn markdown(points: &[(&str, Point)], options: &Options) -> String {
    let mut md = format!(
        "## What a model rollout costs the inferrer\n\n\
         Measured {} on {}. The stock inferrer's `process` on {} encoded windows from memory\n\
         (no broker, no cache) at batch {}, serving version 1 with no rollout and with version {}\n\
         as the rollout's candidate (gates that never decide), each scenario measured in turn with\n\
         the others, {} rounds: events/s, median (lowest–highest), and the median's ratio to no\n\
         rollout. Written by `sluice bench rollout`.\n\n\
         | scenario | events/s | ÷ no rollout |\n|---|---|---|\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        machine(),
        options.events,
        options.batch,
        options.candidate,
        options.repeats.max(1),
    );
    let base = points[0].1.events_per_s;
    for (name, point) in points {
        md.push_str(&format!("| {name} | {} | {:.2} |\n", with_spread(point), point.events_per_s / base));
    }
    md.push_str(
        "\nOn a shadow batch the model runs twice, the candidate after the serving version (not\n\
         overlapped with the next batch's preparation); with a canary, every batch also runs the\n\
         candidate on its canary rows. Expect a shadow share `s` of a model-bound inferrer to cost\n\
         about `1 / (1 + s)` of its throughput, plus the canary rows.\n",
    );
    md
}
