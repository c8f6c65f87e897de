//! `sluice bench batching`: what batching buys, measured side by side in one
//! run, by batch size and by `max_wait`, written to `docs/benchmarks/` as JSON,
//! a Markdown report and SVG plots.
//!
//! Scenarios, each by the stock inferrer's batch size:
//! 1. the raw model: `Model::forward` on one prepared batch, called in a loop
//!    (the ceiling: no decoding, no broker, no other process);
//! 2. the inferrer stage alone, fed from memory (`Inferrer::process`: decode,
//!    tensor assembly, model, encode), no broker;
//! 3. the inferrer stage as a process through the broker: a backlog of
//!    normalised windows in its input topic, consumed, batched, run and
//!    produced to its output topic;
//! 4. the whole four-stage pipeline through the broker: a backlog of requests
//!    drained by the four stages as separate processes;
//!
//! plus one-at-a-time (every stage's batch size 1), at low load the end-to-end
//! latency by the inferrer's `max_wait`, and the broker's own floor: what it
//! costs to carry the windows with no stage at work, and one hop's latency,
//! from which the best any pipeline could do on this broker and these cores
//! follows. Throughput through the broker is the backlog divided by the time
//! from the first stage's first acknowledged event to the last stage's last
//! (the stages' start-up excluded), from the stages' own acknowledged-events
//! counters.
//!
//! Every throughput point is measured `--repeats` times (3 by default): the
//! report gives the median run and the spread (lowest and highest), and the
//! plot draws the spread as a bar. With a near-free model beside the LSTM
//! (`--light-model`, the `stock-light` fixture by default), scenarios 1 to 3
//! run again with it, which leaves the serving path's own cost: the inferrer's
//! CPU per event outside the model.

use std::future::Future;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use serde::Serialize;
use sluice_app::config::SluiceConfig;
use sluice_app::launch::StageKind;
use sluice_kafka::KafkaConfig;
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_messages::prediction::PredictionRecord;
use sluice_model::Batch;
use sluice_stages::fetcher::SyntheticConfig;
use sluice_stages::generate::generate;
use sluice_torch::Model;

use crate::cluster::{LocalCluster, ThreadCpu, cpu_seconds, rss_bytes, thread_cpu_seconds};
use crate::{inferrer_at, inputs, run, with_model_dir, write_section};

#[derive(Debug, Clone)]
pub struct Options {
    /// Events per measured point (the raw model runs at least as many rows).
    pub events: usize,
    pub sizes: Vec<usize>,
    /// The inferrer's `max_wait_ms` values for the low-load latency runs.
    pub waits: Vec<u64>,
    /// Events per second in the low-load latency runs.
    pub low_load_rate: u32,
    /// Runs per throughput point (the median is reported, with the spread).
    pub repeats: usize,
    /// A near-free model with the stock model's input, measured beside it
    /// (none: the LSTM alone).
    pub light_model: Option<PathBuf>,
    pub out_dir: PathBuf,
}

/// The near-free fixture `make setup` exports, if it is there.
pub fn light_fixture() -> Option<PathBuf> {
    let dir = sluice_testkit::cache_dir().join("models/fixtures/stock-light");
    dir.join("1/model.pt").exists().then_some(dir)
}

/// Throughput at one batch size: the median of its runs.
#[derive(Debug, Clone, Serialize)]
pub(crate) struct Point {
    batch_size: usize,
    pub(crate) events_per_s: f64,
    /// Every run's events/s, in the order measured (the median's spread).
    pub(crate) runs: Vec<f64>,
    /// Through the broker: the inferrer's model thread's CPU time over the
    /// drain's wall time (1.0: the model never waited for the inferrer).
    #[serde(skip_serializing_if = "Option::is_none")]
    model_busy: Option<f64>,
    /// Through the broker: how long the model thread was ready to run but
    /// waited for a core, over the drain's wall time.
    #[serde(skip_serializing_if = "Option::is_none")]
    model_waiting_for_core: Option<f64>,
    /// Per model call (raw model only), milliseconds.
    #[serde(skip_serializing_if = "Option::is_none")]
    call_ms: Option<Percentiles>,
    /// Per process (through the broker only): CPU per 1000 events from the
    /// stages' start to the last event, and peak resident MiB.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub(crate) processes: Vec<ProcessUse>,
    /// Through the broker: the inferrer's time per event in each phase of its
    /// batches ([`PHASES`], µs, wall time on its runtime thread), over the drain.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    phases_us_per_event: Vec<(String, f64)>,
}

/// The model stage's phases, as its `sluice_model_stage_microseconds_total` names them.
const PHASES: [&str; 5] = ["decode", "cache", "assemble", "model", "answer"];

#[derive(Debug, Clone, Copy, Serialize)]
pub(crate) struct Percentiles {
    pub(crate) p50: f64,
    pub(crate) p99: f64,
    pub(crate) p999: f64,
}

#[derive(Debug, Clone, Serialize)]
pub(crate) struct ProcessUse {
    pub(crate) name: String,
    pub(crate) cpu_ms_per_1000_events: f64,
    /// Of which the Kafka client's threads (librdkafka), the model thread, and
    /// the rest (the async runtime: decoding, encoding, the stage's own work).
    kafka_client_ms_per_1000_events: f64,
    model_ms_per_1000_events: f64,
    other_ms_per_1000_events: f64,
    peak_rss_mib: f64,
}

#[derive(Debug, Clone, Serialize)]
struct LatencyPoint {
    inferrer_max_wait_ms: u64,
    events: usize,
    events_per_s: u32,
    /// End to end: the request's timestamp to the output record's `written_at_ms`.
    latency_ms: Percentiles,
    /// The same split at the inferrer's answer: request to `inferred_at_ms`
    /// (fetcher, normalizer, inferrer and three broker hops), then to
    /// `written_at_ms` (one hop and the writer).
    to_inferred_ms: Percentiles,
    inferred_to_written_ms: Percentiles,
    mean_model_rows: f64,
    /// The raw model's p99 call time at the smallest measured batch size that
    /// holds `mean_model_rows`.
    model_p99_ms: f64,
    /// `max_wait` + one batch's model time (p99) + 10 ms.
    bound_ms: f64,
    within_bound: bool,
}

/// The broker alone, with no stage at work: the cost of carrying the
/// pipeline's windows, and one hop's latency at low load.
#[derive(Debug, Clone, Serialize)]
struct BrokerFloor {
    /// Windows published (normalised-window envelopes: the fetched ones are
    /// the same size) and read back.
    events: usize,
    window_bytes: usize,
    /// The broker's CPU per 1000 windows published with the stages' producer
    /// settings, and per 1000 read back by one consumer with theirs.
    broker_produce_ms_per_1000: f64,
    broker_fetch_ms_per_1000: f64,
    /// The publishing and reading process's CPU (librdkafka and all).
    client_produce_ms_per_1000: f64,
    client_fetch_ms_per_1000: f64,
    /// The same windows published by a producer without idempotence, for
    /// comparison only: Sluice never runs so (docs/tuning.md).
    broker_produce_plain_ms_per_1000: f64,
    client_produce_plain_ms_per_1000: f64,
    /// One small record, published and read back, one at a time.
    hop_ms: Percentiles,
}

/// Scenarios 1 to 3 with a near-free model: what is left is the serving path.
#[derive(Debug, Serialize)]
struct LightModel {
    dir: PathBuf,
    raw_model: Vec<Point>,
    inferrer_in_memory: Vec<Point>,
    inferrer_through_broker: Vec<Point>,
}

#[derive(Debug, Serialize)]
struct Report {
    measured_on: String,
    /// Runs redone because a stage exited during them, and why.
    redone_runs: Vec<String>,
    machine: String,
    /// Where the model ran (`cpu`, `cuda:0`) and in what precision.
    device: String,
    precision: String,
    intra_op_threads: usize,
    events_per_point: usize,
    repeats: usize,
    raw_model: Vec<Point>,
    inferrer_in_memory: Vec<Point>,
    inferrer_through_broker: Vec<Point>,
    /// The same without preparing the next batch while the model runs
    /// (`runtime.prepare_next_batch = false`), each size measured right after.
    inferrer_not_preparing: Vec<Point>,
    pipeline: Vec<Point>,
    one_at_a_time: Point,
    latency: Vec<LatencyPoint>,
    broker_floor: BrokerFloor,
    #[serde(skip_serializing_if = "Option::is_none")]
    light_model: Option<LightModel>,
}

/// Measures a point `repeats` times; the median run (the upper of the two
/// middle ones for an even count), with every run's rate.
pub(crate) async fn repeated<F, Fut>(repeats: usize, mut measure: F) -> anyhow::Result<Point>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Point>>,
{
    let mut points = Vec::with_capacity(repeats.max(1));
    let mut redone = 0;
    while points.len() < repeats.max(1) {
        match measure().await {
            Ok(point) => points.push(point),
            // A stage that exited mid-run (seen on tansu about once in 40
            // runs) spoils that run only: it is redone, and the report lists it.
            Err(e) if redone < MAX_REDONE && e.to_string().contains(" exited (") => {
                redone += 1;
                tracing::warn!(error = %e, "a stage exited during a run; the run is redone");
                REDONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).push(e.to_string());
            }
            Err(e) => return Err(e),
        }
    }
    Ok(median(points))
}

/// Pipeline runs so far: each names its topics and groups apart.
static RUNS: AtomicUsize = AtomicUsize::new(0);

/// Runs redone per point at most, before the benchmark gives up.
const MAX_REDONE: usize = 2;

/// Why each redone run was redone, for the report: the first line of the
/// error, with the stage's log kept under the temporary folder.
static REDONE: std::sync::Mutex<Vec<String>> = std::sync::Mutex::new(Vec::new());

/// The median of a point's runs (see [`repeated`]), with every run's rate.
pub(crate) fn median(mut points: Vec<Point>) -> Point {
    let runs: Vec<f64> = points.iter().map(|p| p.events_per_s).collect();
    points.sort_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s));
    let mut median = points.swap_remove(points.len() / 2);
    median.runs = runs;
    median
}

impl Point {
    /// A run's rate at a batch size, with nothing else measured yet.
    pub(crate) fn rate(batch_size: usize, events_per_s: f64) -> Self {
        Self {
            batch_size,
            events_per_s,
            runs: Vec::new(),
            model_busy: None,
            model_waiting_for_core: None,
            call_ms: None,
            processes: Vec::new(),
            phases_us_per_event: Vec::new(),
        }
    }
}

/// The lowest and highest of a point's runs.
fn spread(point: &Point) -> (f64, f64) {
    point.runs.iter().fold((f64::MAX, f64::MIN), |(lo, hi), r| (lo.min(*r), hi.max(*r)))
}

pub(crate) fn percentiles(mut values: Vec<f64>) -> Percentiles {
    values.sort_by(f64::total_cmp);
    let at = |q: f64| values.get(((values.len() as f64 * q).ceil() as usize).saturating_sub(1)).copied().unwrap_or(0.0);
    Percentiles { p50: at(0.5), p99: at(0.99), p999: at(0.999) }
}

pub async fn batching(config: SluiceConfig, options: Options) -> anyhow::Result<()> {
    anyhow::ensure!(!options.sizes.is_empty() && options.sizes.iter().all(|s| *s >= 1), "--sizes must be ≥ 1 each");
    let threads = config.inferrer.model.threads();
    let repeats = options.repeats.max(1);
    tracing::info!(events = options.events, repeats, "preparing inputs");
    let incoming = inputs(&config, options.events)?;

    let (raw, device) = raw_model(&config, &options).await?;
    let memory = inferrer_in_memory(&config, &options, &incoming).await?;
    let broker = inferrer_through_broker(&config, &options, &incoming, true).await?;
    let mut not_preparing = Vec::new();
    for &size in &options.sizes {
        not_preparing.push(repeated(repeats, || inferrer_point(&config, size, &incoming, false)).await?);
    }
    let mut pipeline = Vec::new();
    for &size in &options.sizes {
        pipeline.push(repeated(repeats, || pipeline_point(&config, size, options.events, &[])).await?);
    }
    // One at a time: every stage's batch size 1.
    let one: Vec<(String, String)> = ["FETCHER", "NORMALIZER", "WRITER"]
        .iter()
        .map(|stage| (format!("SLUICE_{stage}__BATCH__MAX_BATCH_SIZE"), "1".to_string()))
        .collect();
    let one_at_a_time = repeated(repeats, || pipeline_point(&config, 1, options.events.min(3000), &one)).await?;
    let mut latency = Vec::new();
    for &wait in &options.waits {
        latency.push(low_load_latency(&config, wait, options.low_load_rate, &raw).await?);
    }
    let broker_floor = broker_floor(&config, &incoming).await?;
    let light_model = match &options.light_model {
        Some(dir) => {
            let light = with_model_dir(&config, dir);
            tracing::info!(dir = %dir.display(), "the near-free model");
            Some(LightModel {
                dir: dir.clone(),
                raw_model: raw_model(&light, &options).await?.0,
                inferrer_in_memory: inferrer_in_memory(&light, &options, &incoming).await?,
                inferrer_through_broker: inferrer_through_broker(&light, &options, &incoming, true).await?,
            })
        }
        None => None,
    };

    let report = Report {
        measured_on: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        redone_runs: REDONE.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone(),
        machine: format!("{}, {}", machine(), if device == "cpu" { "CPU only" } else { "the model on a GPU" }),
        device,
        precision: format!("{:?}", config.inferrer.model.precision).to_lowercase(),
        intra_op_threads: threads,
        events_per_point: options.events,
        repeats,
        raw_model: raw,
        inferrer_in_memory: memory,
        inferrer_through_broker: broker,
        inferrer_not_preparing: not_preparing,
        pipeline,
        one_at_a_time,
        latency,
        broker_floor,
        light_model,
    };
    std::fs::create_dir_all(&options.out_dir)?;
    std::fs::write(options.out_dir.join("batching.json"), serde_json::to_string_pretty(&report)?)?;
    std::fs::write(options.out_dir.join("batching-throughput.svg"), throughput_svg(&report))?;
    std::fs::write(options.out_dir.join("batching-latency.svg"), latency_svg(&report))?;
    let markdown = markdown(&report, &options);
    std::fs::write(options.out_dir.join("batching.md"), &markdown)?;
    // The index next to the folder (docs/benchmarks.md for docs/benchmarks/) points here.
    let dir = options.out_dir.file_name().map_or_else(|| "benchmarks".into(), |n| n.to_string_lossy().into_owned());
    write_section(
        &options.out_dir.with_extension("md"),
        "batching",
        &format!(
            "## Batching: raw model, inferrer, pipeline\n\n\
             By batch size and `max_wait`, with ratios and plots: [{dir}/batching.md]({dir}/batching.md).\n"
        ),
    )?;
    writeln!(std::io::stdout(), "{markdown}")?;
    Ok(())
}

/// Scenario 1: `Model::forward` on a prepared batch, in a loop, on this
/// thread; with the device the model ran on.
async fn raw_model(config: &SluiceConfig, options: &Options) -> anyhow::Result<(Vec<Point>, String)> {
    let model_config = &config.inferrer.model;
    let model = Model::load(model_config)?;
    model.set_threads(model_config.threads());
    let sample = model.metadata().sample_len();
    let mut points = Vec::new();
    for &size in &options.sizes {
        model.warm_up(size)?;
        let batch = Batch::Windows((0..size * sample).map(|i| ((i % 97) as f32 - 48.0) / 48.0).collect());
        let calls = (options.events / size).max(20);
        let (model, batch) = (&model, &batch);
        let point = repeated(options.repeats, || async move {
            let mut times = Vec::with_capacity(calls);
            let started = Instant::now();
            for _ in 0..calls {
                let call = Instant::now();
                model.forward(batch, size)?;
                times.push(call.elapsed().as_secs_f64() * 1e3);
            }
            let per_s = (calls * size) as f64 / started.elapsed().as_secs_f64();
            tracing::info!(size, per_s, "raw model");
            Ok(Point { call_ms: Some(percentiles(times)), ..Point::rate(size, per_s) })
        })
        .await?;
        points.push(point);
    }
    Ok((points, model.device_name()))
}

/// Scenario 2: the inferrer's `process` on encoded inputs from memory.
async fn inferrer_in_memory(
    config: &SluiceConfig,
    options: &Options,
    incoming: &[sluice_core::Incoming],
) -> anyhow::Result<Vec<Point>> {
    let mut points = Vec::new();
    for &size in &options.sizes {
        let mut inferrer = inferrer_at(config, size).await?;
        run(&mut inferrer, &incoming[..size.min(incoming.len())], size).await?;
        // The runs borrow the stage in turn, so they are not a closure for `repeated`.
        let mut runs = Vec::with_capacity(options.repeats.max(1));
        for _ in 0..options.repeats.max(1) {
            let per_s = incoming.len() as f64 / run(&mut inferrer, incoming, size).await?;
            tracing::info!(size, per_s, "inferrer in memory");
            runs.push(Point::rate(size, per_s));
        }
        points.push(median(runs));
    }
    Ok(points)
}

/// Settings every broker run shares: the stock model only (the one in
/// `config`), no cache (every event is computed), each run on its own broker
/// and topics.
pub(crate) fn stage_env(config: &SluiceConfig, inferrer_batch: usize, inferrer_wait_ms: u64) -> Vec<(String, String)> {
    [
        ("SLUICE_INFERRER__MODEL__DIR", config.inferrer.model.dir.display().to_string()),
        ("SLUICE_INFERRER__SERVE", "[\"stock\"]".to_string()),
        ("SLUICE_NORMALIZER__TOKENIZE_QUERIES", "false".to_string()),
        ("SLUICE_CACHE__ENABLED", "false".to_string()),
        ("SLUICE_INFERRER__BATCH__MAX_BATCH_SIZE", inferrer_batch.to_string()),
        ("SLUICE_INFERRER__BATCH__MAX_WAIT_MS", inferrer_wait_ms.to_string()),
    ]
    .map(|(k, v)| (k.to_string(), v))
    .into()
}

/// Waits until `kind` has acknowledged every one of `events`; returns the
/// events per second from the first stage's first acknowledgement to then,
/// each process's CPU from the stages' start, and the inferrer's model
/// thread's busy fraction over the drain (from the first acknowledgement,
/// like the rate). The rate and CPU cover the whole drain: with
/// a backlog, a stage faster than the next one runs ahead and finishes early,
/// and a rate taken in the middle (from 10% to 90% of the last stage, as at
/// first) then saw only the slow stage at work and overstated the pipeline.
async fn drain(cluster: &mut LocalCluster, kind: StageKind, events: usize, size: usize) -> anyhow::Result<Point> {
    const ACKNOWLEDGED: &str = "sluice_stage_events_acknowledged_total";
    let first = cluster.ports.first().map_or(kind, |(first, _)| *first);
    let deadline = Instant::now() + Duration::from_secs(900);
    // The processes do not change during a drain (one that exits ends it).
    let processes = cluster.processes();
    let cpu = || -> Vec<ThreadCpu> { processes.iter().map(|(_, pid)| thread_cpu_seconds(*pid)).collect() };
    let start = cpu();
    let inferrer = processes.iter().position(|(name, _)| name == StageKind::Inferrer.name());
    let mut began: Option<(Instant, Vec<ThreadCpu>, Vec<f64>)> = None;
    // The first acknowledgement came after the previous look: the rate is
    // taken from then, a lower bound (a fast stage can drain a small backlog
    // between two looks).
    let mut looked = Instant::now();
    loop {
        let now = Instant::now();
        if began.is_none() && cluster.metric(first, ACKNOWLEDGED) > 0.0 {
            began = Some((looked, cpu(), stage_phases(cluster)));
        }
        looked = now;
        let done = cluster.metric(kind, ACKNOWLEDGED);
        if let Some((began, at_first, phases_at_first)) = &began
            && done >= events as f64
        {
            let seconds = now.duration_since(*began).as_secs_f64();
            let rate = done / seconds;
            let end = cpu();
            let busy = inferrer.map(|i| (end[i].model - at_first[i].model) / seconds);
            let waiting = inferrer.map(|i| (end[i].model_waiting - at_first[i].model_waiting) / seconds);
            let per_1000 = |seconds: f64| seconds * 1e6 / done;
            let uses = processes
                .iter()
                .zip(end.iter().zip(&start))
                .map(|((name, pid), (end, start))| {
                    let (kafka, model, other) =
                        (end.kafka - start.kafka, end.model - start.model, end.other - start.other);
                    ProcessUse {
                        name: name.clone(),
                        cpu_ms_per_1000_events: per_1000(kafka + model + other),
                        kafka_client_ms_per_1000_events: per_1000(kafka),
                        model_ms_per_1000_events: per_1000(model),
                        other_ms_per_1000_events: per_1000(other),
                        peak_rss_mib: rss_bytes(*pid).1 as f64 / (1 << 20) as f64,
                    }
                })
                .collect();
            let phases_us_per_event = PHASES
                .iter()
                .zip(stage_phases(cluster).iter().zip(phases_at_first))
                .map(|(phase, (end, start))| (phase.to_string(), (end - start) / done))
                .collect();
            return Ok(Point {
                model_busy: busy,
                model_waiting_for_core: waiting,
                processes: uses,
                phases_us_per_event,
                ..Point::rate(size, rate)
            });
        }
        anyhow::ensure!(now < deadline, "{} acknowledged only {done} of {events}", kind.name());
        // A stage that exits would leave the drain waiting out its deadline.
        cluster.check_running("draining")?;
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// Scenario 3: the inferrer process on a backlog of normalised windows, by batch size.
async fn inferrer_through_broker(
    config: &SluiceConfig,
    options: &Options,
    incoming: &[sluice_core::Incoming],
    prepare_next: bool,
) -> anyhow::Result<Vec<Point>> {
    let mut points = Vec::new();
    for &size in &options.sizes {
        points.push(repeated(options.repeats, || inferrer_point(config, size, incoming, prepare_next)).await?);
    }
    Ok(points)
}

/// The inferrer draining `incoming` at batch size `size`, preparing the next
/// batch while the model runs or not.
pub(crate) async fn inferrer_point(
    config: &SluiceConfig,
    size: usize,
    incoming: &[sluice_core::Incoming],
    prepare_next: bool,
) -> anyhow::Result<Point> {
    let mut config = config.clone();
    let run = format!("batching{}i{size}", std::process::id());
    let mut cluster = LocalCluster::broker(&mut config, &run).await?;
    publish(&config.kafka, &config.topics.normalized, incoming.iter().map(|i| (None, i.payload.as_slice()))).await?;
    let mut env = stage_env(&config, size, 5);
    env.push(("SLUICE_RUNTIME__PREPARE_NEXT_BATCH".into(), prepare_next.to_string()));
    cluster.start_stages(&config, &[StageKind::Inferrer], &env).await?;
    let point = drain(&mut cluster, StageKind::Inferrer, incoming.len(), size).await?;
    tracing::info!(
        size,
        per_s = point.events_per_s,
        ?point.model_busy,
        ?point.model_waiting_for_core,
        prepare_next,
        "inferrer through the broker"
    );
    Ok(point)
}

/// The cores, and that everything shares them.
pub(crate) fn machine() -> String {
    format!(
        "{} cores, everything (broker, stages, benchmark) on the same cores",
        std::thread::available_parallelism().map_or(1, |n| n.get())
    )
}

/// Scenario 4: the four stages on a backlog of requests, with `extra`
/// (`SLUICE_…` settings) on top of the benchmark's.
async fn pipeline_point(
    config: &SluiceConfig,
    size: usize,
    events: usize,
    extra: &[(String, String)],
) -> anyhow::Result<Point> {
    let requests: Vec<(Vec<u8>, Vec<u8>)> = generate("pipeline", events, 0, SyntheticConfig::default().universe)
        .into_iter()
        .map(|e| (e.event_id.into_bytes(), e.json))
        .collect();
    pipeline_of(config, size, &requests, events, extra).await
}

/// The four stages on a backlog of `requests` (key, JSON) that ask for
/// `answers` predictions in all.
pub(crate) async fn pipeline_of(
    config: &SluiceConfig,
    size: usize,
    requests: &[(Vec<u8>, Vec<u8>)],
    answers: usize,
    extra: &[(String, String)],
) -> anyhow::Result<Point> {
    let mut config = config.clone();
    let run = format!("batching{}p{size}{}", std::process::id(), RUNS.fetch_add(1, Ordering::Relaxed));
    let mut cluster = LocalCluster::broker(&mut config, &run).await?;
    let records = requests.iter().map(|(key, json)| (Some(key.as_slice()), json.as_slice()));
    publish(&config.kafka, &config.topics.requests, records).await?;
    let mut env = stage_env(&config, size, 5);
    env.extend_from_slice(extra);
    cluster.start_stages(&config, &StageKind::ALL, &env).await?;
    let point = drain(&mut cluster, StageKind::Writer, answers, size).await?;
    tracing::info!(size, ?extra, per_s = point.events_per_s, "pipeline");
    Ok(point)
}

pub(crate) async fn publish<'a>(
    kafka: &KafkaConfig,
    topic: &str,
    records: impl Iterator<Item = (Option<&'a [u8]>, &'a [u8])>,
) -> anyhow::Result<()> {
    let mut publisher = Publisher::new(kafka, "bench-batching")?;
    for (key, payload) in records {
        publisher.send(topic, key, payload).await?;
    }
    publisher.finish().await?;
    Ok(())
}

/// End-to-end latency at low load: events published one by one at `rate`
/// per second into the running pipeline.
async fn low_load_latency(config: &SluiceConfig, wait: u64, rate: u32, raw: &[Point]) -> anyhow::Result<LatencyPoint> {
    let mut config = config.clone();
    let run = format!("batching{}w{wait}", std::process::id());
    let mut cluster = LocalCluster::broker(&mut config, &run).await?;
    cluster.start_stages(&config, &StageKind::ALL, &stage_env(&config, 64, wait)).await?;
    let events = (rate as usize * 8).max(50);
    let requests = generate(&run, events + 1, 0, SyntheticConfig::default().universe);
    let reader = TopicReader::new(&config.kafka, &format!("{run}-observer"), &[&config.topics.predictions])?;
    let mut publisher = Publisher::new(&config.kafka, "bench-latency")?;
    // One event all the way through first: the producer's id, group joins.
    let (warm, timed) = requests.split_first().ok_or_else(|| anyhow::anyhow!("no events"))?;
    publisher.send(&config.topics.requests, Some(warm.event_id.as_bytes()), &warm.json).await?;
    publisher.settle().await?;
    let mut latencies = Vec::with_capacity(events);
    let mut to_inferred = Vec::with_capacity(events);
    let mut to_written = Vec::with_capacity(events);
    let mut seen_warm = false;
    while !seen_warm {
        let record =
            reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("no warm-up output"))??;
        seen_warm = serde_json::from_slice::<PredictionRecord>(&record.payload)?.event_id == warm.event_id;
    }
    let model_before = model_use(&cluster);
    let interval = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let started = tokio::time::Instant::now();
    for (i, event) in timed.iter().enumerate() {
        tokio::time::sleep_until(started + interval * i as u32).await;
        publisher.send(&config.topics.requests, Some(event.event_id.as_bytes()), &event.json).await?;
        // Each event leaves at once (no waiting for a full send window).
        publisher.settle().await?;
    }
    while latencies.len() < timed.len() {
        let record = reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("outputs stopped"))??;
        let p: PredictionRecord = serde_json::from_slice(&record.payload)?;
        latencies.push((p.written_at_ms - p.requested_at_ms) as f64);
        to_inferred.push((p.inferred_at_ms - p.requested_at_ms) as f64);
        to_written.push((p.written_at_ms - p.inferred_at_ms) as f64);
    }
    let (rows, calls) = {
        let after = model_use(&cluster);
        (after.0 - model_before.0, after.1 - model_before.1)
    };
    let mean_rows = if calls > 0.0 { rows / calls } else { 1.0 };
    let model_p99_ms = raw
        .iter()
        .find(|p| p.batch_size as f64 >= mean_rows)
        .or(raw.last())
        .and_then(|p| p.call_ms)
        .map_or(0.0, |c| c.p99);
    let latency_ms = percentiles(latencies);
    let bound_ms = wait as f64 + model_p99_ms + 10.0;
    tracing::info!(wait, p99 = latency_ms.p99, bound_ms, "low-load latency");
    Ok(LatencyPoint {
        inferrer_max_wait_ms: wait,
        events: timed.len(),
        events_per_s: rate,
        latency_ms,
        to_inferred_ms: percentiles(to_inferred),
        inferred_to_written_ms: percentiles(to_written),
        mean_model_rows: mean_rows,
        model_p99_ms,
        bound_ms,
        within_bound: latency_ms.p99 <= bound_ms,
    })
}

/// The broker alone: the backlog of windows published and read back by this
/// process (no stage running), with the broker's CPU and ours for each half;
/// then 200 small records, each published and read back before the next.
async fn broker_floor(config: &SluiceConfig, incoming: &[sluice_core::Incoming]) -> anyhow::Result<BrokerFloor> {
    let mut config = config.clone();
    let run = format!("batching{}floor", std::process::id());
    let cluster = LocalCluster::broker(&mut config, &run).await?;
    let broker = cluster.broker.pid();
    let me = std::process::id();
    let per_1000 = |seconds: f64| seconds * 1e6 / incoming.len() as f64;
    let cpu = || (cpu_seconds(broker), cpu_seconds(me));

    let before = cpu();
    publish(&config.kafka, &config.topics.normalized, incoming.iter().map(|i| (None, i.payload.as_slice()))).await?;
    let published = cpu();
    let reader = TopicReader::new(&config.kafka, &format!("{run}-windows"), &[&config.topics.normalized])?;
    // The group join (which tansu delays) is not reading: time from the first record.
    reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("no window read back"))??;
    let first = cpu();
    for _ in 1..incoming.len() {
        reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("windows stopped"))??;
    }
    let read = cpu();
    let mut plain = config.kafka.clone();
    plain.producer_properties.insert("enable.idempotence".into(), "false".into());
    publish(&plain, &config.topics.fetched, incoming.iter().map(|i| (None, i.payload.as_slice()))).await?;
    let published_plain = cpu();

    let topic = &config.topics.requests;
    let reader = TopicReader::new(&config.kafka, &format!("{run}-hop"), &[topic])?;
    let mut publisher = Publisher::new(&config.kafka, "bench-hop")?;
    let mut hops = Vec::with_capacity(200);
    for i in 0..=200 {
        let started = Instant::now();
        publisher.send(topic, Some(b"hop"), format!("{{\"hop\":{i}}}").as_bytes()).await?;
        reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("hop {i} not read back"))??;
        // The first one includes the group join.
        if i > 0 {
            hops.push(started.elapsed().as_secs_f64() * 1e3);
        }
        publisher.settle().await?;
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let floor = BrokerFloor {
        events: incoming.len(),
        window_bytes: incoming.first().map_or(0, |i| i.payload.len()),
        broker_produce_ms_per_1000: per_1000(published.0 - before.0),
        broker_fetch_ms_per_1000: per_1000(read.0 - first.0),
        client_produce_ms_per_1000: per_1000(published.1 - before.1),
        client_fetch_ms_per_1000: per_1000(read.1 - first.1),
        broker_produce_plain_ms_per_1000: per_1000(published_plain.0 - read.0),
        client_produce_plain_ms_per_1000: per_1000(published_plain.1 - read.1),
        hop_ms: percentiles(hops),
    };
    tracing::info!(?floor, "the broker alone");
    Ok(floor)
}

/// The inferrer's `/metrics` (empty without one).
fn inferrer_metrics(cluster: &LocalCluster) -> String {
    let port = cluster.ports.iter().find(|(k, _)| *k == StageKind::Inferrer).map(|(_, p)| *p);
    port.and_then(|p| crate::cluster::http_get(p, "/metrics")).map(|(_, b)| b).unwrap_or_default()
}

/// Microseconds the inferrer has spent in each of [`PHASES`] so far.
fn stage_phases(cluster: &LocalCluster) -> Vec<f64> {
    let body = inferrer_metrics(cluster);
    let total = |phase: &str| {
        sluice_testkit::prometheus::sum(&body, "sluice_model_stage_microseconds_total", &[("phase", phase)])
    };
    PHASES.iter().map(|phase| total(phase)).collect()
}

/// (rows, calls) the inferrer's model has run so far.
fn model_use(cluster: &LocalCluster) -> (f64, f64) {
    let body = inferrer_metrics(cluster);
    let series = |name: &str| {
        body.lines()
            .filter(|l| l.starts_with(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>()
    };
    (series("sluice_model_batch_rows_sum"), series("sluice_model_batch_rows_count"))
}

fn at_size(points: &[Point], size: usize) -> Option<f64> {
    points.iter().find(|p| p.batch_size == size).map(|p| p.events_per_s)
}

fn markdown(report: &Report, options: &Options) -> String {
    let sizes: Vec<String> = options.sizes.iter().map(ToString::to_string).collect();
    let waits: Vec<String> = options.waits.iter().map(ToString::to_string).collect();
    let mut md = format!(
        "# Batching: raw model, inferrer, pipeline\n\n\
         Written by `cargo run --release --bin sluice -- bench batching --events {events} --sizes {sizes} \
         --waits {waits} --rate {rate} --repeats {repeats}`\n\
         on {when} ({machine}; the model on {device} in {precision}; libtorch intra-op threads: {threads};\n\
         the fixture LSTM, input 30 × 105{light}).\n\
         Raw figures: [batching.json](batching.json). Plots: [throughput](batching-throughput.svg),\n\
         [latency](batching-latency.svg). Through the broker, every run has a tansu broker and\n\
         topics of its own, a backlog published before the stages start, the cache off (every\n\
         event computed), and throughput is the backlog over the time from the first stage's first\n\
         event to the last stage's last. Each figure is the median of {repeats} runs, with the\n\
         lowest and highest in brackets; the ratios are of medians.\n\n\
         ## Throughput by the inferrer's batch size (events/s)\n\n\
         | batch size | raw model | inferrer, in memory | inferrer through the broker | four-stage pipeline | inferrer ÷ raw | pipeline ÷ raw |\n\
         |---:|---:|---:|---:|---:|---:|---:|\n",
        events = options.events,
        sizes = sizes.join(","),
        waits = waits.join(","),
        rate = options.low_load_rate,
        repeats = report.repeats,
        when = report.measured_on,
        machine = report.machine,
        device = report.device,
        precision = report.precision,
        threads = report.intra_op_threads,
        light = if report.light_model.is_some() { ", and the near-free `stock-light` beside it" } else { "" },
    );
    for raw in &report.raw_model {
        let size = raw.batch_size;
        let cell =
            |points: &[Point]| points.iter().find(|p| p.batch_size == size).map_or_else(String::new, with_spread);
        let broker = at_size(&report.inferrer_through_broker, size).unwrap_or(0.0);
        let pipeline = at_size(&report.pipeline, size).unwrap_or(0.0);
        md.push_str(&format!(
            "| {size} | {} | {} | {} | {} | {:.2} | {:.2} |\n",
            with_spread(raw),
            cell(&report.inferrer_in_memory),
            cell(&report.inferrer_through_broker),
            cell(&report.pipeline),
            broker / raw.events_per_s,
            pipeline / raw.events_per_s
        ));
    }
    let best = report.pipeline.iter().max_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s));
    let best_raw = report.raw_model.iter().max_by(|a, b| a.events_per_s.total_cmp(&b.events_per_s));
    if let (Some(best), Some(best_raw)) = (best, best_raw) {
        let raw_there = at_size(&report.raw_model, best.batch_size).unwrap_or(f64::NAN);
        let broker_there = at_size(&report.inferrer_through_broker, best.batch_size).unwrap_or(f64::NAN);
        let verdict = |ok: bool| if ok { "met" } else { "not met" };
        let speedup = best.events_per_s / report.one_at_a_time.events_per_s;
        md.push_str(&format!(
            "\n## Headline figures\n\n\
             | figure | value | target |\n|---|---:|---|\n\
             | pipeline ÷ raw model at the pipeline's best batch size ({b}) | {:.2} | ≥ 0.6: {} |\n\
             | inferrer through the broker ÷ raw model at batch size {b} | {:.2} | ≥ 0.75: {} |\n\
             | pipeline at batch size {b} ÷ one at a time (every stage's batch size 1) | {speedup:.1}× | ≥ 8×: {} |\n\
             | one at a time, end to end | {} events/s | |\n\
             | raw model's best (batch size {}) | {} events/s | |\n",
            best.events_per_s / raw_there,
            verdict(best.events_per_s / raw_there >= 0.6),
            broker_there / raw_there,
            verdict(broker_there / raw_there >= 0.75),
            verdict(speedup >= 8.0),
            with_spread(&report.one_at_a_time),
            best_raw.batch_size,
            with_spread(best_raw),
            b = best.batch_size,
        ));
        md.push_str(&format!(
            "\n## Where the time goes (pipeline at its best batch size, {b})\n\n\
             CPU milliseconds per 1000 events by process, from the stages' start to the last event\n\
             ({cores} cores: {cpu_ms} ms of CPU per second of wall time at most), split by thread: the Kafka\n\
             client (librdkafka's threads), the model thread (libtorch), and the rest (the async\n\
             runtime: decoding and encoding envelopes, the stage's own work, metrics):\n\n\
             | process | CPU ms / 1000 events | Kafka client | model | the rest | peak RSS (MiB) |\n\
             |---|---:|---:|---:|---:|---:|\n",
            b = best.batch_size,
            cores = std::thread::available_parallelism().map_or(1, |n| n.get()),
            cpu_ms = std::thread::available_parallelism().map_or(1, |n| n.get()) * 1000,
        ));
        let mut total = 0.0;
        for p in &best.processes {
            total += p.cpu_ms_per_1000_events;
            // The broker is not ours: its threads are not split.
            let split = if p.name == "tansu" {
                "| | |".to_string()
            } else {
                format!(
                    "{:.0} | {:.0} | {:.0} |",
                    p.kafka_client_ms_per_1000_events, p.model_ms_per_1000_events, p.other_ms_per_1000_events
                )
            };
            md.push_str(&format!("| {} | {:.0} | {split} {:.0} |\n", p.name, p.cpu_ms_per_1000_events, p.peak_rss_mib));
        }
        md.push_str(&format!(
            "| all processes | {total:.0} | | | | |\n\
             | raw model alone, same batch size (1000 ÷ events/s, one thread) | {raw:.0} | | {raw:.0} | | |\n",
            raw = 1e6 / raw_there,
        ));
        md.push_str(&floor_markdown(report, best, raw_there));
    }
    md.push_str(
        "\n## Raw model call time by batch size (ms)\n\n| batch size | p50 | p99 | p99.9 |\n|---:|---:|---:|---:|\n",
    );
    for p in &report.raw_model {
        if let Some(c) = p.call_ms {
            md.push_str(&format!("| {} | {:.2} | {:.2} | {:.2} |\n", p.batch_size, c.p50, c.p99, c.p999));
        }
    }
    md.push_str(
        "\n## End-to-end latency at low load, by the inferrer's `max_wait`\n\n\
         Request timestamp to `written_at_ms` of the output record, over the four stages and the\n\
         broker; the other stages keep their configured `max_wait`. Bound: `max_wait` + the raw\n\
         model's p99 call time at the batch size seen + 10 ms.\n\n\
         | max_wait (ms) | events | events/s | p50 (ms) | p99 (ms) | p99.9 (ms) | p50 / p99 to the inferrer's answer | p50 / p99 from there to written | rows per model call | bound (ms) | p99 within |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
    );
    for l in &report.latency {
        md.push_str(&format!(
            "| {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.0} / {:.0} | {:.0} / {:.0} | {:.1} | {:.1} | {} |\n",
            l.inferrer_max_wait_ms,
            l.events,
            l.events_per_s,
            l.latency_ms.p50,
            l.latency_ms.p99,
            l.latency_ms.p999,
            l.to_inferred_ms.p50,
            l.to_inferred_ms.p99,
            l.inferred_to_written_ms.p50,
            l.inferred_to_written_ms.p99,
            l.mean_model_rows,
            l.bound_ms,
            if l.within_bound { "yes" } else { "no" }
        ));
    }
    md.push_str(&busy_markdown(report));
    if !report.redone_runs.is_empty() {
        md.push_str(&format!(
            "\n## Runs redone\n\n{} run(s) were redone because a stage process exited during them \
             (the figures above are of the runs that completed):\n\n",
            report.redone_runs.len()
        ));
        for why in &report.redone_runs {
            // What exited, and the last line its log had.
            let first = why.lines().next().unwrap_or_default();
            let last = why.lines().rev().find(|l| !l.trim().is_empty()).unwrap_or_default().trim();
            md.push_str(&format!("- {first} `{last}`\n"));
        }
    }
    if let Some(light) = &report.light_model {
        md.push_str(&light_markdown(light));
    }
    if report.device == "cpu" {
        md.push_str(
            "\n## GPU\n\nThese figures are the CPU's. `deploy/gpu/run.sh` measures the same on a GPU in one\n\
             call of the device machine; its report is [gpu.md](gpu.md).\n",
        );
    }
    md
}

/// The inferrer process's CPU split (through the broker) in µs per event.
fn inferrer_use(point: &Point) -> Option<&ProcessUse> {
    point.processes.iter().find(|u| u.name == StageKind::Inferrer.name())
}

/// How busy the model thread was while the inferrer drained its backlog: its
/// CPU seconds over the drain's wall seconds (the median run's).
fn busy_markdown(report: &Report) -> String {
    let mut md = String::from(
        "\n## The model thread's busy fraction (inferrer through the broker)\n\n\
         The model thread's CPU time over the drain's wall time (from the first acknowledgement to\n\
         the last, as for throughput), in the median run: 1.0 is a model that never waits for the\n\
         inferrer. Target with a backlog: ≥ 0.9. The inferrer prepares the next batch (decode, cache\n\
         look-up, layout) while the model runs the current one; each size is measured again right\n\
         after without that (`runtime.prepare_next_batch = false`). The CPU per event counts from the\n\
         stage's start, as everywhere in this report. *Waiting for a core*: the fraction of the drain\n\
         the model thread was ready to run but the kernel had no core for it (its run-queue time).\n\n\
         | batch size | busy fraction | waiting for a core | without preparing | events/s | without preparing | inferrer CPU µs/event | of which the model | outside the model |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for point in &report.inferrer_through_broker {
        let (Some(u), Some(busy)) = (inferrer_use(point), point.model_busy) else { continue };
        let without = report.inferrer_not_preparing.iter().find(|p| p.batch_size == point.batch_size);
        let busy_without = without.and_then(|p| p.model_busy).map_or_else(|| "–".into(), |b| format!("{b:.2}"));
        let waiting = point.model_waiting_for_core.map_or_else(|| "–".into(), |w| format!("{w:.2}"));
        md.push_str(&format!(
            "| {} | {busy:.2} | {waiting} | {busy_without} | {} | {} | {:.1} | {:.1} | {:.1} |\n",
            point.batch_size,
            with_spread(point),
            without.map_or_else(|| "–".into(), with_spread),
            u.cpu_ms_per_1000_events,
            u.model_ms_per_1000_events,
            u.cpu_ms_per_1000_events - u.model_ms_per_1000_events
        ));
    }
    md
}

/// A median with its spread: `7349 (7012–7701)`.
pub(crate) fn with_spread(point: &Point) -> String {
    let (lo, hi) = spread(point);
    if point.runs.len() > 1 {
        format!("{:.0} ({lo:.0}–{hi:.0})", point.events_per_s)
    } else {
        format!("{:.0}", point.events_per_s)
    }
}

/// The serving path apart from the model: the near-free model's scenarios,
/// and the inferrer's CPU per event outside the model through the broker.
fn light_markdown(light: &LightModel) -> String {
    let mut md = format!(
        "\n## The serving path apart from the model\n\n\
         The same scenarios with a near-free model (`{}`: the same input and outputs, a few\n\
         element-wise operations), so that what is measured is what the inferrer does around the\n\
         model. CPU of the inferrer process through the broker, in µs per event, split by thread:\n\
         the Kafka client (librdkafka), the model thread, and the rest (decoding, cache look-up,\n\
         grouping, tensor assembly, encoding, the runtime). Targets: at most 15 µs per event outside\n\
         the model at batch size ≥ 64, the Kafka client included; in memory ≥ 100,000 events/s.\n\n\
         | batch size | raw model | inferrer, in memory | inferrer through the broker | inferrer CPU µs/event | Kafka client | model | the rest | outside the model |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        light.dir.file_name().map_or_else(|| light.dir.display().to_string(), |n| n.to_string_lossy().into_owned())
    );
    for raw in &light.raw_model {
        let size = raw.batch_size;
        let find = |points: &'_ [Point]| points.iter().find(|p| p.batch_size == size).cloned();
        let memory = find(&light.inferrer_in_memory).map_or_else(String::new, |p| with_spread(&p));
        let broker = find(&light.inferrer_through_broker);
        let inferrer = broker.as_ref().and_then(inferrer_use);
        let cpu = inferrer.map_or_else(
            || "| | | |".to_string(),
            |u| {
                format!(
                    "{:.1} | {:.1} | {:.1} | {:.1} | {:.1} |",
                    u.cpu_ms_per_1000_events,
                    u.kafka_client_ms_per_1000_events,
                    u.model_ms_per_1000_events,
                    u.other_ms_per_1000_events,
                    u.cpu_ms_per_1000_events - u.model_ms_per_1000_events
                )
            },
        );
        md.push_str(&format!(
            "| {size} | {} | {memory} | {} | {cpu}\n",
            with_spread(raw),
            broker.as_ref().map_or_else(String::new, with_spread)
        ));
    }
    md.push_str(
        "\nThe rest, split (µs per event through the broker, the median run): the model stage's own phases,\n\
         timed in the stage (`sluice_model_stage_microseconds_total`): decoding and checking the envelopes, the\n\
         cache (look-up and grouping identical rows; off here), laying out the model's input, and making and\n\
         encoding the answers; then the runtime, the rest's CPU less those phases: polling and copying each\n\
         consumed message, batching, handing each output to the producer and awaiting its acknowledgement\n\
         (librdkafka's work on the stage's own threads, which the thread split counts here, not under the Kafka\n\
         client). The model phase is the wall time of the calls, for comparison.\n\n\
         | batch size | decode | cache | assemble | answer | runtime | Kafka client | model call (wall) |\n\
         |---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for point in &light.inferrer_through_broker {
        let (Some(u), false) = (inferrer_use(point), point.phases_us_per_event.is_empty()) else { continue };
        let phase = |name: &str| point.phases_us_per_event.iter().find(|(p, _)| p == name).map_or(0.0, |(_, us)| *us);
        let own: f64 = ["decode", "cache", "assemble", "answer"].iter().map(|p| phase(p)).sum();
        md.push_str(&format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} | {:.1} |\n",
            point.batch_size,
            phase("decode"),
            phase("cache"),
            phase("assemble"),
            phase("answer"),
            u.other_ms_per_1000_events - own,
            u.kafka_client_ms_per_1000_events,
            phase("model"),
        ));
    }
    md
}

/// The broker's floor and the ceilings that follow from it, at the pipeline's
/// best batch size (`best`, where the raw model did `raw_eps` events/s).
fn floor_markdown(report: &Report, best: &Point, raw_eps: f64) -> String {
    let f = &report.broker_floor;
    let mut md = format!(
        "\n## The broker alone\n\n\
         {events} windows of {bytes} bytes published with the stages' producer settings and read back\n\
         by one consumer with theirs, no stage running; CPU ms per 1000 windows:\n\n\
         | | broker (tansu) | client (librdkafka and all) |\n|---|---:|---:|\n\
         | publish (idempotent, as the stages do) | {:.0} | {:.0} |\n\
         | read back | {:.0} | {:.0} |\n\
         | publish without idempotence (comparison only; Sluice never does) | {:.0} | {:.0} |\n\n\
         One small record published and read back, one at a time (200 times): p50 {:.1} ms, p99 {:.1} ms.\n",
        f.broker_produce_ms_per_1000,
        f.client_produce_ms_per_1000,
        f.broker_fetch_ms_per_1000,
        f.client_fetch_ms_per_1000,
        f.broker_produce_plain_ms_per_1000,
        f.client_produce_plain_ms_per_1000,
        f.hop_ms.p50,
        f.hop_ms.p99,
        events = f.events,
        bytes = f.window_bytes,
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let model_ms = 1e6 / raw_eps;
    // Every window crosses the broker twice (fetched, normalized): published
    // and read back each time. The small records (requests, predictions) are
    // left out, and the first ceiling leaves the Kafka clients out too, so
    // both are generous.
    let broker_ms = 2.0 * (f.broker_produce_ms_per_1000 + f.broker_fetch_ms_per_1000);
    let clients_ms = 2.0 * (f.client_produce_ms_per_1000 + f.client_fetch_ms_per_1000);
    let ceiling = |overhead_ms: f64| (cores * 1e6 / (model_ms + overhead_ms)).min(raw_eps);
    let (pipeline_broker, pipeline_clients) = (ceiling(broker_ms), ceiling(broker_ms + clients_ms));
    let inferrer_fetch = f.broker_fetch_ms_per_1000 + f.client_fetch_ms_per_1000;
    let (inferrer_broker, inferrer_clients) = (ceiling(f.broker_fetch_ms_per_1000), ceiling(inferrer_fetch));
    let measured = best.events_per_s;
    let one = report.one_at_a_time.events_per_s;
    md.push_str(&format!(
        "\nThe most any pipeline could do here at batch size {b} if the stages' own work cost nothing:\n\
         {cores:.0} cores ÷ (the raw model's {model_ms:.0} ms + the cost of carrying the windows) per\n\
         1000 events. Windows cross the broker twice in the pipeline (published and read back as\n\
         `fetched`, then as `normalized`: broker {broker_ms:.0} ms, Kafka clients {clients_ms:.0} ms per 1000 events)\n\
         and are read once by the inferrer alone; the small records are left out:\n\n\
         | figure | ceiling: broker only | ceiling: broker and Kafka clients | measured | target |\n\
         |---|---:|---:|---:|---|\n\
         | pipeline ÷ raw model | {:.2} | {:.2} | {:.2} | ≥ 0.6 |\n\
         | inferrer through the broker ÷ raw model | {:.2} | {:.2} | {:.2} | ≥ 0.75 |\n\
         | batched ÷ one at a time ({one:.0} events/s) | {:.1}× | {:.1}× | {:.1}× | ≥ 8× |\n\
         | one hop at low load, p50 / p99 (the pipeline makes four) | {:.1} / {:.1} ms | | see below | all four, end to end: p99 within `max_wait` + model p99 + 10 ms |\n",
        pipeline_broker / raw_eps,
        pipeline_clients / raw_eps,
        measured / raw_eps,
        inferrer_broker / raw_eps,
        inferrer_clients / raw_eps,
        at_size(&report.inferrer_through_broker, best.batch_size).unwrap_or(0.0) / raw_eps,
        pipeline_broker / one,
        pipeline_clients / one,
        measured / one,
        f.hop_ms.p50,
        f.hop_ms.p99,
        b = best.batch_size,
    ));
    md
}

/// One plotted line: its name, its colour and its (x, y, lowest, highest)
/// points; the spread is drawn as a bar where lowest < highest.
pub(crate) type Line<'a> = (&'a str, &'a str, Vec<(f64, f64, f64, f64)>);

/// A line plot: events/s against batch size (log2 axis), one line per scenario.
fn throughput_svg(report: &Report) -> String {
    let series = [
        ("raw model", "#444444", &report.raw_model),
        ("inferrer, in memory", "#1f77b4", &report.inferrer_in_memory),
        ("inferrer through the broker", "#2ca02c", &report.inferrer_through_broker),
        ("four-stage pipeline", "#d62728", &report.pipeline),
    ];
    let lines: Vec<Line> = series
        .iter()
        .map(|(name, colour, points)| {
            let at = |p: &Point| {
                let (lo, hi) = spread(p);
                ((p.batch_size as f64).log2(), p.events_per_s, lo.min(p.events_per_s), hi.max(p.events_per_s))
            };
            (*name, *colour, points.iter().map(at).collect())
        })
        .collect();
    plot("Throughput by batch size", "batch size (log2)", "events/s", &lines, |x| format!("{}", 2f64.powf(x).round()))
}

/// End-to-end p50/p99/p99.9 against the inferrer's `max_wait`, with the bound.
fn latency_svg(report: &Report) -> String {
    let pick = |f: fn(&LatencyPoint) -> f64| -> Vec<(f64, f64, f64, f64)> {
        report.latency.iter().map(|l| (l.inferrer_max_wait_ms as f64, f(l), f(l), f(l))).collect()
    };
    let lines = vec![
        ("p50", "#1f77b4", pick(|l| l.latency_ms.p50)),
        ("p99", "#d62728", pick(|l| l.latency_ms.p99)),
        ("p99.9", "#9467bd", pick(|l| l.latency_ms.p999)),
        ("bound", "#444444", pick(|l| l.bound_ms)),
    ];
    plot("End-to-end latency at low load", "inferrer max_wait (ms)", "ms", &lines, |x| format!("{x:.0}"))
}

pub(crate) fn plot(
    title: &str,
    x_label: &str,
    y_label: &str,
    lines: &[Line],
    x_tick: impl Fn(f64) -> String,
) -> String {
    let (w, h, left, right, top, bottom) = (720.0, 420.0, 70.0, 200.0, 40.0, 50.0);
    let points = lines.iter().flat_map(|(_, _, p)| p.iter());
    let (mut x0, mut x1, mut y1) = (f64::MAX, f64::MIN, 0.0f64);
    for (x, _, _, y) in points {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y1 = y1.max(*y);
    }
    if x0 >= x1 {
        x1 = x0 + 1.0;
    }
    let y1 = if y1 > 0.0 { y1 * 1.1 } else { 1.0 };
    let sx = |x: f64| left + (x - x0) / (x1 - x0) * (w - left - right);
    let sy = |y: f64| h - bottom - y / y1 * (h - top - bottom);
    let mut svg = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n\
         <text x=\"{left}\" y=\"22\" font-size=\"15\">{title}</text>\n\
         <line x1=\"{left}\" y1=\"{yb}\" x2=\"{xr}\" y2=\"{yb}\" stroke=\"black\"/>\n\
         <line x1=\"{left}\" y1=\"{top}\" x2=\"{left}\" y2=\"{yb}\" stroke=\"black\"/>\n\
         <text x=\"{xm}\" y=\"{xl}\" text-anchor=\"middle\">{x_label}</text>\n\
         <text x=\"14\" y=\"{ym}\" transform=\"rotate(-90 14 {ym})\" text-anchor=\"middle\">{y_label}</text>\n",
        yb = h - bottom,
        xr = w - right,
        xm = (left + w - right) / 2.0,
        xl = h - 12.0,
        ym = (top + h - bottom) / 2.0,
    );
    for i in 0..=4 {
        let y = y1 * f64::from(i) / 4.0;
        svg.push_str(&format!(
            "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{y:.0}</text><line x1=\"{left}\" y1=\"{:.1}\" x2=\"{}\" y2=\"{:.1}\" stroke=\"#dddddd\"/>\n",
            left - 6.0,
            sy(y) + 4.0,
            sy(y),
            w - right,
            sy(y)
        ));
    }
    let mut ticks: Vec<f64> = lines.iter().flat_map(|(_, _, p)| p.iter().map(|(x, ..)| *x)).collect();
    ticks.sort_by(f64::total_cmp);
    ticks.dedup();
    for x in ticks {
        svg.push_str(&format!(
            "<text x=\"{:.1}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n",
            sx(x),
            h - bottom + 16.0,
            x_tick(x)
        ));
    }
    for (i, (name, colour, points)) in lines.iter().enumerate() {
        let path: Vec<String> = points.iter().map(|(x, y, ..)| format!("{:.1},{:.1}", sx(*x), sy(*y))).collect();
        svg.push_str(&format!(
            "<polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"2\" points=\"{}\"/>\n",
            path.join(" ")
        ));
        for (x, y, lo, hi) in points {
            svg.push_str(&format!("<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3\" fill=\"{colour}\"/>\n", sx(*x), sy(*y)));
            if lo < hi {
                svg.push_str(&format!(
                    "<line x1=\"{x:.1}\" y1=\"{:.1}\" x2=\"{x:.1}\" y2=\"{:.1}\" stroke=\"{colour}\" stroke-width=\"1\"/>\n",
                    sy(*lo),
                    sy(*hi),
                    x = sx(*x)
                ));
            }
        }
        let ly = top + 20.0 * i as f64;
        svg.push_str(&format!(
            "<line x1=\"{}\" y1=\"{ly}\" x2=\"{}\" y2=\"{ly}\" stroke=\"{colour}\" stroke-width=\"2\"/><text x=\"{}\" y=\"{}\">{name}</text>\n",
            w - right + 10.0,
            w - right + 30.0,
            w - right + 36.0,
            ly + 4.0
        ));
    }
    svg.push_str("</svg>\n");
    svg
}

#[cfg(test)]
mod tests {
    use super::*;

    fn point(events_per_s: f64) -> Point {
        Point::rate(8, events_per_s)
    }

    #[test]
    fn a_point_is_its_median_run_with_every_run_kept() {
        let p = median(vec![point(30.0), point(10.0), point(20.0)]);
        assert_eq!(p.events_per_s, 20.0);
        assert_eq!(p.runs, vec![30.0, 10.0, 20.0], "in the order measured");
        assert_eq!(spread(&p), (10.0, 30.0));
        assert_eq!(with_spread(&p), "20 (10–30)");
        // An even count takes the upper of the two middle runs; one run has no spread.
        assert_eq!(median(vec![point(1.0), point(4.0), point(2.0), point(3.0)]).events_per_s, 3.0);
        assert_eq!(with_spread(&median(vec![point(5.0)])), "5");
    }

    #[test]
    fn the_throughput_plot_draws_each_spread() {
        let mut raw = median(vec![point(10.0), point(30.0), point(20.0)]);
        raw.batch_size = 4;
        let svg = plot(
            "t",
            "x",
            "y",
            &[
                ("raw", "#000000", vec![(2.0, raw.events_per_s, 10.0, 30.0)]),
                ("flat", "#111111", vec![(3.0, 5.0, 5.0, 5.0)]),
            ],
            |x| format!("{x}"),
        );
        // One bar for the point with a spread, none for the one without.
        assert_eq!(svg.matches("stroke-width=\"1\"").count(), 1, "{svg}");
    }
}
