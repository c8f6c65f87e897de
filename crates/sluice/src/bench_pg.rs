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
use sluice_stages::fetcher::SyntheticSource;

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

/// Sum of a Prometheus series over the lines that match `stage`.
fn metric(body: &str, name: &str, stage: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(name) && l.contains(&format!("stage=\"{stage}\"")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

pub async fn postgres(
    mut config: SluiceConfig,
    symbols: usize,
    days: usize,
    out: &std::path::Path,
) -> anyhow::Result<()> {
    anyhow::ensure!(!config.postgres.dsn.is_empty(), "configuration key `postgres.dsn` must be set for this benchmark");
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

    // The job: one event per stock, as of the last seeded day.
    let client = pool.get().await?;
    let mut publisher = Publisher::new(&config.kafka, "bench")?;
    let t0 = Instant::now();
    for s in 0..symbols {
        let symbol = SyntheticSource::symbol(s);
        let json = format!(r#"{{"kind":"stock","event_id":"{run}-{s}","symbol":"{symbol}","as_of":"{end}"}}"#);
        publisher.send(&config.topics.requests, Some(symbol.as_bytes()), json.as_bytes()).await?;
    }
    publisher.finish().await?;
    let published = t0.elapsed().as_secs_f64();
    let mut written = 0i64;
    while written < symbols as i64 {
        anyhow::ensure!(t0.elapsed() < Duration::from_secs(600), "only {written} rows after 600 s");
        written = client.query_one("SELECT count(*) FROM stock_predictions", &[]).await?.get(0);
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let wall = t0.elapsed().as_secs_f64();

    let mut table = String::from(
        "| stage | busy in `process` (s) | batches | mean batch | mean wait for the cut (ms) |\n|---|---:|---:|---:|---:|\n",
    );
    for (kind, port) in &ports {
        let body = http_get(*port, "/metrics").map(|(_, b)| b).unwrap_or_default();
        let name = kind.name();
        let busy = metric(&body, "sluice_stage_process_seconds_sum", name);
        let batches = metric(&body, "sluice_stage_process_seconds_count", name);
        let events = metric(&body, "sluice_stage_batch_size_sum", name);
        let wait = metric(&body, "sluice_stage_batch_wait_seconds_sum", name);
        let per = |x: f64| if batches > 0.0 { x / batches } else { 0.0 };
        table.push_str(&format!(
            "| {name} | {busy:.2} | {batches:.0} | {:.1} | {:.1} |\n",
            per(events),
            per(wait) * 1e3
        ));
    }
    drop(children);
    client.batch_execute(&format!("DROP SCHEMA {} CASCADE", config.postgres.schema)).await?;

    let verdict = if wall < 2.0 { "met" } else { "not met" };
    let section = format!(
        "## The 5,000-stock job: PostgreSQL in, PostgreSQL out\n\n\
         Command: `cargo run --release --bin sluice -- bench postgres --symbols {symbols} --days {days}` with\n\
         `SLUICE_POSTGRES__DSN` set (measured on {when}: this 2-core machine, CPU only; tansu\n\
         broker, PostgreSQL 15 and the four stages as separate processes on the same two cores).\n\
         Seeding {rows} rows ({symbols} symbols × {days} trading days, COPY): {seed_seconds:.1} s.\n\n\
         | measure | value |\n|---|---:|\n\
         | events | {symbols} |\n\
         | publishing all events | {published:.2} s |\n\
         | wall time, first event published to {symbols}th row in `stock_predictions` | **{wall:.2} s** |\n\
         | throughput | {:.0} events/s |\n\
         | target (under 2 s) | {verdict} |\n\n\
         Time by stage (each process's own metrics; stages overlap, so the busy\n\
         times add up to more than the wall time when the pipeline streams):\n\n{table}\n\
         The users' own figures for the same job: about 62 s on CPU, 24 s on GPU.\n",
        symbols as f64 / wall,
        when = chrono::Utc::now().format("%Y-%m-%d"),
    );
    write_section(out, "postgres", &section)?;
    writeln!(std::io::stdout(), "{section}")?;
    Ok(())
}
