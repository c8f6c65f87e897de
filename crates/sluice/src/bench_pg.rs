//! `sluice bench postgres`: the users' 5,000-stock job end to end. Seeds
//! history, starts a tansu broker and the four stages as separate processes
//! (fetcher from PostgreSQL, writer to PostgreSQL), publishes one event per
//! stock, and times until the last row is in `stock_predictions`, with the time
//! split by stage from each process's own metrics.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::NaiveDate;
use sluice_kafka::admin::create_topics;
use sluice_kafka::client::Publisher;
use sluice_stages::fetcher::{SyntheticSource, trading_days_back};

use crate::bench::write_section;
use crate::config::SluiceConfig;
use crate::launch::StageKind;

/// Children killed when dropped, whatever happens to the benchmark.
struct Children(Vec<(String, Child)>);

impl Drop for Children {
    fn drop(&mut self) {
        for (_, child) in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// A minimal HTTP GET (status code and body), to read a stage's endpoints.
fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// CPU time a process (all its threads) has used so far, from `/proc/PID/stat`
/// (Linux; utime + stime in USER_HZ ticks, 100 per second).
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let fields: Vec<&str> = stat.rsplit_once(')').map_or("", |(_, rest)| rest).split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (ticks(11) + ticks(12)) / 100.0
}

/// CPU time used so far by every PostgreSQL server process (the postmaster's
/// children include the stages' pooled backends).
fn postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(cpu_seconds)
        .sum()
}

/// Whole-machine CPU time (all cores) from `/proc/stat`, in USER_HZ ticks of 10 ms.
fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else { return 0.0 };
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let fields: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let busy: f64 = fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    busy / 100.0
}

/// Sum of a Prometheus series over the lines that match `stage`.
fn metric(body: &str, name: &str, stage: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("stage=\"{stage}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

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
    fn take(children: &Children, ports: &[(StageKind, u16)]) -> Self {
        let stages = ports
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
                    .map(|series| metric(&body, series, name)),
                )
            })
            .collect();
        Self {
            cpu: children.0.iter().map(|(name, c)| (name.clone(), cpu_seconds(c.id()))).collect(),
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
    let tansu = std::env::var_os("SLUICE_TANSU")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sluice/bin/tansu"));
    let run = format!("bench{}", std::process::id());
    config.postgres.schema = format!("sluice_{run}");
    let end = NaiveDate::from_ymd_opt(2024, 12, 31).expect("a date");

    // History.
    let pool = config.postgres.pool()?;
    sluice_postgres::migrate::migrate(&pool, &config.postgres.schema).await?;
    let seeding = Instant::now();
    let model = &config.inferrer.model;
    let features = sluice_model::ModelMetadata::load(&model.version_dir(&model.version))?.features();
    let rows = sluice_postgres::seed::seed(&pool, symbols, days, end, features).await?;
    let seed_seconds = seeding.elapsed().as_secs_f64();

    // Broker and stages, each a process of its own.
    let broker_port = free_port()?;
    let brokers = format!("127.0.0.1:{broker_port}");
    let mut children = Children(Vec::new());
    let broker = Command::new(&tansu)
        .args(["broker", "--listener-url", &format!("tcp://{brokers}")])
        .args(["--advertised-listener-url", &format!("tcp://{brokers}")])
        .args(["--storage-engine", "memory://tansu/"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .with_context(|| format!("starting {}", tansu.display()))?;
    children.0.push(("tansu".into(), broker));
    let started = Instant::now();
    while TcpStream::connect(&brokers).is_err() {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(30), "tansu did not start");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    config.kafka.brokers = brokers.clone();
    config.topics = config.topics.prefixed(&run);
    create_topics(&config.kafka, &config.topics.specs()).await?;
    let exe = std::env::current_exe()?;
    let mut ports = Vec::new();
    for kind in StageKind::ALL {
        let port = free_port()?;
        let mut command = Command::new(&exe);
        command
            .args(["run", kind.name()])
            .env("SLUICE_KAFKA__BROKERS", &brokers)
            .env("SLUICE_KAFKA__GROUP_PREFIX", &run)
            .env("SLUICE_FETCHER__SOURCE", "postgres")
            .env("SLUICE_WRITER__POSTGRES", "true")
            .env("SLUICE_POSTGRES__DSN", &config.postgres.dsn)
            .env("SLUICE_POSTGRES__SCHEMA", &config.postgres.schema)
            .env("SLUICE_OBSERVE__LISTEN", format!("127.0.0.1:{port}"))
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        for (key, name) in config.topics.names() {
            command.env(format!("SLUICE_TOPICS__{}", key.to_uppercase()), name);
        }
        children.0.push((kind.name().into(), command.spawn()?));
        ports.push((kind, port));
    }
    let started = Instant::now();
    while !ports.iter().all(|(_, port)| http_get(*port, "/readyz").is_some_and(|(code, _)| code == 200)) {
        anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "the stages did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

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
        let before = Snapshot::take(&children, &ports);
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
        results.push(Run { published, milestones, wall, used: Snapshot::take(&children, &ports).minus(&before) });
    }
    drop(publisher);
    drop(children);
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
