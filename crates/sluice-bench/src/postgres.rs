//! `sluice bench postgres`: the users' 5,000-stock job end to end. Seeds
//! history, starts a tansu broker and the four stages as separate processes
//! (fetcher from PostgreSQL, writer to PostgreSQL), publishes one event per
//! stock, and times until the last row is in `stock_predictions`, with the time
//! split by stage from each process's own metrics.

use std::io::Write;
use std::time::{Duration, Instant};

use chrono::NaiveDate;
use sluice_app::config::SluiceConfig;
use sluice_app::launch::StageKind;
use sluice_kafka::client::Publisher;
use sluice_stages::fetcher::{SyntheticSource, trading_days_back};

use crate::cluster::{LocalCluster, cpu_seconds, http_get, machine_cpu_seconds, postgres_cpu_seconds};
use crate::write_section;

/// One timed run of the job.
struct Run {
    published: f64,
    /// Seconds to the first row, and to 25%, 50% and 75% of them.
    milestones: [f64; 4],
    wall: f64,
    used: Snapshot,
}

/// Cumulative CPU and stage metrics; the difference of two is what a run used.
struct Snapshot {
    /// (process name, CPU seconds): the broker and the four stages.
    cpu: Vec<(String, f64)>,
    postgres_cpu: f64,
    machine_cpu: f64,
    /// (stage, busy seconds, batches, events, seconds waited for the cut).
    stages: Vec<(&'static str, [f64; 4])>,
}

impl Snapshot {
    fn take(cluster: &LocalCluster) -> Self {
        let stages = cluster
            .ports
            .iter()
            .map(|(kind, port)| {
                let body = http_get(*port, "/metrics").map(|(_, b)| b).unwrap_or_default();
                let name = kind.name();
                (
                    name,
                    [
                        "sluice_stage_process_seconds_sum",
                        "sluice_stage_process_seconds_count",
                        "sluice_stage_batch_size_sum",
                        "sluice_stage_batch_wait_seconds_sum",
                    ]
                    .map(|series| sluice_testkit::prometheus::sum(&body, series, &[("stage", name)])),
                )
            })
            .collect();
        Self {
            cpu: cluster.processes().into_iter().map(|(name, pid)| (name, cpu_seconds(pid))).collect(),
            postgres_cpu: postgres_cpu_seconds(),
            machine_cpu: machine_cpu_seconds(),
            stages,
        }
    }

    fn minus(self, before: &Self) -> Self {
        Self {
            cpu: self.cpu.into_iter().zip(&before.cpu).map(|((name, after), (_, b))| (name, after - b)).collect(),
            postgres_cpu: self.postgres_cpu - before.postgres_cpu,
            machine_cpu: self.machine_cpu - before.machine_cpu,
            stages: self
                .stages
                .into_iter()
                .zip(&before.stages)
                .map(|((name, after), (_, b))| (name, std::array::from_fn(|i| after[i] - b[i])))
                .collect(),
        }
    }

    fn cpu_of(&self, name: &str) -> f64 {
        self.cpu.iter().find(|(n, _)| n == name).map_or(0.0, |(_, s)| *s)
    }

    /// The Markdown table of where the time went.
    fn table(&self, wall: f64) -> String {
        let mut table = String::from(
            "| stage | CPU (s) | busy in `process` (s) | batches | mean batch | mean wait for the cut (ms) |\n\
             |---|---:|---:|---:|---:|---:|\n",
        );
        for (name, [busy, batches, events, wait]) in &self.stages {
            let per = |x: f64| if *batches > 0.0 { x / batches } else { 0.0 };
            table.push_str(&format!(
                "| {name} | {:.2} | {busy:.2} | {batches:.0} | {:.1} | {:.1} |\n",
                self.cpu_of(name),
                per(*events),
                per(*wait) * 1e3
            ));
        }
        let others = self.machine_cpu - self.postgres_cpu - self.cpu.iter().map(|(_, s)| s).sum::<f64>();
        table.push_str(&format!(
            "| tansu broker | {:.2} | | | | |\n| PostgreSQL server | {:.2} | | | | |\n\
             | everything else (this benchmark's publisher and poller, the OS) | {others:.2} | | | | |\n\
             | **machine, all cores** | **{:.2}** of {:.2} available | | | | |\n",
            self.cpu_of("tansu"),
            self.postgres_cpu,
            self.machine_cpu,
            wall * std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
        ));
        table
    }
}

pub async fn postgres(
    mut config: SluiceConfig,
    symbols: usize,
    days: usize,
    runs: usize,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.postgres.dsn.is_empty(), "configuration key `postgres.dsn` must be set for this benchmark");
    anyhow::ensure!(runs >= 1, "--runs must be at least 1");
    anyhow::ensure!(
        days >= 30 + runs,
        "--days must leave a 30-day window for each of the {runs} run(s) and the warm-up"
    );
    let run = format!("bench{}", std::process::id());
    config.postgres.schema = format!("sluice_{run}");
    let end = NaiveDate::from_ymd_opt(2024, 12, 31).expect("a date");

    // History.
    let pool = config.postgres.pool()?;
    sluice_postgres::migrate::migrate(&pool, &config.postgres.schema).await?;
    let seeding = Instant::now();
    let model = &config.inferrer.model;
    let features = sluice_model::ModelMetadata::load(&model.version_dir(&model.version))?.features();
    let rows =
        sluice_postgres::seed::seed(&pool, symbols, days, end, features, config.fetcher.synthetic.history).await?;
    let seed_seconds = seeding.elapsed().as_secs_f64();

    // Broker and stages, each a process of its own.
    let mut cluster = LocalCluster::broker(&mut config, &run).await?;
    let env = [
        ("SLUICE_FETCHER__SOURCE", "postgres"),
        ("SLUICE_WRITER__POSTGRES", "true"),
        ("SLUICE_POSTGRES__DSN", config.postgres.dsn.expose()),
        ("SLUICE_POSTGRES__SCHEMA", config.postgres.schema.as_str()),
    ]
    .map(|(k, v)| (k.to_string(), v.to_string()));
    cluster.start_stages(&config, &StageKind::ALL, &env).await?;
    let started = Instant::now();

    // A warm pipeline, as in production: one event goes all the way through
    // first, so that no one-off start-up cost is timed (the publisher's
    // idempotent producer id alone takes about 0.5 s with librdkafka). Each run
    // and the warm-up are as of a day of their own: no run hits the cache.
    let mut as_of = trading_days_back(end, NaiveDate::MIN, runs + 1);
    let warmup_day = as_of.pop().expect("runs + 1 days");
    let client = pool.get().await?;
    let mut publisher = Publisher::new(&config.kafka, "bench")?;
    let json = format!(r#"{{"kind":"stock","event_id":"{run}-warmup","symbol":"S0000","as_of":"{warmup_day}"}}"#);
    publisher.send(&config.topics.requests, Some(b"S0000"), json.as_bytes()).await?;
    publisher.settle().await?;
    while client.query_one("SELECT count(*) FROM stock_predictions", &[]).await?.get::<_, i64>(0) == 0 {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(180), "the warm-up event never reached the database");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }

    let mut results = Vec::with_capacity(runs);
    for (r, day) in as_of.iter().enumerate() {
        tracing::info!(run = r + 1, symbols, "publishing the job");
        let before = Snapshot::take(&cluster);
        let t0 = Instant::now();
        for s in 0..symbols {
            let symbol = SyntheticSource::symbol(s);
            let json = format!(r#"{{"kind":"stock","event_id":"{run}-{r}-{s}","symbol":"{symbol}","as_of":"{day}"}}"#);
            publisher.send(&config.topics.requests, Some(symbol.as_bytes()), json.as_bytes()).await?;
        }
        publisher.settle().await?;
        let published = t0.elapsed().as_secs_f64();
        let mut written = 0i64;
        // When the first row, then a quarter, half and three quarters of them, were seen.
        let mut milestones = [0.0; 4];
        let marks = [1, symbols.div_ceil(4), symbols.div_ceil(2), (symbols * 3).div_ceil(4)];
        while written < symbols as i64 {
            anyhow::ensure!(t0.elapsed() < Duration::from_secs(600), "only {written} rows after 600 s");
            written = client.query_one("SELECT count(*) FROM stock_predictions WHERE as_of = $1", &[day]).await?.get(0);
            for (at, mark) in milestones.iter_mut().zip(marks) {
                if *at == 0.0 && written >= mark as i64 {
                    *at = t0.elapsed().as_secs_f64();
                }
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let wall = t0.elapsed().as_secs_f64();
        results.push(Run { published, milestones, wall, used: Snapshot::take(&cluster).minus(&before) });
    }
    drop(publisher);
    drop(cluster);
    client.batch_execute(&format!("DROP SCHEMA {} CASCADE", config.postgres.schema)).await?;

    let mut order: Vec<usize> = (0..results.len()).collect();
    order.sort_by(|a, b| results[*a].wall.total_cmp(&results[*b].wall));
    let median = &results[order[order.len() / 2]];
    let walls = results.iter().map(|r| format!("{:.2} s", r.wall)).collect::<Vec<_>>().join(", ");
    let verdict = if median.wall < 2.0 { "met" } else { "not met" };
    let [first, quarter, half, three_quarters] = median.milestones;
    let section = format!(
        "## The 5,000-stock job: PostgreSQL in, PostgreSQL out\n\n\
         Command: `cargo run --release --bin sluice -- bench postgres --symbols {symbols} --days {days} --runs {runs}`\n\
         with `SLUICE_POSTGRES__DSN` set (measured on {when}: this 2-core machine, CPU only; tansu\n\
         broker, PostgreSQL 15 and the four stages as separate processes on the same two cores).\n\
         Seeding {rows} rows ({symbols} symbols × {days} trading days, COPY): {seed_seconds:.1} s.\n\
         The pipeline is warm, as in production: one warm-up event goes all the way through before\n\
         the clock starts (librdkafka's idempotent producer alone takes about 0.5 s to get its id).\n\
         The job then runs {runs} times, each as of another day (no run is a cache hit of another);\n\
         the median run is shown.\n\n\
         | measure (median run) | value |\n|---|---:|\n\
         | events | {symbols} |\n\
         | publishing all events | {published:.2} s |\n\
         | first row in `stock_predictions` | {first:.2} s |\n\
         | 25% / 50% / 75% of the rows | {quarter:.2} / {half:.2} / {three_quarters:.2} s |\n\
         | wall time, first event published to {symbols}th row in `stock_predictions` | **{wall:.2} s** |\n\
         | throughput | {:.0} events/s |\n\
         | every run's wall time | {walls} |\n\
         | target (under 2 s) | {verdict} |\n\n\
         Time by stage and process over the median run. CPU is each process's own\n\
         CPU time (`/proc/PID/stat`; PostgreSQL: all its server processes); busy\n\
         is the time inside the stage's `process` (its metrics), which includes waiting\n\
         on PostgreSQL or the model thread. Stages overlap, so busy times add up to\n\
         more than the wall time when the pipeline streams:\n\n{table}\n\
         The users' own figures for the same job: about 62 s on CPU, 24 s on GPU.\n",
        symbols as f64 / median.wall,
        published = median.published,
        wall = median.wall,
        table = median.used.table(median.wall),
        when = chrono::Utc::now().format("%Y-%m-%d"),
    );
    write_section(out, "postgres", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}
