//! Local deployments for the integration tests and the benchmarks: a real
//! tansu broker process, the `sluice` binary as separate stage processes, a
//! private `redis-server`, the cached fixtures, and one reader each for HTTP
//! endpoints, Prometheus text and `/proc` (kafka-delta-ingest's
//! `tests/helpers`). [`TestPipeline`] starts a whole deployment in one call
//! and stops it on drop.
//!
//! Each test gets its own topics and consumer groups (a unique prefix), so
//! tests can share a machine; the heavy ones take [`heavy_test_lock`] so that
//! two of them do not fight over the two cores.

mod pipeline;
pub mod prometheus;

pub use pipeline::{Processes, TestPipeline};

use std::collections::HashMap;
use std::fs::File;
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

/// `$SLUICE_CACHE`, else `~/.cache/sluice`: where `make setup` put the venv,
/// the broker and the fixture model.
pub fn cache_dir() -> PathBuf {
    std::env::var_os("SLUICE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").expect("HOME is set")).join(".cache/sluice"))
}

/// The venv's Python (with torch), where `make setup` made it.
pub fn python() -> PathBuf {
    cache_dir().join("venv/bin/python")
}

/// The fixture model's directory.
pub fn model_dir() -> PathBuf {
    std::env::var_os("SLUICE_MODEL_DIR").map_or_else(|| cache_dir().join("models/stock-lstm"), PathBuf::from)
}

/// The query model's directory (exported by `make setup`).
pub fn query_model_dir() -> PathBuf {
    std::env::var_os("SLUICE_QUERY_MODEL_DIR").map_or_else(|| cache_dir().join("models/query-intent"), PathBuf::from)
}

/// The query model's `version`, on the CPU with one thread.
pub fn query_model_config(version: &str) -> sluice_model::ModelConfig {
    sluice_model::ModelConfig { dir: query_model_dir(), ..model_config(version) }
}

/// The fixture model's `version`, on the CPU with one thread.
pub fn model_config(version: &str) -> sluice_model::ModelConfig {
    sluice_model::ModelConfig {
        dir: model_dir(),
        version: version.into(),
        device: sluice_model::DeviceChoice::Cpu,
        intra_op_threads: 1,
        warmup_batch_size: 4,
        memory_budget_bytes: 0,
        autotune_p99_ms: 0,
        ..sluice_model::ModelConfig::default()
    }
}

/// The `sluice` binary of this build (`make test` builds it first).
pub fn sluice_bin() -> PathBuf {
    // Test binaries live in <target>/<profile>/deps/.
    let exe = std::env::current_exe().expect("current exe");
    let bin = exe.parent().and_then(Path::parent).expect("target/<profile>").join("sluice");
    assert!(
        bin.exists(),
        "{} is missing: run `cargo build --release --bin sluice` first (make test does)",
        bin.display()
    );
    bin
}

/// Serialises the tests that run whole pipelines.
pub fn heavy_test_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A name no other test run uses.
pub fn unique(name: &str) -> String {
    let nanos = SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").subsec_nanos();
    format!("{name}-{}-{nanos}", std::process::id())
}

/// A fresh temporary directory.
pub fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(unique(name));
    std::fs::create_dir_all(&dir).expect("temp dir");
    dir
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// A tansu broker process with in-memory storage, killed on drop.
#[derive(Debug)]
pub struct Broker {
    child: Child,
    pub addr: String,
}

impl Broker {
    pub fn start() -> Self {
        Self::start_advertising(None)
    }

    /// A broker that tells clients, in its metadata, to reach it at
    /// `advertised` (`host:port`) instead of where it listens: a proxy in front
    /// of it then carries every connection, not only the first.
    pub fn start_advertising(advertised: Option<&str>) -> Self {
        Self::try_start(advertised).unwrap_or_else(|e| panic!("{e}"))
    }

    /// [`Broker::start_advertising`], with the reason when it cannot start.
    pub fn try_start(advertised: Option<&str>) -> Result<Self, String> {
        let tansu = std::env::var_os("SLUICE_TANSU").map_or_else(|| cache_dir().join("bin/tansu"), PathBuf::from);
        if !tansu.exists() {
            return Err(format!("{} is missing: run `make setup`", tansu.display()));
        }
        let addr = format!("127.0.0.1:{}", free_port());
        let log = File::create(temp_dir("tansu").join("tansu.log")).map_err(|e| format!("tansu's log file: {e}"))?;
        let child = Command::new(&tansu)
            .args(["broker", "--listener-url", &format!("tcp://{addr}")])
            .args(["--advertised-listener-url", &format!("tcp://{}", advertised.unwrap_or(&addr))])
            .args(["--storage-engine", "memory://tansu/"])
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .map_err(|e| format!("starting {}: {e}", tansu.display()))?;
        let broker = Self { child, addr };
        let started = Instant::now();
        while TcpStream::connect(&broker.addr).is_err() {
            if started.elapsed() > Duration::from_secs(30) {
                return Err(format!("tansu did not listen on {} within 30 s", broker.addr));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(broker)
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (its in-memory topics are gone with it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Freezes the broker (SIGSTOP): connections stay open but nothing is
    /// answered, as with a broker that hangs or a network cut, and unlike a
    /// restart its in-memory data survives.
    pub fn pause(&self) {
        signal(self.child.id(), "STOP");
    }

    /// Lets a paused broker go on (SIGCONT).
    pub fn resume(&self) {
        signal(self.child.id(), "CONT");
    }
}

fn signal(pid: u32, signal: &str) {
    let status = Command::new("kill").arg(format!("-{signal}")).arg(pid.to_string()).status().expect("kill");
    assert!(status.success(), "kill -{signal} {pid}");
}

/// A process's resident memory now (`VmRSS`) and its peak so far (`VmHWM`),
/// in bytes, from `/proc/PID/status`; zeros when it cannot be read.
pub fn rss_bytes(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map_or(0, |kb| kb * 1024)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

/// A process's peak resident memory so far in bytes (`VmHWM`).
pub fn peak_rss_bytes(pid: u32) -> u64 {
    rss_bytes(pid).1
}

impl Drop for Broker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Writes a config file for one test: its own topics and groups on `brokers`.
pub fn write_config(dir: &Path, brokers: &str, prefix: &str, partitions: i32, extra: &str) -> PathBuf {
    let path = dir.join("sluice.toml");
    let text = format!(
        r#"[kafka]
brokers = "{brokers}"
group_prefix = "{prefix}"

[topics]
requests = "{prefix}.requests"
fetched = "{prefix}.fetched"
normalized = "{prefix}.normalized"
tokenized = "{prefix}.tokenized"
inferred = "{prefix}.inferred"
inferred_shadow = "{prefix}.inferred.shadow"
predictions = "{prefix}.predictions"
predictions_shadow = "{prefix}.predictions.shadow"
dead_letters = "{prefix}.dead-letters"
partitions = {partitions}

[inferrer.model]
dir = "{model}"

[inferrer.query.model]
dir = "{query_model}"

[observe]
listen = "127.0.0.1:0"

{extra}
"#,
        model = model_dir().display(),
        query_model = query_model_dir().display()
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `sluice <args>` to completion and returns its stdout, failing with its
/// output if it fails.
pub fn sluice(config: &Path, args: &[&str]) -> String {
    let output = Command::new(sluice_bin()).arg("--config").arg(config).args(args).output().expect("run sluice");
    assert!(
        output.status.success(),
        "sluice {args:?} failed: {}\n{}",
        output.status,
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// A `sluice run <stage>` process, logging to a file; killed on drop.
#[derive(Debug)]
pub struct StageProcess {
    child: Child,
    pub stage: String,
    pub log: PathBuf,
}

impl StageProcess {
    pub fn start(config: &Path, stage: &str, log_dir: &Path) -> Self {
        Self::command(config, &["run", stage], stage, log_dir)
    }

    /// `sluice <args>` as a long-running process named `name` in logs.
    pub fn command(config: &Path, args: &[&str], name: &str, log_dir: &Path) -> Self {
        Self::command_with_env(config, args, name, log_dir, &[])
    }

    /// [`StageProcess::command`] with extra environment variables.
    pub fn command_with_env(config: &Path, args: &[&str], name: &str, log_dir: &Path, env: &[(&str, &str)]) -> Self {
        let stage = name;
        let log = log_dir.join(format!("{stage}-{}.log", unique("run")));
        let file = File::create(&log).expect("log file");
        let child = Command::new(sluice_bin())
            .arg("--config")
            .arg(config)
            .args(args)
            .envs(env.iter().copied())
            .env("RUST_LOG", "info,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()
            .expect("start stage");
        Self { child, stage: stage.to_string(), log }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills it (its in-memory topics are gone with it).
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The stage's log so far.
    pub fn logs(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Waits until the log holds `count` lines containing `needle`.
    pub fn wait_for_log(&self, needle: &str, count: usize, timeout: Duration) {
        let started = Instant::now();
        while self.logs().lines().filter(|l| l.contains(needle)).count() < count {
            assert!(started.elapsed() < timeout, "{} never logged {count} x {needle:?}:\n{}", self.stage, self.logs());
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Sends `signal` (`TERM`, `KILL`, ...) to the process.
    pub fn signal(&self, name: &str) {
        signal(self.pid(), name);
    }

    /// Waits for the process to exit, at most `timeout`.
    pub fn wait(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let started = Instant::now();
        while started.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().expect("try_wait") {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Whether it is still running.
    pub fn running(&mut self) -> bool {
        self.child.try_wait().expect("try_wait").is_none()
    }
}

impl Drop for StageProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Redis every session has on 127.0.0.1:6379 (tests use their own prefix).
pub const LOCAL_REDIS: &str = "redis://127.0.0.1:6379";

/// A private `redis-server` on its own port, for outage tests; killed on drop.
#[derive(Debug)]
pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
}

impl RedisServer {
    pub fn start() -> Self {
        let mut server = Self { child: None, port: free_port() };
        server.restart();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// Kills the server (nothing is kept on disk: a restart starts empty).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it (again) on the same port and waits until it answers.
    pub fn restart(&mut self) {
        self.kill();
        let child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start redis-server");
        self.child = Some(child);
        let started = Instant::now();
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(started.elapsed() < Duration::from_secs(20), "redis-server did not listen on {}", self.port);
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// The (predicted_return, confidence) of every valid event under model
/// `version`, computed here with no Kafka, no batching policy and no stage:
/// synthetic window → z-score → model.
pub fn reference_predictions(
    events: &[sluice_stages::generate::GeneratedEvent],
    version: &str,
) -> HashMap<String, (f32, f32)> {
    use sluice_stages::fetcher::{SyntheticConfig, SyntheticSource, WindowRequest, WindowShape};
    use sluice_stages::generate::Expected;
    let model = sluice_torch::Model::load(&model_config(version)).expect("model");
    let metadata = model.metadata().clone();
    let shape = WindowShape { days: metadata.days(), features: metadata.features() };
    let source = SyntheticSource::new(SyntheticConfig::default());
    let normalizer =
        sluice_stages::Normalizer::new(metadata.normalization.as_ref().expect("stats"), metadata.days(), "unused");
    let (r, c) =
        (metadata.output_index("predicted_return").expect("r"), metadata.output_index("confidence").expect("c"));
    let valid: Vec<(&str, WindowRequest)> = events
        .iter()
        .filter_map(|e| match &e.expected {
            Expected::Prediction { symbol, as_of } => {
                Some((e.event_id.as_str(), WindowRequest { symbol: symbol.clone(), as_of: *as_of }))
            }
            Expected::DeadLetter { .. } | Expected::Intent { .. } => None,
        })
        .collect();
    let mut out = HashMap::new();
    for chunk in valid.chunks(200) {
        let mut input = Vec::with_capacity(chunk.len() * metadata.sample_len());
        for (_, request) in chunk {
            let values = source.window(request, shape).expect("window");
            let window = sluice_messages::envelope::StockWindow::new(
                &request.symbol,
                request.as_of,
                shape.days as u32,
                shape.features as u32,
                values,
            );
            input.extend(normalizer.normalize(&window).expect("normalise").values);
        }
        let y = model.forward(&sluice_model::Batch::Windows(input), chunk.len()).expect("forward");
        for ((id, _), row) in chunk.iter().zip(y.chunks(metadata.outputs.len())) {
            out.insert(id.to_string(), (row[r], row[c]));
        }
    }
    out
}

/// The PostgreSQL every session has on 127.0.0.1 (trust auth).
pub const LOCAL_POSTGRES: &str = "host=127.0.0.1 user=postgres dbname=test";

/// A schema name no other test run uses (PostgreSQL identifiers: a-z 0-9 _).
pub fn unique_schema(name: &str) -> String {
    unique(&format!("sluice_{name}")).replace('-', "_").to_lowercase()
}

/// The PostgreSQL sink's rows in a test's own schema, watched while a pipeline
/// writes them.
pub struct SinkRows {
    pub schema: String,
    /// A connection of the test's own (for statements of its own).
    pub client: deadpool_postgres::Object,
    pool: deadpool_postgres::Pool,
}

impl std::fmt::Debug for SinkRows {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SinkRows").field("schema", &self.schema).finish_non_exhaustive()
    }
}

impl SinkRows {
    /// Connects to [`LOCAL_POSTGRES`], for `schema` (created by `sluice db migrate`).
    pub async fn connect(schema: &str) -> Self {
        let config = sluice_postgres::PostgresConfig {
            dsn: LOCAL_POSTGRES.into(),
            schema: schema.to_string(),
            ..sluice_postgres::PostgresConfig::default()
        };
        let pool = config.pool().expect("pool");
        let client = pool.get().await.expect("client");
        Self { schema: schema.to_string(), client, pool }
    }

    /// (rows, distinct event ids) in `stock_predictions`.
    pub async fn count(&self) -> (usize, usize) {
        let sql = "SELECT count(*), count(DISTINCT event_id) FROM stock_predictions";
        let row = self.client.query_one(sql, &[]).await.expect("count");
        (row.get::<_, i64>(0) as usize, row.get::<_, i64>(1) as usize)
    }

    /// Drops the schema (call after the stages have stopped).
    pub async fn drop_schema(self) {
        let Self { schema, client, pool } = self;
        drop(client);
        let client = pool.get().await.expect("client");
        client.batch_execute(&format!("DROP SCHEMA {schema} CASCADE")).await.expect("drop schema");
    }
}

/// Live settings for tests that drive stages or the controller directly.
pub fn settings() -> sluice_control::Settings {
    sluice_control::Settings {
        max_batch_size: 64,
        max_batch_tokens: 8192,
        max_wait_ms: 5,
        min_confidence: 0.0,
        model_version: "1".into(),
        cache_enabled: true,
        cache_ttl_s: 60,
        intra_op_threads: 1,
        max_age_ms: 0,
        latency_target_ms: 0,
        bulk_share: 8,
    }
}

/// Writes one event per line to `dir/events.jsonl`, for `sluice produce --file`.
pub fn write_events<T: AsRef<[u8]>>(dir: &Path, lines: impl IntoIterator<Item = T>) -> PathBuf {
    let path = dir.join("events.jsonl");
    let mut text = Vec::new();
    for line in lines {
        text.extend_from_slice(line.as_ref());
        text.push(b'\n');
    }
    std::fs::write(&path, text).expect("events file");
    path
}

/// The four stages, each a `sluice run` process of its own.
pub fn start_stages(config: &Path, log_dir: &Path) -> Vec<StageProcess> {
    ["fetcher", "normalizer", "inferrer", "writer"].iter().map(|s| StageProcess::start(config, s, log_dir)).collect()
}

/// The last `lines` lines of a log, for failure messages.
pub fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Asks `GET path` on `port` every 100 ms until the answer satisfies `ok`
/// (code, body), at most `within`; panics with the last answer.
pub fn wait_for_http(port: u16, path: &str, within: Duration, ok: impl Fn(u16, &str) -> bool) -> (u16, String) {
    let started = Instant::now();
    loop {
        let answer = http_get(port, path);
        if let Some((code, body)) = &answer
            && ok(*code, body)
        {
            return (*code, body.clone());
        }
        assert!(started.elapsed() < within, "GET {path} on {port}: not as expected within {within:?}: {answer:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// `GET path` on a stage's `observe.listen` port: (status code, body), or
/// `None` while nothing answers.
pub fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    let text = http_response(port, path)?;
    let code = text.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default()))
}

/// The whole HTTP/1.0 response to `GET path` (status line, headers, body), or
/// `None` while nothing answers.
pub fn http_response(port: u16, path: &str) -> Option<String> {
    use std::io::{Read, Write};
    let mut stream = TcpStream::connect(("127.0.0.1", port)).ok()?;
    stream.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(stream, "GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").ok()?;
    let mut text = String::new();
    stream.read_to_string(&mut text).ok()?;
    Some(text)
}
