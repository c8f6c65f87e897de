//! `sluice bench compression`: what producer compression (`compression.type`)
//! saves on the windows that travel between the stages, and what it costs,
//! on history shaped like prices (the synthetic source's `random_walk`)
//! beside uniform noise.
//!
//! 1. The broker alone: normalised windows, as the inferrer reads them, published
//!    to tansu with the stages' producer settings and each codec, and read back
//!    by one consumer; bytes on the wire per window (librdkafka's `tx_bytes`:
//!    requests and their framing, after compression) and the CPU of the
//!    broker and of the client for each half. By history (noise, random walk),
//!    traffic (the 5,000-stock job: a window per symbol; backfills: a
//!    symbol's steps every 5 trading days, one after another on one key, as
//!    the fetcher sends a backfill's steps) and window precision (fp32, bf16).
//! 2. The four-stage pipeline (separate processes, tansu) on random-walk
//!    history with each codec for every stage's producer, at inferrer batch 256.
//!
//! Every figure is the median of `--repeats` runs, with the lowest and highest.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use chrono::NaiveDate;
use serde::Serialize;
use sluice_app::config::SluiceConfig;
use sluice_core::{Incoming, Output, Stage};
use sluice_kafka::admin::{TopicSpec, create_topics};
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_messages::envelope::WindowPrecision;
use sluice_stages::Fetcher;
use sluice_stages::fetcher::{SyntheticHistory, SyntheticSource, trading_days_back};

use crate::batching::{Point, pipeline_of, repeated};
use crate::cluster::{LocalCluster, cpu_seconds};
use crate::{job_requests, normalized_windows, synthetic_stages, write_section};

/// The codecs librdkafka offers, `none` first (the comparison).
const CODECS: [&str; 5] = ["none", "lz4", "zstd", "snappy", "gzip"];
/// The codecs the pipeline is run with.
const PIPELINE_CODECS: [&str; 3] = ["none", "lz4", "zstd"];
/// Steps of one backfill, and trading days between them.
const BACKFILL_STEPS: usize = 100;
const BACKFILL_STRIDE: usize = 5;

#[derive(Debug, Clone)]
pub struct Options {
    /// Windows per broker-alone run.
    pub windows: usize,
    /// Events per pipeline run (0: no pipeline runs).
    pub events: usize,
    pub repeats: usize,
    /// The Markdown file whose `compression` section is rewritten.
    pub out: PathBuf,
}

/// A median with the lowest and highest of its runs.
#[derive(Debug, Clone, Copy, Serialize)]
struct Spread {
    median: f64,
    low: f64,
    high: f64,
}

impl Spread {
    fn of(mut runs: Vec<f64>) -> Self {
        runs.sort_by(f64::total_cmp);
        Self { median: runs[runs.len() / 2], low: runs[0], high: runs[runs.len() - 1] }
    }
}

/// One broker-alone cell: a codec on one kind of window.
#[derive(Debug, Serialize)]
struct Cell {
    history: &'static str,
    traffic: &'static str,
    precision: &'static str,
    codec: &'static str,
    /// The encoded records' bytes per window, uncompressed.
    window_bytes: usize,
    wire_bytes_per_window: Spread,
    /// CPU ms per 1000 windows.
    client_produce_ms: Spread,
    broker_produce_ms: Spread,
    broker_fetch_ms: Spread,
    client_fetch_ms: Spread,
}

#[derive(Debug, Serialize)]
struct PipelineRun {
    traffic: &'static str,
    codec: &'static str,
    point: Point,
}

#[derive(Debug, Serialize)]
struct Report {
    date: String,
    machine: String,
    windows: usize,
    repeats: usize,
    cells: Vec<Cell>,
    pipeline_events: usize,
    pipeline: Vec<PipelineRun>,
}

#[derive(Debug, Clone, Copy)]
enum Traffic {
    /// One window per symbol, as the 5,000-stock job asks.
    Job,
    /// Each symbol's backfill: its steps in date order, on one key, a window
    /// each (as they travelled before backfills became series).
    Backfill,
    /// The same backfills as the stages carry them: one series each.
    Series,
}

impl Traffic {
    fn name(self) -> &'static str {
        match self {
            Self::Job => "5,000-stock job",
            Self::Backfill => "backfills, a window per step",
            Self::Series => "backfills as series",
        }
    }

    /// (key, symbol, as_of) of `n` windows.
    fn requests(self, n: usize) -> Vec<(String, String, NaiveDate)> {
        match self {
            Self::Job => job_requests("compress", n),
            Self::Backfill | Self::Series => {
                let end = NaiveDate::from_ymd_opt(2024, 12, 31).expect("a date");
                let start = NaiveDate::from_ymd_opt(2020, 1, 1).expect("a date");
                let days = trading_days_back(end, start, BACKFILL_STEPS * BACKFILL_STRIDE);
                let steps: Vec<NaiveDate> = days.iter().rev().step_by(BACKFILL_STRIDE).copied().collect();
                (0..n.div_ceil(BACKFILL_STEPS))
                    .flat_map(|s| {
                        let symbol = SyntheticSource::symbol(s);
                        steps.iter().map(move |d| (format!("backfill-{symbol}"), symbol.clone(), *d))
                    })
                    .take(n)
                    .collect()
            }
        }
    }
}

pub async fn compression(config: SluiceConfig, options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.repeats >= 1 && options.windows >= 1, "--repeats and --windows must be at least 1");
    let mut config = config;
    let run = format!("compress{}", std::process::id());
    let cluster = LocalCluster::broker(&mut config, &run).await?;
    // A reader's first join waits for half the session timeout on tansu.
    config.kafka.session_timeout_ms = 1000;
    let mut cells = Vec::new();
    for history in [SyntheticHistory::Noise, SyntheticHistory::RandomWalk] {
        for traffic in [Traffic::Job, Traffic::Backfill, Traffic::Series] {
            for precision in [WindowPrecision::Fp32, WindowPrecision::Bf16] {
                let requests = traffic.requests(options.windows);
                let records = match traffic {
                    Traffic::Series => series_records(&config, history, precision, &requests).await?,
                    Traffic::Job | Traffic::Backfill => normalized_windows(&config, history, precision, &requests)?,
                };
                for codec in CODECS {
                    let mut runs = Vec::new();
                    for r in 0..options.repeats {
                        let topic = format!("{run}-{}-{r}", cells.len());
                        runs.push(broker_run(&config, &cluster, &topic, codec, &records, requests.len()).await?);
                    }
                    let figure = |i: usize| Spread::of(runs.iter().map(|r| r[i]).collect());
                    let cell = Cell {
                        history: history_name(history),
                        traffic: traffic.name(),
                        precision: precision_name(precision),
                        codec,
                        window_bytes: records.iter().map(|r| r.1.len()).sum::<usize>() / requests.len(),
                        wire_bytes_per_window: figure(0),
                        client_produce_ms: figure(1),
                        broker_produce_ms: figure(2),
                        broker_fetch_ms: figure(3),
                        client_fetch_ms: figure(4),
                    };
                    tracing::info!(?cell, "compression");
                    cells.push(cell);
                }
            }
        }
    }
    drop(cluster);

    let mut pipeline = Vec::new();
    if options.events > 0 {
        let job: Vec<(Vec<u8>, Vec<u8>)> = job_requests("pipeline", options.events)
            .into_iter()
            .map(|(id, symbol, as_of)| {
                let json = format!(r#"{{"kind":"stock","event_id":"{id}","symbol":"{symbol}","as_of":"{as_of}"}}"#);
                (id.into_bytes(), json.into_bytes())
            })
            .collect();
        let backfills = backfill_requests(&Traffic::Series.requests(options.events));
        for (traffic, requests) in [(Traffic::Job, &job), (Traffic::Series, &backfills)] {
            for codec in PIPELINE_CODECS {
                let settings = std::env::temp_dir().join(format!("sluice-bench-{run}-{codec}.toml"));
                std::fs::write(
                    &settings,
                    format!("[kafka.producer_properties]\n\"compression.type\" = \"{codec}\"\n"),
                )?;
                let env = vec![
                    ("SLUICE_CONFIG".to_string(), settings.display().to_string()),
                    ("SLUICE_FETCHER__SYNTHETIC__HISTORY".to_string(), "random_walk".to_string()),
                ];
                let point =
                    repeated(options.repeats, || pipeline_of(&config, 256, requests, options.events, &env)).await;
                let _ = std::fs::remove_file(&settings);
                pipeline.push(PipelineRun { traffic: traffic.name(), codec, point: point? });
            }
        }
    }

    let report = Report {
        date: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        machine: crate::batching::machine(),
        windows: options.windows,
        repeats: options.repeats,
        cells,
        pipeline_events: options.events,
        pipeline,
    };
    let json = options.out.with_file_name("benchmarks").join("compression.json");
    std::fs::create_dir_all(json.parent().unwrap_or(&options.out))?;
    std::fs::write(&json, serde_json::to_string_pretty(&report)?)?;
    write_section(&options.out, "compression", &markdown(&report))?;
    writeln!(std::io::stdout(), "compression: {} and {}", options.out.display(), json.display())?;
    Ok(())
}

/// One backfill request (key, JSON) per symbol of `steps` (each symbol's
/// steps, in order, `BACKFILL_STRIDE` trading days apart).
fn backfill_requests(steps: &[(String, String, NaiveDate)]) -> Vec<(Vec<u8>, Vec<u8>)> {
    steps
        .chunk_by(|a, b| a.1 == b.1)
        .map(|steps| {
            let (key, symbol, from, to) = (&steps[0].0, &steps[0].1, steps[0].2, steps[steps.len() - 1].2);
            let json = format!(
                r#"{{"kind":"stock","event_id":"{key}","symbol":"{symbol}","from":"{from}","as_of":"{to}","stride":{BACKFILL_STRIDE}}}"#
            );
            (key.clone().into_bytes(), json.into_bytes())
        })
        .collect()
}

/// The backfills of `requests` (each symbol's steps) as the normalizer sends
/// them on: (key, record) of each series, made by the fetcher and the
/// normalizer themselves.
async fn series_records(
    config: &SluiceConfig,
    history: SyntheticHistory,
    precision: WindowPrecision,
    requests: &[(String, String, NaiveDate)],
) -> anyhow::Result<Vec<(String, Vec<u8>)>> {
    let (shape, source, mut normalizer) = synthetic_stages(config, history, precision)?;
    let mut fetcher = Fetcher::new(Box::new(source), shape, "fetched");
    let mut records = Vec::new();
    for (key, json) in backfill_requests(requests) {
        let symbol = String::from_utf8_lossy(&key).into_owned();
        let fetched = fetcher.process(&[Incoming::new("requests", 0, 0, json)]).await;
        for output in fetched.map_err(|f| anyhow::anyhow!(f.message))? {
            let Output::Send { payload, .. } = output else { anyhow::bail!("backfill {symbol} was refused") };
            let normalized = normalizer.process(&[Incoming::new("fetched", 0, 0, payload)]).await;
            for output in normalized.map_err(|f| anyhow::anyhow!(f.message))? {
                let Output::Send { payload, .. } = output else { anyhow::bail!("backfill {symbol} was refused") };
                records.push((symbol.clone(), payload));
            }
        }
    }
    Ok(records)
}

/// One publish and read-back of `records` (carrying `windows` windows) with
/// `codec`: (wire bytes per window, client produce, broker produce, broker
/// fetch, client fetch CPU ms per 1000 windows).
async fn broker_run(
    config: &SluiceConfig,
    cluster: &LocalCluster,
    topic: &str,
    codec: &str,
    records: &[(String, Vec<u8>)],
    windows: usize,
) -> anyhow::Result<[f64; 5]> {
    let partitions = config.topics.partitions;
    let spec = TopicSpec { name: topic.to_string(), partitions, replication: config.topics.replication };
    create_topics(&config.kafka, &[spec]).await?;
    let mut kafka = config.kafka.clone();
    kafka.producer_properties.insert("compression.type".into(), codec.into());
    kafka.producer_properties.insert("statistics.interval.ms".into(), "100".into());
    let (broker, me) = (cluster.broker.pid(), std::process::id());
    let cpu = || (cpu_seconds(broker), cpu_seconds(me));
    let per_1000 = |seconds: f64| seconds * 1e6 / windows as f64;

    let mut publisher = Publisher::new(&kafka, "bench-compression")?;
    let before = cpu();
    for (key, payload) in records {
        publisher.send(topic, Some(key.as_bytes()), payload).await?;
    }
    publisher.settle().await?;
    let published = cpu();
    // The statistics come every 100 ms: wait for one taken after the last send.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let wire = publisher.bytes_sent() as f64 / windows as f64;
    publisher.finish().await?;

    let reader = TopicReader::new(&config.kafka, &format!("{topic}-reader"), &[topic])?;
    reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("no window read back"))??;
    let first = cpu();
    for _ in 1..records.len() {
        reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("windows stopped"))??;
    }
    let read = cpu();
    Ok([
        wire,
        per_1000(published.1 - before.1),
        per_1000(published.0 - before.0),
        per_1000(read.0 - first.0),
        per_1000(read.1 - first.1),
    ])
}

fn precision_name(precision: WindowPrecision) -> &'static str {
    match precision {
        WindowPrecision::Fp32 => "fp32",
        WindowPrecision::Bf16 => "bf16",
        WindowPrecision::Fp16 => "fp16",
    }
}

fn history_name(history: SyntheticHistory) -> &'static str {
    match history {
        SyntheticHistory::Noise => "noise",
        SyntheticHistory::RandomWalk => "random walk",
    }
}

fn markdown(report: &Report) -> String {
    let mut md = format!(
        "## Producer compression\n\n\
         Written by `cargo run --release --bin sluice -- bench compression --windows {windows} --events {events} \
         --repeats {repeats}` on {date} ({machine}); JSON in [benchmarks/compression.json](benchmarks/compression.json).\n\
         Median of {repeats} runs (lowest–highest).\n\n\
         ### The broker alone\n\n\
         {windows} normalised windows (as the inferrer reads them) published to tansu with the stages' producer\n\
         settings and `compression.type` set, and read back by one consumer. Bytes on the wire are librdkafka's\n\
         `tx_bytes` per window (requests and framing, after compression); CPU in ms per 1000 windows. The job is a\n\
         window per symbol (the 5,000-stock job); backfills are {BACKFILL_STEPS} steps {BACKFILL_STRIDE} trading days\n\
         apart per symbol, in order on one key, either a window per step (as they travelled before) or one series\n\
         per backfill, made by the fetcher and the normalizer (as they travel now). \"Bytes per window\" is the\n\
         records' size, uncompressed, over the windows they carry.\n\n\
         | history | traffic | window: bytes per window | codec | bytes on the wire per window | ÷ none | client publish | broker publish | broker read | client read |\n\
         |---|---|---|---|---:|---:|---:|---:|---:|---:|\n",
        windows = report.windows,
        events = report.pipeline_events,
        repeats = report.repeats,
        date = report.date,
        machine = report.machine,
    );
    let span = |s: &Spread, digits: usize| {
        format!("{:.digits$} ({:.digits$}–{:.digits$})", s.median, s.low, s.high, digits = digits)
    };
    for cell in &report.cells {
        let none = report
            .cells
            .iter()
            .find(|c| {
                c.codec == "none" && (c.history, c.traffic, c.precision) == (cell.history, cell.traffic, cell.precision)
            })
            .map_or(f64::NAN, |c| c.wire_bytes_per_window.median);
        md.push_str(&format!(
            "| {} | {} | {}: {} | {} | {} | {:.2} | {} | {} | {} | {} |\n",
            cell.history,
            cell.traffic,
            cell.precision,
            cell.window_bytes,
            cell.codec,
            span(&cell.wire_bytes_per_window, 0),
            cell.wire_bytes_per_window.median / none,
            span(&cell.client_produce_ms, 0),
            span(&cell.broker_produce_ms, 0),
            span(&cell.broker_fetch_ms, 0),
            span(&cell.client_fetch_ms, 0),
        ));
    }
    if !report.pipeline.is_empty() {
        md.push_str(&format!(
            "\n### The pipeline\n\n\
             {events} predictions through the four stages as separate processes on tansu, random-walk history,\n\
             inferrer batch 256, every stage's producer with the codec (`kafka.producer_properties.\
             \"compression.type\"`): the job's requests (a window each), then backfills ({BACKFILL_STEPS} steps each,\n\
             carried as series). CPU in ms per 1000 predictions, over the whole drain:\n\n\
             | traffic | codec | events/s | fetcher | normalizer | inferrer | writer | broker |\n\
             |---|---|---:|---:|---:|---:|---:|---:|\n",
            events = report.pipeline_events,
        ));
        for run in &report.pipeline {
            let cpu = |name: &str| {
                run.point
                    .processes
                    .iter()
                    .find(|p| p.name == name)
                    .map_or("–".to_string(), |p| format!("{:.0}", p.cpu_ms_per_1000_events))
            };
            md.push_str(&format!(
                "| {} | {} | {} | {} | {} | {} | {} | {} |\n",
                run.traffic,
                run.codec,
                crate::batching::with_spread(&run.point),
                cpu("fetcher"),
                cpu("normalizer"),
                cpu("inferrer"),
                cpu("writer"),
                cpu("tansu"),
            ));
        }
    }
    md
}
