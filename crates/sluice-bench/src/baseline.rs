//! `sluice bench baseline`: Sluice's inferrer against a plain Python consumer
//! loop (`deploy/bench/python_consumer.py`: confluent-kafka and torch, one
//! `np.frombuffer` and one forward pass per batch, JSON answers, offsets
//! stored after delivery for the auto-commit, as Sluice does), on the same tansu broker, the same records of
//! normalised windows and the same TorchScript model at the same batch size,
//! with the LSTM and with the near-free model. Each round runs both, one
//! after the other, each on a broker of its own; every figure is the median
//! of the rounds with the lowest and highest.

use std::io::Write;
use std::path::PathBuf;
use std::process::Command;

use sluice_app::config::SluiceConfig;

use crate::batching::{Point, inferrer_point, machine, median, publish, with_spread};
use crate::cluster::LocalCluster;
use crate::{inputs, models, write_section};

#[derive(Debug, Clone)]
pub struct Options {
    /// Events per run.
    pub events: usize,
    pub batch: usize,
    pub repeats: usize,
    /// The near-free model, measured after the LSTM (none: the LSTM alone).
    pub light_model: Option<PathBuf>,
    /// The Markdown file whose `baseline` section is rewritten.
    pub out: PathBuf,
}

pub async fn baseline(config: SluiceConfig, options: Options) -> anyhow::Result<()> {
    ensure_confluent_kafka()?;
    let incoming = inputs(&config, options.events)?;
    let mut rows = Vec::new();
    for (name, config) in &models(&config, options.light_model.as_deref()) {
        let (mut sluice, mut python) = (Vec::new(), Vec::new());
        for _ in 0..options.repeats.max(1) {
            let ours = inferrer_point(config, options.batch, &incoming, true).await?;
            let theirs = python_point(config, options.batch, &incoming).await?;
            tracing::info!(model = %name, sluice = ours.events_per_s, python = theirs.events_per_s, "baseline round");
            sluice.push(ours);
            python.push(theirs);
        }
        rows.push((*name, median(sluice), median(python)));
    }
    let mut md = format!(
        "## Against a plain Python consumer\n\n\
         Measured {} on {}. `sluice bench baseline`: Sluice's inferrer (`sluice run inferrer`) and a\n\
         plain Python consumer loop (`deploy/bench/python_consumer.py`: confluent-kafka and torch, one\n\
         `np.frombuffer` and one forward pass per batch, JSON answers, offsets stored after delivery\n\
         for the auto-commit, as Sluice does) each drain the same {} records of normalised windows from a tansu broker of its\n\
         own, with the same TorchScript model at batch {}, one model thread; events/s from the first\n\
         record to the last acknowledgement, median of {} rounds (lowest–highest), the two run one\n\
         after the other in each round.\n\n\
         | model | Sluice's inferrer | Python consumer | Sluice ÷ Python |\n|---|---:|---:|---:|\n",
        chrono::Utc::now().format("%Y-%m-%d"),
        machine(),
        options.events,
        options.batch,
        options.repeats.max(1),
    );
    for (name, sluice, python) in &rows {
        md.push_str(&format!(
            "| {name} | {} | {} | {:.2} |\n",
            with_spread(sluice),
            with_spread(python),
            sluice.events_per_s / python.events_per_s
        ));
    }
    write_section(&options.out, "baseline", &md)?;
    writeln!(std::io::stdout(), "{md}")?;
    Ok(())
}

/// The Python consumer draining `incoming` at `batch`, on a broker of its own.
async fn python_point(
    config: &SluiceConfig,
    batch: usize,
    incoming: &[sluice_core::Incoming],
) -> anyhow::Result<Point> {
    let mut config = config.clone();
    let run = format!("baseline{}p", std::process::id());
    let _cluster = LocalCluster::broker(&mut config, &run).await?;
    let topic = &config.topics.normalized;
    publish(&config.kafka, topic, incoming.iter().map(|i| (None, i.payload.as_slice()))).await?;
    let model = &config.inferrer.model;
    let metadata = sluice_model::ModelMetadata::load(&model.version_dir(&model.version))?;
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../deploy/bench/python_consumer.py");
    let output = Command::new(sluice_testkit::python())
        .arg(&script)
        .args(["--brokers", &config.kafka.brokers, "--topic", topic, "--out", &config.topics.inferred])
        .args(["--group", &format!("{run}-python")])
        .arg("--model")
        .arg(model.version_dir(&model.version).join("model.pt"))
        .args(["--events", &incoming.len().to_string(), "--batch", &batch.to_string()])
        .args(["--days", &metadata.days().to_string(), "--features", &metadata.features().to_string()])
        .output()?;
    anyhow::ensure!(
        output.status.success(),
        "the Python consumer failed ({}): {}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let per_s = report["events_per_s"].as_f64().ok_or_else(|| anyhow::anyhow!("no events_per_s in {report}"))?;
    Ok(Point::rate(batch, per_s))
}

/// confluent-kafka in the venv's Python, installed from PyPI if missing.
fn ensure_confluent_kafka() -> anyhow::Result<()> {
    let python = sluice_testkit::python();
    if Command::new(&python).args(["-c", "import confluent_kafka"]).status()?.success() {
        return Ok(());
    }
    tracing::info!("installing confluent-kafka into the venv (once)");
    let installed = Command::new(&python)
        .args(["-m", "pip", "install", "--quiet", "--disable-pip-version-check", "confluent-kafka"])
        .status()?;
    anyhow::ensure!(installed.success(), "pip install confluent-kafka failed");
    Ok(())
}
