//! The load-ramp half of `sluice bench traffic`: the latency controller
//! against fixed batch sizes, from 10% of the inferrer's capacity to 120% and
//! back, with a burst in every level.
//!
//! The inferrer runs as a process on tansu, alone: normalised windows are
//! published into its input topic on a schedule (open loop: on time whatever
//! the inferrer does), and its answers are read from its output topic. The
//! capacity is first measured the same way, at the bounds' batch size, with
//! windows published as fast as the publisher goes: the answers per second
//! from the first answer to the last publish (the publisher and the broker's
//! intake share the cores with the inferrer, as in the ramp). The levels are
//! shares of it, each
//! `level_s` long, the middle fifth of each at [`BURST`] times its rate.
//! Each setting runs the same schedule on a fresh broker and inferrer: the
//! controller (with `latency_target_ms`, moving within the bounds), and fixed
//! batch sizes at the bounds' `max_wait_ms` (the largest is the bounds
//! themselves: the controller off). An event's latency is from its publish
//! to the inferrer's answer (`inferred_at_ms`), so the broker's hop in is
//! counted; an event belongs to the level it was published in, and a level's
//! throughput is the answers given during it.

use std::io::Write;
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use sluice_app::config::SluiceConfig;
use sluice_app::launch::StageKind;
use sluice_kafka::client::{Publisher, TopicReader};
use sluice_messages::codec;
use sluice_messages::envelope::{Envelope, Payload};

use crate::batching::{Line, Percentiles, machine, percentiles, plot, stage_env};
use crate::cluster::LocalCluster;
use crate::{inputs, write_section};

/// The ramp: each level's share of the capacity, in order.
pub const LEVELS: [f64; 9] = [0.1, 0.3, 0.6, 0.9, 1.2, 0.9, 0.6, 0.3, 0.1];
/// The middle fifth of every level runs at this many times its rate.
pub const BURST: f64 = 2.0;
/// Distinct windows published (in turn, each under a new event id).
const WINDOWS: usize = 2048;
/// Windows published as fast as the publisher goes to measure the capacity
/// (more than the inferrer answers while they are published).
const CAPACITY_EVENTS: usize = 30_000;

#[derive(Debug, Clone)]
pub struct Options {
    /// Seconds per level.
    pub level_s: f64,
    /// The controller's `latency_target_ms`: one controller run per target.
    pub targets_ms: Vec<u64>,
    /// The bounds: the configured `max_batch_size` and `max_wait_ms`.
    pub max_batch: usize,
    pub max_wait_ms: u64,
    /// Fixed batch sizes compared (the bounds' size is always among them).
    pub fixed: Vec<usize>,
    /// Runs per setting; per level, the median run (by p99) is reported.
    pub repeats: usize,
    /// The Markdown report (its `ramp` section); JSON and SVG beside it.
    pub out: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq)]
enum Setting {
    /// With this `latency_target_ms`.
    Controller(u64),
    Fixed(usize),
}

impl Setting {
    fn name(self, options: &Options) -> String {
        match self {
            Self::Controller(target) => format!("controller, target {target} ms"),
            Self::Fixed(size) if size == options.max_batch => format!("fixed {size} (controller off)"),
            Self::Fixed(size) => format!("fixed {size}"),
        }
    }
}

/// One level of one run.
#[derive(Debug, Clone, Serialize)]
struct Level {
    share: f64,
    /// Events published per second over the level (its burst included).
    offered_per_s: f64,
    latency_ms: Percentiles,
    /// Answers given during the level, per second.
    answered_per_s: f64,
    /// Mean rows per model call of the level's events.
    mean_batch: f64,
    /// The batch-size cap in force, sampled from the inferrer's gauge (mean).
    mean_cap: f64,
}

#[derive(Debug, Serialize)]
struct SettingReport {
    name: String,
    /// The controller's target, for a controller run.
    target_ms: Option<u64>,
    max_batch_size: usize,
    /// Per level, the median run by p99.
    levels: Vec<Level>,
    /// Per level, every run's p99 (ms).
    p99_runs_ms: Vec<Vec<f64>>,
}

/// One level: the best fixed setting against the controller with one target.
/// Throughput here is the answers per second during the level up to its
/// offered load (`served_per_s`): answers beyond it are an earlier level's
/// backlog, and a setting that built a larger one must not look faster.
#[derive(Debug, Serialize)]
struct Comparison {
    target_ms: u64,
    share: f64,
    /// The fixed setting with the highest throughput among those whose p99
    /// met the target, or the lowest p99 when none did.
    best_fixed: String,
    best_fixed_meets_target: bool,
    best_fixed_p99_ms: f64,
    best_fixed_served_per_s: f64,
    controller_p99_ms: f64,
    controller_served_per_s: f64,
    /// The controller's throughput over the best fixed setting's.
    throughput_ratio: f64,
    /// Where a fixed setting met the target: whether the controller did too.
    controller_meets_target: Option<bool>,
}

#[derive(Debug, Serialize)]
struct Report {
    measured_on: String,
    machine: String,
    options: String,
    /// The inferrer at the bounds' batch size while windows are published as
    /// fast as the publisher goes (answers/s; the median, then every run).
    capacity_per_s: f64,
    capacity_runs: Vec<f64>,
    settings: Vec<SettingReport>,
    comparison: Vec<Comparison>,
}

pub async fn ramp(config: &SluiceConfig, options: &Options) -> anyhow::Result<()> {
    anyhow::ensure!(options.level_s >= 1.0, "--ramp-level-s must be at least 1");
    anyhow::ensure!(
        options.targets_ms.iter().all(|t| *t > 0) && options.max_batch > 0,
        "--ramp-target-ms and --ramp-max-batch must be at least 1"
    );
    let repeats = options.repeats.max(1);
    let base: Vec<Envelope> =
        inputs(config, WINDOWS)?.iter().map(|i| codec::decode(&i.payload)).collect::<Result<_, _>>()?;
    let at_once = vec![(0.0, 0); CAPACITY_EVENTS];
    let mut capacity_runs = Vec::new();
    for repeat in 0..repeats {
        let driven = drive(config, options, Setting::Fixed(options.max_batch), &at_once, &base, repeat).await?;
        // While the publisher still runs: from the first answer to the last publish.
        let first = driven.got.iter().flatten().map(|(at, _)| *at).min().unwrap_or(0);
        let last = driven.sent_ms.last().copied().unwrap_or(first).max(first + 1);
        let answered = driven.got.iter().flatten().filter(|(at, _)| (first..=last).contains(at)).count();
        let per_s = answered as f64 / ((last - first) as f64 / 1000.0);
        tracing::info!(per_s, repeat, "ramp: the inferrer's capacity");
        capacity_runs.push(per_s);
    }
    let capacity = {
        let mut sorted = capacity_runs.clone();
        sorted.sort_by(f64::total_cmp);
        sorted[sorted.len() / 2]
    };
    let schedule = schedule(capacity, options.level_s);

    let mut fixed = options.fixed.clone();
    fixed.push(options.max_batch);
    fixed.sort_unstable();
    fixed.dedup();
    let settings: Vec<Setting> = options
        .targets_ms
        .iter()
        .map(|t| Setting::Controller(*t))
        .chain(fixed.into_iter().map(Setting::Fixed))
        .collect();
    let mut reports = Vec::new();
    for setting in settings {
        let mut runs = Vec::new();
        for repeat in 0..repeats {
            let driven = drive(config, options, setting, &schedule, &base, repeat).await?;
            let levels = driven.levels(&schedule, options.level_s);
            for (share, l) in LEVELS.iter().zip(&levels) {
                tracing::info!(
                    setting = setting.name(options),
                    repeat,
                    share,
                    p99 = l.latency_ms.p99,
                    per_s = l.answered_per_s,
                    cap = l.mean_cap,
                    "ramp level"
                );
            }
            runs.push(levels);
        }
        let p99_runs_ms: Vec<Vec<f64>> =
            (0..LEVELS.len()).map(|i| runs.iter().map(|r| r[i].latency_ms.p99).collect()).collect();
        let levels = (0..LEVELS.len())
            .map(|i| {
                let mut at: Vec<&Level> = runs.iter().map(|r| &r[i]).collect();
                at.sort_by(|a, b| a.latency_ms.p99.total_cmp(&b.latency_ms.p99));
                at[at.len() / 2].clone()
            })
            .collect();
        let (max_batch_size, target_ms) = match setting {
            Setting::Controller(target) => (options.max_batch, Some(target)),
            Setting::Fixed(size) => (size, None),
        };
        reports.push(SettingReport { name: setting.name(options), target_ms, max_batch_size, levels, p99_runs_ms });
    }
    let report = Report {
        measured_on: chrono::Utc::now().format("%Y-%m-%d").to_string(),
        machine: format!("{}, CPU only", machine()),
        options: format!(
            "--ramp-level-s {} --ramp-target-ms {} --ramp-max-batch {} --ramp-max-wait-ms {} --ramp-fixed {} --repeats {repeats}",
            options.level_s,
            options.targets_ms.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
            options.max_batch,
            options.max_wait_ms,
            options.fixed.iter().map(ToString::to_string).collect::<Vec<_>>().join(",")
        ),
        capacity_per_s: capacity,
        capacity_runs,
        comparison: compare(&reports),
        settings: reports,
    };
    let stem = options.out.with_file_name("traffic-ramp");
    std::fs::write(stem.with_extension("json"), serde_json::to_string_pretty(&report)? + "\n")?;
    std::fs::write(stem.with_extension("svg"), svg(&report))?;
    let section = markdown(&report, options);
    write_section(&options.out, "traffic-ramp", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}

/// When each event is published (seconds from the start) and its level.
fn schedule(capacity: f64, level_s: f64) -> Vec<(f64, usize)> {
    let mut at = Vec::new();
    for (level, share) in LEVELS.iter().enumerate() {
        let start = level as f64 * level_s;
        let rate = share * capacity;
        let segments = [
            (start, start + 0.4 * level_s, rate),
            (start + 0.4 * level_s, start + 0.6 * level_s, rate * BURST),
            (start + 0.6 * level_s, start + level_s, rate),
        ];
        for (from, to, rate) in segments {
            let n = (rate * (to - from)).round() as usize;
            at.extend((0..n).map(|k| (from + k as f64 / rate, level)));
        }
    }
    at
}

/// What one run of a schedule saw.
struct Driven {
    /// When the schedule started (Unix ms).
    zero_ms: i64,
    /// Per event of the schedule: when it was published (Unix ms).
    sent_ms: Vec<i64>,
    /// Per event: when the inferrer answered (Unix ms) and the rows of its call.
    got: Vec<Option<(i64, u32)>>,
    /// The inferrer's batch-size cap, sampled (Unix ms, cap).
    caps: Vec<(i64, f64)>,
}

/// One setting's run of `schedule` on a fresh broker and inferrer, until
/// every event is answered.
async fn drive(
    config: &SluiceConfig,
    options: &Options,
    setting: Setting,
    schedule: &[(f64, usize)],
    base: &[Envelope],
    repeat: usize,
) -> anyhow::Result<Driven> {
    let mut config = config.clone();
    let (size, tag) = match setting {
        Setting::Controller(target) => (options.max_batch, format!("c{target}")),
        Setting::Fixed(size) => (size, format!("f{size}")),
    };
    let run = format!("ramp{}{tag}n{}r{repeat}", std::process::id(), schedule.len());
    let mut cluster = LocalCluster::broker(&mut config, &run).await?;
    let mut env = stage_env(&config, size, options.max_wait_ms);
    if let Setting::Controller(target) = setting {
        env.push(("SLUICE_INFERRER__LATENCY_TARGET_MS".into(), target.to_string()));
    }
    cluster.start_stages(&config, &[StageKind::Inferrer], &env).await?;
    let reader = TopicReader::new(&config.kafka, &format!("{run}-observer"), &[&config.topics.inferred])?;
    let mut publisher = Publisher::new(&config.kafka, "bench-ramp")?;
    let topic = config.topics.normalized.clone();
    let prefix = format!("{run}-");
    // One event through first: the producer's id, the group's join.
    let warm = format!("{prefix}warm");
    publisher.send(&topic, Some(warm.as_bytes()), &stamped(&base[0], &warm, sluice_messages::now_ms())).await?;
    publisher.settle().await?;
    loop {
        let record =
            reader.next(Duration::from_secs(60)).await.ok_or_else(|| anyhow::anyhow!("no warm-up answer"))??;
        if codec::decode(&record.payload)?.event_id == warm {
            break;
        }
    }

    let started = tokio::time::Instant::now();
    let zero_ms = sluice_messages::now_ms();
    let publish = async {
        let mut sent_ms = Vec::with_capacity(schedule.len());
        for (seq, (at, _)) in schedule.iter().enumerate() {
            tokio::time::sleep_until(started + Duration::from_secs_f64(*at)).await;
            let id = format!("{prefix}{seq}");
            let now = sluice_messages::now_ms();
            sent_ms.push(now);
            publisher.send(&topic, Some(id.as_bytes()), &stamped(&base[seq % base.len()], &id, now)).await?;
        }
        publisher.settle().await?;
        anyhow::Ok(sent_ms)
    };
    let answers = async {
        let mut got: Vec<Option<(i64, u32)>> = vec![None; schedule.len()];
        let mut caps: Vec<(i64, f64)> = Vec::new();
        let mut n = 0;
        let (mut sampled, mut answered) = (tokio::time::Instant::now(), tokio::time::Instant::now());
        while n < schedule.len() {
            if sampled.elapsed() >= Duration::from_millis(250) {
                sampled = tokio::time::Instant::now();
                caps.push((sluice_messages::now_ms(), cluster.metric(StageKind::Inferrer, "sluice_batch_max_size")));
            }
            let Some(record) = reader.next(Duration::from_millis(100)).await else {
                anyhow::ensure!(
                    answered.elapsed() < Duration::from_secs(120),
                    "answers stopped at {n} of {}",
                    schedule.len()
                );
                continue;
            };
            let envelope = codec::decode(&record?.payload)?;
            let Payload::Prediction(p) = envelope.payload else {
                anyhow::bail!("not a prediction on {}", config.topics.inferred)
            };
            let Some(seq) = envelope.event_id.strip_prefix(&prefix).and_then(|s| s.parse::<usize>().ok()) else {
                continue;
            };
            if got[seq].replace((p.inferred_at_ms, p.batch_size)).is_none() {
                n += 1;
                answered = tokio::time::Instant::now();
            }
        }
        anyhow::Ok((got, caps))
    };
    let (sent_ms, answers) = tokio::join!(publish, answers);
    cluster.check_running("the ramp")?;
    let (sent_ms, (got, caps)) = (sent_ms?, answers?);
    Ok(Driven { zero_ms, sent_ms, got, caps })
}

impl Driven {
    /// Per level of `schedule` (`level_s` each): what its events saw.
    fn levels(&self, schedule: &[(f64, usize)], level_s: f64) -> Vec<Level> {
        let Self { zero_ms, sent_ms, got, caps } = self;
        let level_ms = (level_s * 1000.0) as i64;
        let window = |level: usize| (zero_ms + level as i64 * level_ms, zero_ms + (level as i64 + 1) * level_ms);
        (0..LEVELS.len())
            .map(|level| {
                let (from, to) = window(level);
                let ours: Vec<usize> = (0..schedule.len()).filter(|&s| schedule[s].1 == level).collect();
                let latency = ours.iter().filter_map(|&s| got[s].map(|(at, _)| (at - sent_ms[s]) as f64)).collect();
                let batches: Vec<f64> = ours.iter().filter_map(|&s| got[s].map(|(_, b)| f64::from(b))).collect();
                let answered = got.iter().flatten().filter(|(at, _)| (from..to).contains(at)).count();
                let capped: Vec<f64> = caps.iter().filter(|(at, _)| (from..to).contains(at)).map(|(_, c)| *c).collect();
                let mean = |v: &[f64]| if v.is_empty() { 0.0 } else { v.iter().sum::<f64>() / v.len() as f64 };
                Level {
                    share: LEVELS[level],
                    offered_per_s: ours.len() as f64 / level_s,
                    latency_ms: percentiles(latency),
                    answered_per_s: answered as f64 / level_s,
                    mean_batch: mean(&batches),
                    mean_cap: mean(&capped),
                }
            })
            .collect()
    }
}

/// `base` under event id `id`, as if requested at `now` (ms), encoded.
fn stamped(base: &Envelope, id: &str, now: i64) -> Vec<u8> {
    let mut envelope = base.clone();
    (envelope.requested_at_ms, envelope.updated_at_ms) = (now, now);
    envelope.event_id = id.to_string();
    codec::encode(&envelope)
}

/// Per level and controller run: the best fixed setting (the highest
/// throughput among those that met the controller's target, or the lowest p99
/// when none did) against the controller.
fn compare(settings: &[SettingReport]) -> Vec<Comparison> {
    let fixed: Vec<&SettingReport> = settings.iter().filter(|s| s.target_ms.is_none()).collect();
    let served = |l: &Level| l.answered_per_s.min(l.offered_per_s);
    let mut out = Vec::new();
    for controller in settings {
        let Some(target_ms) = controller.target_ms else { continue };
        let target = target_ms as f64;
        for (i, share) in LEVELS.iter().enumerate() {
            let meets = |s: &&&SettingReport| s.levels[i].latency_ms.p99 <= target;
            let any_meets = fixed.iter().any(|s| meets(&s));
            let best = if any_meets {
                fixed.iter().filter(meets).max_by(|a, b| served(&a.levels[i]).total_cmp(&served(&b.levels[i])))
            } else {
                fixed.iter().min_by(|a, b| a.levels[i].latency_ms.p99.total_cmp(&b.levels[i].latency_ms.p99))
            };
            let Some(best) = best else { continue };
            let (b, c) = (&best.levels[i], &controller.levels[i]);
            out.push(Comparison {
                target_ms,
                share: *share,
                best_fixed: best.name.clone(),
                best_fixed_meets_target: any_meets,
                best_fixed_p99_ms: b.latency_ms.p99,
                best_fixed_served_per_s: served(b),
                controller_p99_ms: c.latency_ms.p99,
                controller_served_per_s: served(c),
                throughput_ratio: served(c) / served(b).max(1e-9),
                controller_meets_target: any_meets.then_some(c.latency_ms.p99 <= target),
            });
        }
    }
    out
}

fn markdown(report: &Report, options: &Options) -> String {
    let mut head = String::from("| setting |");
    let mut rule = String::from("|---|");
    for share in LEVELS {
        head.push_str(&format!(" {:.0}% |", share * 100.0));
        rule.push_str("---:|");
    }
    let table = |value: &dyn Fn(&Level) -> String| {
        let mut t = format!("{head}\n{rule}\n");
        for s in &report.settings {
            let cells: Vec<String> = s.levels.iter().map(value).collect();
            t.push_str(&format!("| {} | {} |\n", s.name, cells.join(" | ")));
        }
        t
    };
    let offered: Vec<String> = report
        .settings
        .first()
        .map(|s| s.levels.iter().map(|l| format!("{:.0}", l.offered_per_s)).collect())
        .unwrap_or_default();
    let p99 = table(&|l| format!("{:.0}", l.latency_ms.p99));
    let per_s = table(&|l| format!("{:.0}", l.answered_per_s));
    let caps = table(&|l| format!("{:.0} / {:.0}", l.mean_batch, l.mean_cap));
    let mut verdict = String::from(
        "| target | level | best fixed setting | its p99 (ms) | its served/s | controller p99 (ms) | controller served/s | controller ÷ best | p99 held |\n\
         |---:|---:|---|---:|---:|---:|---:|---:|---|\n",
    );
    for c in &report.comparison {
        verdict.push_str(&format!(
            "| {} ms | {:.0}% | {}{} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {} |\n",
            c.target_ms,
            c.share * 100.0,
            c.best_fixed,
            if c.best_fixed_meets_target { "" } else { " (none met the target: the lowest p99)" },
            c.best_fixed_p99_ms,
            c.best_fixed_served_per_s,
            c.controller_p99_ms,
            c.controller_served_per_s,
            c.throughput_ratio,
            match c.controller_meets_target {
                Some(true) => "yes",
                Some(false) => "**no**",
                None => "–",
            }
        ));
    }
    let capacity_runs: Vec<String> = report.capacity_runs.iter().map(|r| format!("{r:.0}")).collect();
    format!(
        "## The latency controller on a load ramp\n\n\
         Command: `cargo run --release --bin sluice -- bench traffic --only ramp {opts}` (measured on {when}:\n\
         {machine}; tansu broker and the inferrer alone as a process; the stock LSTM, cache off).\n\
         The inferrer's capacity at batch {max_batch}, with {capacity_events} windows published as fast as the\n\
         publisher goes: **{cap:.0} answers/s** from the first answer to the last publish (runs: {capacity_runs};\n\
         the publisher and the broker's intake share the cores, as in the ramp).\n\
         Windows are published on a fixed schedule into its input topic: {levels} levels of {level_s} s at\n\
         10%, 30%, 60%, 90%, 120%, 90%, 60%, 30% and 10% of that capacity, the middle fifth of each at\n\
         {burst}× its rate. Every setting runs the same schedule on a fresh broker and inferrer: the\n\
         controller with `latency_target_ms` of {targets} ms, inside the bounds `max_batch_size = {max_batch}`,\n\
         `max_wait_ms = {wait}`, and fixed batch sizes at that `max_wait_ms` (the bounds themselves are\n\
         the controller off). Latency is from each window's publish to the inferrer's answer\n\
         (`inferred_at_ms`: the broker's hop in included); an event counts in the level it was published\n\
         in, a level's throughput is the answers given during it. Per level, the median run of {repeats}\n\
         (by p99); every run in the JSON beside this file; plot: [traffic-ramp.svg](traffic-ramp.svg).\n\n\
         Offered load (events/s): {offered}.\n\n\
         p99 latency (ms) by level:\n\n{p99}\n\
         Answers per second during each level:\n\n{per_s}\n\
         Mean rows per model call / mean batch-size cap in force:\n\n{caps}\n\
         Against the best fixed setting at each level, for each target (the target: p99 under it wherever a\n\
         fixed setting met it, and throughput within 10%). Throughput here is a level's answers per second\n\
         up to its offered load (served/s): answers beyond it are an earlier level's backlog, which must\n\
         not make a setting that built a larger one look faster. Where no fixed setting met the target,\n\
         the best is the one with the lowest p99.\n\n{verdict}",
        opts = report.options,
        when = report.measured_on,
        machine = report.machine,
        max_batch = options.max_batch,
        cap = report.capacity_per_s,
        capacity_runs = capacity_runs.join(", "),
        capacity_events = CAPACITY_EVENTS,
        levels = LEVELS.len(),
        level_s = options.level_s,
        burst = BURST,
        targets = options.targets_ms.iter().map(ToString::to_string).collect::<Vec<_>>().join(" and "),
        wait = options.max_wait_ms,
        repeats = options.repeats.max(1),
        offered = offered.join(", "),
    )
}

/// p99 by level (log10 of ms: it spans three decades), one line per
/// setting, with the targets.
fn svg(report: &Report) -> String {
    const COLOURS: [&str; 7] = ["#d62728", "#1f77b4", "#2ca02c", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f"];
    let mut lines: Vec<Line> = report
        .settings
        .iter()
        .enumerate()
        .map(|(i, s)| {
            let points = s
                .levels
                .iter()
                .zip(&s.p99_runs_ms)
                .enumerate()
                .map(|(x, (l, runs))| {
                    let lo = runs.iter().copied().fold(f64::MAX, f64::min);
                    let hi = runs.iter().copied().fold(f64::MIN, f64::max);
                    let log = |ms: f64| ms.max(1.0).log10();
                    (x as f64, log(l.latency_ms.p99), log(lo.min(l.latency_ms.p99)), log(hi.max(l.latency_ms.p99)))
                })
                .collect();
            (s.name.as_str(), COLOURS[i % COLOURS.len()], points)
        })
        .collect();
    let names: Vec<String> =
        report.settings.iter().filter_map(|s| s.target_ms).map(|t| format!("target {t} ms")).collect();
    for (name, target) in names.iter().zip(report.settings.iter().filter_map(|s| s.target_ms)) {
        let y = (target as f64).log10();
        lines.push((name.as_str(), "#444444", (0..LEVELS.len()).map(|x| (x as f64, y, y, y)).collect()));
    }
    plot("p99 by load level", "load (share of capacity)", "p99 (log10 ms: 2 is 100 ms)", &lines, |x| {
        LEVELS.get(x as usize).map_or_else(String::new, |s| format!("{:.0}%", s * 100.0))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_schedule_follows_the_levels_and_their_bursts() {
        let at = schedule(1000.0, 2.0);
        // Each level: 0.8 of its time at its rate, 0.2 at twice it.
        let expected: usize = LEVELS.iter().map(|s| (s * 1000.0 * 2.0 * 1.2).round() as usize).sum();
        assert!((at.len() as i64 - expected as i64).abs() <= 3 * LEVELS.len() as i64, "{} vs {expected}", at.len());
        assert!(at.windows(2).all(|w| w[0].0 <= w[1].0), "in time order");
        let at_120: Vec<f64> = at.iter().filter(|(_, l)| *l == 4).map(|(t, _)| *t).collect();
        assert!(at_120.iter().all(|t| (8.0..10.0).contains(t)));
        let in_burst = at_120.iter().filter(|t| (8.8..9.2).contains(*t)).count();
        assert!((in_burst as f64 - 1200.0 * 2.0 * 0.4).abs() < 5.0, "{in_burst}");
    }
}
