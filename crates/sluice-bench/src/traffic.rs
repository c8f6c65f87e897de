//! `sluice bench traffic`: live latency while a bulk backlog drains, with
//! lanes and without. The four stages run as processes on tansu. In each run
//! a backlog of `bulk` stock requests is published first (to the bulk twin of
//! the requests topic with lanes, to the requests topic without), then a live
//! stream of requests at `live_rate` per second for as long as the backlog
//! lasts, published one by one. Measured per run: the live events' end-to-end
//! latency (request to written prediction), and the bulk backlog's throughput
//! while the live stream ran. The reference is the same live stream with no
//! backlog at all.
//!
//! The other half, the latency controller on a load ramp, is [`crate::ramp`].

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use sluice_app::config::SluiceConfig;
use sluice_app::launch::StageKind;
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_messages::prediction::PredictionRecord;
use sluice_stages::generate::{GeneratedEvent, generate};

use crate::batching::{Line, Percentiles, machine, percentiles, plot, stage_env};
use crate::cluster::LocalCluster;
use crate::write_section;

#[derive(Debug, Clone)]
pub struct Options {
    /// Stock requests in the bulk backlog.
    pub bulk: usize,
    /// Live requests per second, published one by one.
    pub live_rate: u32,
    /// Live requests per run (the reference run's too).
    pub live: usize,
    /// Runs per scenario; the median run (by live p99) is reported.
    pub repeats: usize,
    /// The model stages' `bulk_share`.
    pub bulk_share: u64,
    pub out: PathBuf,
    /// Which halves run: the lanes (live during a bulk drain), the ramp.
    pub lanes: bool,
    pub ramp: Option<crate::ramp::Options>,
}

/// One run of one scenario.
#[derive(Debug, Clone, Serialize)]
struct Run {
    live_ms: Percentiles,
    /// The live events' time from request to the inferrer's answer (the
    /// rest is the writer's hop).
    live_to_inferred_ms: Percentiles,
    /// Bulk predictions written per second while the live stream ran.
    bulk_per_s_during_live: f64,
    /// Of the predictions written while the live stream ran, the bulk ones' share.
    bulk_fraction_during_live: f64,
    /// From the first bulk publish to the last bulk prediction written.
    bulk_drain_s: f64,
}

#[derive(Debug, Serialize)]
struct Scenario {
    name: &'static str,
    lanes: bool,
    bulk: usize,
    /// The median run, by live p99.
    median: Run,
    /// Every run's live p99 (ms), for the spread.
    live_p99_runs_ms: Vec<f64>,
}

#[derive(Debug, Serialize)]
struct Report {
    measured_on: String,
    machine: String,
    options: String,
    scenarios: Vec<Scenario>,
    /// Live p99 with lanes during the bulk drain over live p99 with lanes and no bulk.
    lanes_p99_ratio: f64,
    /// The same without lanes.
    no_lanes_p99_ratio: f64,
    /// Live p99 with lanes over live p99 without, with no bulk at all: what
    /// reading the empty twins costs.
    lanes_idle_cost: f64,
}

pub async fn traffic(config: SluiceConfig, options: Options) -> anyhow::Result<()> {
    if options.lanes {
        lanes(&config, &options).await?;
    }
    if let Some(ramp) = &options.ramp {
        crate::ramp::ramp(&config, ramp).await?;
    }
    Ok(())
}

/// The lanes half: the four scenarios, each `repeats` times.
async fn lanes(config: &SluiceConfig, options: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.live > 0 && options.live_rate > 0, "--live and --live-rate must be at least 1");
    let repeats = options.repeats.max(1);
    let mut scenarios = Vec::new();
    for (name, lanes, bulk) in [
        ("live only, no lanes", false, 0),
        ("live only, lanes", true, 0),
        ("bulk backlog, no lanes", false, options.bulk),
        ("bulk backlog, lanes", true, options.bulk),
    ] {
        let mut runs = Vec::new();
        for repeat in 0..repeats {
            let run = scenario(config, options, lanes, bulk, repeat).await?;
            tracing::info!(
                name,
                repeat,
                p50 = run.live_ms.p50,
                p99 = run.live_ms.p99,
                to_inferred_p50 = run.live_to_inferred_ms.p50,
                "traffic run"
            );
            runs.push(run);
        }
        let live_p99_runs_ms: Vec<f64> = runs.iter().map(|r| r.live_ms.p99).collect();
        runs.sort_by(|a, b| a.live_ms.p99.total_cmp(&b.live_ms.p99));
        let median = runs.swap_remove(runs.len() / 2);
        scenarios.push(Scenario { name, lanes, bulk, median, live_p99_runs_ms });
    }
    let p99 = |i: usize| scenarios[i].median.live_ms.p99.max(1.0);
    let report = Report {
        measured_on: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        machine: format!("{}, CPU only", machine()),
        options: format!(
            "--bulk {} --live {} --live-rate {} --repeats {repeats} --bulk-share {}",
            options.bulk, options.live, options.live_rate, options.bulk_share
        ),
        lanes_p99_ratio: p99(3) / p99(1),
        no_lanes_p99_ratio: p99(2) / p99(0),
        lanes_idle_cost: p99(1) / p99(0),
        scenarios,
    };
    let json_path = options.out.with_extension("json");
    std::fs::write(options.out.with_extension("svg"), svg(&report))?;
    std::fs::write(&json_path, serde_json::to_string_pretty(&report)? + "\n")?;
    let section = markdown(&report, options);
    write_section(&options.out, "traffic", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}

/// One run: a fresh broker and stages, the backlog, then the live stream.
async fn scenario(
    config: &SluiceConfig,
    options: &Options,
    lanes: bool,
    bulk: usize,
    repeat: usize,
) -> anyhow::Result<Run> {
    let mut config = config.clone();
    config.lanes.enabled = lanes;
    let run = format!("traffic{}{}{bulk}r{repeat}", std::process::id(), if lanes { "l" } else { "n" });
    let mut cluster = LocalCluster::broker(&mut config, &run).await?;
    let mut env = stage_env(&config, 64, 5);
    env.push(("SLUICE_LANES__BULK_SHARE".into(), options.bulk_share.to_string()));
    cluster.start_stages(&config, &StageKind::ALL, &env).await?;
    let universe = config.fetcher.synthetic.universe;
    let warm = generate(&format!("{run}-warm"), 1, 0, universe);
    let live_events = generate(&format!("{run}-live"), options.live, 0, universe);
    let bulk_events = generate(&format!("{run}-bulk"), bulk, 0, universe);
    let reader = TopicReader::new(&config.kafka, &format!("{run}-observer"), &[&config.topics.predictions])?;
    let mut publisher = Publisher::new(&config.kafka, "bench-traffic")?;
    // One event all the way through first: the producer's id, group joins.
    send(&mut publisher, &config.topics.requests, &warm[0]).await?;
    publisher.settle().await?;
    loop {
        let record =
            reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("no warm-up output"))??;
        if serde_json::from_slice::<PredictionRecord>(&record.payload)?.event_id == warm[0].event_id {
            break;
        }
    }

    let bulk_topic = if lanes { config.lanes.twin(&config.topics.requests) } else { config.topics.requests.clone() };
    let bulk_started = sluice_messages::now_ms();
    for event in &bulk_events {
        send(&mut publisher, &bulk_topic, event).await?;
    }
    publisher.settle().await?;

    let interval = Duration::from_secs_f64(1.0 / f64::from(options.live_rate));
    let started = tokio::time::Instant::now();
    let live_started = sluice_messages::now_ms();
    for (i, event) in live_events.iter().enumerate() {
        tokio::time::sleep_until(started + interval * i as u32).await;
        send(&mut publisher, &config.topics.requests, event).await?;
        publisher.settle().await?;
    }
    let live_ended = sluice_messages::now_ms();

    let is_live = |id: &str| id.starts_with(&format!("{run}-live-"));
    let (mut live, mut to_inferred, mut written) = (Vec::new(), Vec::new(), Vec::new());
    while written.len() < live_events.len() + bulk_events.len() {
        let record = reader.next(Duration::from_secs(120)).await.ok_or_else(|| {
            anyhow::anyhow!("outputs stopped at {} of {}", written.len(), live_events.len() + bulk_events.len())
        })??;
        let p: PredictionRecord = serde_json::from_slice(&record.payload)?;
        if is_live(&p.event_id) {
            live.push((p.written_at_ms - p.requested_at_ms) as f64);
            to_inferred.push((p.inferred_at_ms - p.requested_at_ms) as f64);
        }
        written.push((is_live(&p.event_id), p.written_at_ms));
        cluster.check_running("the traffic run")?;
    }
    let during: Vec<bool> = written
        .iter()
        .filter(|(_, at)| (live_started..=live_ended).contains(at))
        .map(|(is_live, _)| *is_live)
        .collect();
    let bulk_during = during.iter().filter(|l| !**l).count();
    let last_bulk = written.iter().filter(|(l, _)| !l).map(|(_, at)| *at).max().unwrap_or(bulk_started);
    Ok(Run {
        live_ms: percentiles(live),
        live_to_inferred_ms: percentiles(to_inferred),
        bulk_per_s_during_live: bulk_during as f64 / ((live_ended - live_started) as f64 / 1000.0).max(1e-3),
        bulk_fraction_during_live: bulk_during as f64 / during.len().max(1) as f64,
        bulk_drain_s: (last_bulk - bulk_started) as f64 / 1000.0,
    })
}

async fn send(publisher: &mut Publisher, topic: &str, event: &GeneratedEvent) -> anyhow::Result<()> {
    publisher.send(topic, Some(event.event_id.as_bytes()), &event.json).await?;
    Ok(())
}

fn markdown(report: &Report, options: &Options) -> String {
    let mut table = String::from(
        "| scenario | live p50 (ms) | live p99 (ms) | p99 of each run (ms) | bulk written/s while live ran | bulk share of answers while live ran | bulk drain (s) |\n\
         |---|---:|---:|---|---:|---:|---:|\n",
    );
    for s in &report.scenarios {
        let runs: Vec<String> = s.live_p99_runs_ms.iter().map(|v| format!("{v:.0}")).collect();
        let m = &s.median;
        let bulk = |text: String| if s.bulk == 0 { "–".to_string() } else { text };
        table.push_str(&format!(
            "| {} | {:.0} | **{:.0}** | {} | {} | {} | {} |\n",
            s.name,
            m.live_ms.p50,
            m.live_ms.p99,
            runs.join(", "),
            bulk(format!("{:.0}", m.bulk_per_s_during_live)),
            bulk(format!("{:.0}%", 100.0 * m.bulk_fraction_during_live)),
            bulk(format!("{:.1}", m.bulk_drain_s)),
        ));
    }
    format!(
        "## Live latency during a bulk drain, with and without lanes\n\n\
         Command: `cargo run --release --bin sluice -- bench traffic {opts}` (measured on {when}:\n\
         {machine}; tansu broker and the four stages as separate processes; the stock LSTM, inferrer\n\
         batch 64, `max_wait_ms` 5). Each run starts a fresh broker and stages, publishes a backlog\n\
         of {bulk} stock requests (to `requests.bulk` with lanes, to `requests` without), then {live}\n\
         live requests at {rate}/s, one by one; latency is from each request's Kafka timestamp to\n\
         its written prediction. The median run of {repeats} (by live p99) is shown; JSON beside this file;\n\
         plot of each scenario's live p50, p99 and p99.9: [traffic.svg](traffic.svg).\n\n\
         {table}\n\
         Live p99 during the drain over live p99 with no backlog, each against the live-only run of\n\
         its own setting: **{lanes:.2}×** with lanes, {none:.1}× without (the target is at most 1.5×\n\
         with lanes). With no backlog at all, lanes cost live p99 {idle:.2}× (each stage also reads\n\
         the empty twins). Without lanes, live requests queue behind the backlog at every stage;\n\
         with lanes each stage serves them first and bulk keeps one batch in {share} while both\n\
         wait. Lanes order the work inside the stages only: the broker, each stage's producer and\n\
         the cores are shared, so a live record still waits behind bulk records there, and a live\n\
         batch waits for the model call in progress. docs/tuning.md (Lanes) reads these figures.\n",
        opts = report.options,
        when = report.measured_on,
        machine = report.machine,
        bulk = options.bulk,
        live = options.live,
        rate = options.live_rate,
        repeats = options.repeats.max(1),
        lanes = report.lanes_p99_ratio,
        none = report.no_lanes_p99_ratio,
        idle = report.lanes_idle_cost,
        share = options.bulk_share,
    )
}

/// Each scenario's live latency profile (p50, p99, p99.9 of the median run;
/// log10 of ms, since the scenarios span two decades).
fn svg(report: &Report) -> String {
    const COLOURS: [&str; 4] = ["#1f77b4", "#2ca02c", "#d62728", "#9467bd"];
    let lines: Vec<Line> = report
        .scenarios
        .iter()
        .zip(COLOURS)
        .map(|(s, colour)| {
            let l = &s.median.live_ms;
            let points = [l.p50, l.p99, l.p999]
                .iter()
                .enumerate()
                .map(|(x, ms)| {
                    let y = ms.max(1.0).log10();
                    (x as f64, y, y, y)
                })
                .collect();
            (s.name, colour, points)
        })
        .collect();
    plot("Live latency, with and without lanes", "percentile", "live latency (log10 ms: 3 is 1 s)", &lines, |x| {
        ["p50", "p99", "p99.9"].get(x as usize).map_or_else(String::new, |p| (*p).to_string())
    })
}
