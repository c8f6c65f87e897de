//! `sluice demo`: the whole pipeline on librdkafka's in-process mock cluster,
//! with no external service, and a summary that accounts for every event.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::Context;
use sluice_control::rollout::{Phase, Rollout};
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_kafka::embedded::EmbeddedCluster;
use sluice_messages::dead_letter::DeadLetter;
use sluice_messages::prediction::{IntentRecord, PredictionRecord};
use sluice_stages::generate::{generate, generate_queries};
use tokio_util::sync::CancellationToken;

use crate::config::SluiceConfig;
use crate::launch::{StageKind, Stats, cancel_on_signals, join, spawn_stage, start_control};
use crate::produce::progress;
use sluice_model::ModelKind;

/// Events published but not yet accounted for, at most.
const IN_FLIGHT: u64 = 512;

/// What the demo saw, for its summary (and the test that reads it).
#[derive(Debug, Default)]
struct Tally {
    predicted: HashMap<String, PredictionRecord>,
    intents: HashMap<String, IntentRecord>,
    duplicate_predictions: u64,
    dead_letters: BTreeMap<String, u64>,
    dead_sources: HashSet<(String, i32, i64)>,
}

impl Tally {
    fn accounted(&self, below: u64) -> u64 {
        self.predicted.len() as u64 + self.intents.len() as u64 + self.dead_sources.len() as u64 + below
    }
}

pub async fn run(mut config: SluiceConfig, events: usize, invalid_every: usize) -> anyhow::Result<()> {
    let cluster = EmbeddedCluster::start()?;
    let kafka = cluster.kafka_config(&config.kafka);
    // One partition per stage is plenty in one process and keeps startup fast.
    config.topics.partitions = config.topics.partitions.min(2);
    cluster.create_topics(&config.topic_specs())?;
    let config = Arc::new(config);

    let shutdown = CancellationToken::new();
    cancel_on_signals(shutdown.clone());
    let all_stats = Arc::new(Stats::default());
    let kinds = StageKind::expand(&StageKind::ALL, &config);
    let control = start_control(&config, kinds.contains(&StageKind::QueryInferrer), true, shutdown.clone()).await?;
    let stages: Vec<_> = kinds
        .into_iter()
        .map(|kind| {
            spawn_stage(kind, config.clone(), kafka.clone(), shutdown.clone(), control.clone(), all_stats.clone())
        })
        .collect();
    let stats = all_stats.writer.clone();
    // Joins its group while the stages warm up, so that it reads from the first event.
    let reader =
        TopicReader::new(&kafka, "sluice-demo-observer", &[&config.topics.predictions, &config.topics.dead_letters])?;

    let started = Instant::now();
    while !stages.iter().all(|s| s.status.ready()) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "the stages did not become ready in 120 s");
        if shutdown.is_cancelled() {
            return join(stages).await.context("a stage failed to start");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let warmup = started.elapsed();

    // One event in ten is a text query, spread through the stream.
    let queries = if config.inferrer.serve.contains(&ModelKind::Query) { events / 10 } else { 0 };
    let stocks = generate("demo", events - queries, invalid_every, config.fetcher.synthetic.universe);
    let mut queries = generate_queries("demo", queries).into_iter();
    let mut generated = Vec::with_capacity(events);
    for (i, stock) in stocks.into_iter().enumerate() {
        generated.push(stock);
        if i % 9 == 8 {
            generated.extend(queries.next());
        }
    }
    generated.extend(queries);
    let mut publisher = Publisher::new(&kafka, "sluice-demo-producer")?;
    let mut tally = Tally::default();
    let bar = progress(events as u64, "processed");
    let published_at = Instant::now();
    let deadline = published_at + Duration::from_secs(60 + events as u64 / 50);
    let mut next = generated.iter();
    let mut published = 0u64;
    loop {
        let accounted = tally.accounted(stats.below_min_confidence.load(Ordering::Relaxed));
        bar.set_position(accounted);
        bar.set_message(format!("published {published}, processed"));
        if accounted >= events as u64 || Instant::now() > deadline || shutdown.is_cancelled() {
            break;
        }
        // The mock cluster keeps only about 5 MB per partition and drops older
        // messages (see docs/decisions.md): keep the backlog well below that.
        while published < accounted + IN_FLIGHT {
            let Some(e) = next.next() else { break };
            publisher.send(&config.topics.requests, Some(e.event_id.as_bytes()), &e.json).await?;
            published += 1;
        }
        let Some(record) = reader.next(Duration::from_millis(100)).await else { continue };
        let record = record?;
        if record.topic == config.topics.predictions {
            let kind: serde_json::Value = serde_json::from_slice(&record.payload).context("a prediction record")?;
            let duplicate = if kind["kind"] == "query" {
                let q: IntentRecord = serde_json::from_slice(&record.payload).context("an intent record")?;
                tally.intents.insert(q.event_id.clone(), q).is_some()
            } else {
                let p: PredictionRecord = serde_json::from_slice(&record.payload).context("a prediction record")?;
                tally.predicted.insert(p.event_id.clone(), p).is_some()
            };
            if duplicate {
                tally.duplicate_predictions += 1;
            }
        } else {
            let d: DeadLetter = serde_json::from_slice(&record.payload).context("a dead letter")?;
            if tally.dead_sources.insert((d.source.topic.clone(), d.source.partition, d.source.offset)) {
                *tally.dead_letters.entry(format!("{} ({})", d.reason, d.stage)).or_default() += 1;
            }
        }
    }
    bar.finish_and_clear();
    publisher.finish().await?;

    shutdown.cancel();
    join(stages).await?;
    let rollouts: Vec<_> = [control.rollout.current(), control.query_rollout.current()].into_iter().flatten().collect();
    summary(&tally, events, &all_stats, warmup, &rollouts)
}

/// A rollout in one line: the candidate, where it stands, and why.
fn rollout_line(r: &Rollout) -> String {
    let how = match &r.phase {
        Phase::Running => format!("still running (shadow {:.0}%, canary {:.0}%)", r.shadow * 100.0, r.canary * 100.0),
        Phase::Promoted { figures, .. } => format!("promoted ({figures})"),
        Phase::RolledBack { gate, figures, .. } => format!("rolled back by {gate} ({figures})"),
        Phase::Aborted { by, .. } => format!("aborted by {by}"),
    };
    format!("{} version {} beside {}: {how}", r.model, r.candidate, r.serving)
}

fn summary(
    tally: &Tally,
    events: usize,
    stats: &Stats,
    warmup: Duration,
    rollouts: &[Arc<Rollout>],
) -> anyhow::Result<()> {
    let below = stats.writer.below_min_confidence.load(Ordering::Relaxed);
    let model_rows = stats.inferrer.model_rows.load(Ordering::Relaxed);
    let cache_hits = stats.inferrer.cache_hits.load(Ordering::Relaxed);
    let lost = (events as u64).saturating_sub(tally.accounted(below));
    let mut latencies: Vec<i64> = tally.predicted.values().map(|p| p.written_at_ms - p.requested_at_ms).collect();
    latencies.sort_unstable();
    let percentile = |q: f64| -> i64 {
        if latencies.is_empty() {
            return 0;
        }
        latencies[((latencies.len() - 1) as f64 * q).round() as usize]
    };
    // Keyed by each bucket's lower bound, so that they print in order.
    let mut sizes: BTreeMap<u32, (&str, u64)> = BTreeMap::new();
    for p in tally.predicted.values() {
        let (low, label) = match p.batch_size {
            0..=1 => (1, "1"),
            2..=7 => (2, "2-7"),
            8..=31 => (8, "8-31"),
            32..=63 => (32, "32-63"),
            64..=127 => (64, "64-127"),
            _ => (128, "128+"),
        };
        sizes.entry(low).or_insert((label, 0)).1 += 1;
    }

    let mut out = std::io::stdout().lock();
    writeln!(out, "\nSluice demo: embedded broker, four stages, models {}", model_name(tally))?;
    writeln!(out, "  events in:               {events}")?;
    writeln!(out, "  predictions out:         {}", tally.predicted.len())?;
    let intents_cached = tally.intents.values().filter(|q| q.cached).count();
    writeln!(out, "  query intents out:       {} ({intents_cached} from the cache)", tally.intents.len())?;
    let mut examples: Vec<&IntentRecord> = tally.intents.values().filter(|q| !q.cached).collect();
    examples.sort_by(|a, b| a.text.cmp(&b.text));
    examples.dedup_by(|a, b| a.text == b.text);
    for q in examples.iter().take(4) {
        writeln!(out, "    {:<52} -> {} ({:.2})", format!("{:?}", q.text), q.label, q.confidence)?;
    }
    writeln!(out, "  duplicate predictions:   {}", tally.duplicate_predictions)?;
    writeln!(out, "  below min_confidence:    {below} (counted, not saved)")?;
    writeln!(out, "  dead letters:            {}", tally.dead_sources.len())?;
    for (reason, n) in &tally.dead_letters {
        writeln!(out, "    {reason:<40} {n}")?;
    }
    writeln!(out, "  batch sizes (events by the size of the model batch that computed them):")?;
    for (bucket, n) in sizes.values() {
        writeln!(out, "    {bucket:<8} {n}")?;
    }
    writeln!(out, "  model rows computed:     {model_rows} (cache hits: {cache_hits})")?;
    // By the records' own clocks: first request in to last prediction written.
    let requested =
        tally.predicted.values().map(|p| p.requested_at_ms).chain(tally.intents.values().map(|q| q.requested_at_ms));
    let written =
        tally.predicted.values().map(|p| p.written_at_ms).chain(tally.intents.values().map(|q| q.written_at_ms));
    let (first, last) = (requested.min().unwrap_or(0), written.max().unwrap_or(0));
    let seconds = ((last - first) as f64 / 1e3).max(1e-3);
    writeln!(
        out,
        "  throughput:              {:.0} events/s ({events} in {seconds:.2} s, first request to last write)",
        events as f64 / seconds
    )?;
    writeln!(out, "  latency p50 / p99:       {} ms / {} ms (request to written)", percentile(0.5), percentile(0.99))?;
    writeln!(out, "  warm-up:                 {:.2} s (model load, warm-up batch, group joins)", warmup.as_secs_f64())?;
    for r in rollouts {
        writeln!(out, "  rollout:                 {}", rollout_line(r))?;
    }
    writeln!(out, "  lost:                    {lost}")?;
    anyhow::ensure!(lost == 0, "{lost} events were lost");
    Ok(())
}

fn model_name(tally: &Tally) -> String {
    let models =
        tally.predicted.values().map(|p| &p.model).take(1).chain(tally.intents.values().map(|q| &q.model).take(1));
    let names: Vec<String> = models.map(|m| format!("{} v{}", m.name, m.version)).collect();
    if names.is_empty() { "?".into() } else { names.join(", ") }
}
