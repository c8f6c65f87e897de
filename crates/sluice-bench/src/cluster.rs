//! A local deployment for the benchmarks: a tansu broker and `sluice run`
//! stages as separate processes, as in production, with what the benchmarks
//! read from them (metrics, CPU time by thread). The broker, the HTTP,
//! metrics and memory readers are the test kit's.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::Context;
use sluice_app::config::SluiceConfig;
use sluice_app::launch::StageKind;
use sluice_kafka::admin::create_topics;
use sluice_testkit::{Broker, prometheus};
pub use sluice_testkit::{free_port, http_get, rss_bytes};

/// The broker and the stages; every process is killed when this is dropped,
/// whatever happens to the benchmark.
#[derive(Debug)]
pub struct LocalCluster {
    pub broker: Broker,
    /// (name, process) of each stage, by its name.
    pub stages: Vec<(String, Child)>,
    /// Each stage's `observe.listen` port.
    pub ports: Vec<(StageKind, u16)>,
    pub brokers: String,
    /// Topic and group prefix of this run.
    pub run: String,
    /// Where each stage's log goes (`{stage}.log`), to say why one exited.
    pub logs: std::path::PathBuf,
}

impl Drop for LocalCluster {
    fn drop(&mut self) {
        for (_, child) in &mut self.stages {
            let _ = child.kill();
            let _ = child.wait();
        }
        let _ = std::fs::remove_dir_all(&self.logs);
    }
}

impl LocalCluster {
    /// Starts a tansu broker (memory storage) and creates the run's topics;
    /// `config` is pointed at both.
    pub async fn broker(config: &mut SluiceConfig, run: &str) -> anyhow::Result<Self> {
        let broker = Broker::try_start(None).map_err(anyhow::Error::msg)?;
        let brokers = broker.addr.clone();
        config.kafka.brokers = brokers.clone();
        config.topics = config.topics.prefixed(run);
        create_topics(&config.kafka, &config.topic_specs()).await?;
        let logs = sluice_testkit::temp_dir(&format!("bench-{run}"));
        Ok(Self { broker, stages: Vec::new(), ports: Vec::new(), brokers, run: run.to_string(), logs })
    }

    /// Every process of the cluster, (name, pid): `tansu` first, then the stages.
    pub fn processes(&self) -> Vec<(String, u32)> {
        std::iter::once(("tansu".to_string(), self.broker.pid()))
            .chain(self.stages.iter().map(|(name, child)| (name.clone(), child.id())))
            .collect()
    }

    /// An error if a stage has exited, with the end of its log.
    pub fn check_running(&mut self, while_doing: &str) -> anyhow::Result<()> {
        for (name, child) in &mut self.stages {
            if let Some(status) = child.try_wait()? {
                let path = self.logs.join(format!("{name}.log"));
                let log = std::fs::read_to_string(&path).unwrap_or_default();
                // Kept: the cluster's folder goes when it is dropped.
                let kept = std::env::temp_dir().join(format!("sluice-bench-{}-{name}.log", self.run));
                let _ = std::fs::copy(&path, &kept);
                anyhow::bail!(
                    "{name} exited ({status}) while {while_doing}; its log ({}) ends:\n{}",
                    kept.display(),
                    sluice_testkit::tail(&log, 20)
                );
            }
        }
        Ok(())
    }

    /// Starts `kinds` as `sluice run` processes on this broker and topics, with
    /// `env` (`SLUICE_…` settings) on top, and waits until all are ready.
    pub async fn start_stages(
        &mut self,
        config: &SluiceConfig,
        kinds: &[StageKind],
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        for kind in kinds {
            let port = free_port();
            let child = self.spawn(config, *kind, port, env)?;
            self.stages.push((kind.name().into(), child));
            self.ports.push((*kind, port));
        }
        self.until_ready().await
    }

    /// Kills (`kill -9`) the process of `kind` and starts it again at once, on
    /// the same port, with `env` on top; returns without waiting for it.
    pub fn kill_and_restart(
        &mut self,
        config: &SluiceConfig,
        kind: StageKind,
        env: &[(String, String)],
    ) -> anyhow::Result<()> {
        let port = self.ports.iter().find(|(k, _)| *k == kind).map(|(_, p)| *p).context("no such stage")?;
        let fresh = self.spawn(config, kind, port, env)?;
        let (_, child) = self.stages.iter_mut().find(|(n, _)| n == kind.name()).context("no such stage")?;
        child.kill()?;
        child.wait()?;
        *child = fresh;
        Ok(())
    }

    fn spawn(
        &self,
        config: &SluiceConfig,
        kind: StageKind,
        port: u16,
        env: &[(String, String)],
    ) -> anyhow::Result<Child> {
        let mut command = Command::new(std::env::current_exe()?);
        command
            .args(["run", kind.name()])
            .env("SLUICE_KAFKA__BROKERS", &self.brokers)
            .env("SLUICE_KAFKA__GROUP_PREFIX", &self.run)
            .env("SLUICE_OBSERVE__LISTEN", format!("127.0.0.1:{port}"))
            .env("SLUICE_LANES__ENABLED", config.lanes.enabled.to_string())
            .env("RUST_LOG", "warn")
            // An error's message, not a backtrace, ends the log of a stage that exits.
            .env("RUST_BACKTRACE", "0")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(self.logs.join(format!("{}.log", kind.name())))?);
        for (key, name) in config.topics.names() {
            command.env(format!("SLUICE_TOPICS__{}", key.to_uppercase()), name);
        }
        command.envs(env.iter().map(|(k, v)| (k, v)));
        Ok(command.spawn()?)
    }

    /// Waits until every stage answers `/readyz` with 200.
    pub async fn until_ready(&mut self) -> anyhow::Result<()> {
        let started = Instant::now();
        while !self.ports.iter().all(|(_, port)| http_get(*port, "/readyz").is_some_and(|(code, _)| code == 200)) {
            anyhow::ensure!(started.elapsed() < Duration::from_secs(120), "the stages did not become ready");
            self.check_running("starting")?;
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// The sum of a Prometheus series over every stage process of `kind`.
    pub fn metric(&self, kind: StageKind, series: &str) -> f64 {
        self.ports
            .iter()
            .filter(|(k, _)| *k == kind)
            .filter_map(|(_, port)| http_get(*port, "/metrics"))
            .map(|(_, body)| prometheus::sum(&body, series, &[("stage", kind.name())]))
            .sum()
    }
}

/// CPU time a process (all its threads) has used so far, from `/proc/PID/stat`
/// (Linux; utime + stime in USER_HZ ticks, 100 per second).
pub fn cpu_seconds(pid: u32) -> f64 {
    stat_cpu(&std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default()).1
}

/// The command name and CPU seconds (utime + stime) of a process's or a
/// thread's `stat` line; ("", 0) when it cannot be read.
fn stat_cpu(stat: &str) -> (&str, f64) {
    // The command name may hold spaces: fields are counted after its closing parenthesis.
    let Some((head, rest)) = stat.rsplit_once(')') else { return ("", 0.0) };
    let name = head.split_once('(').map_or("", |(_, name)| name);
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
    (name, (ticks(11) + ticks(12)) / 100.0)
}

/// CPU seconds used so far by a process, split by what its threads do.
#[derive(Debug, Clone, Copy, Default)]
pub struct ThreadCpu {
    /// The Kafka client: librdkafka's own threads (`rdk:*`) and rust-rdkafka's
    /// producer poller.
    pub kafka: f64,
    /// The model thread (`sluice-model`), where libtorch runs.
    pub model: f64,
    /// How long the model thread was ready to run but waited for a core
    /// (the kernel's run-queue time, `/proc/PID/task/TID/schedstat`).
    pub model_waiting: f64,
    /// Everything else: the async runtime (decoding, encoding, the stage's
    /// own work, metrics). Taken as the process total less the two above, so
    /// that threads that have exited are still counted.
    pub other: f64,
}

/// [`ThreadCpu`] from `/proc/PID/task/*/stat`; zeros when it cannot be read.
pub fn thread_cpu_seconds(pid: u32) -> ThreadCpu {
    let (mut kafka, mut model, mut model_waiting) = (0.0, 0.0, 0.0);
    let tasks = std::fs::read_dir(format!("/proc/{pid}/task")).into_iter().flatten().flatten();
    for task in tasks {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let (name, seconds) = stat_cpu(&stat);
        if name.starts_with("rdk:") || name.starts_with("producer poll") {
            kafka += seconds;
        } else if name == "sluice-model" {
            model += seconds;
            // "time on a core, time waiting on the run queue, slices", in ns.
            let schedstat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
            let waited = schedstat.split_whitespace().nth(1).and_then(|ns| ns.parse::<f64>().ok());
            model_waiting += waited.unwrap_or(0.0) / 1e9;
        }
    }
    ThreadCpu { kafka, model, model_waiting, other: (cpu_seconds(pid) - kafka - model).max(0.0) }
}

/// CPU time used so far by every PostgreSQL server process (the postmaster's
/// children include the stages' pooled backends).
pub fn postgres_cpu_seconds() -> f64 {
    let Ok(entries) = std::fs::read_dir("/proc") else { return 0.0 };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "postgres"))
        .map(cpu_seconds)
        .sum()
}

/// Whole-machine CPU time (all cores) from `/proc/stat`, in USER_HZ ticks of 10 ms.
pub fn machine_cpu_seconds() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let Some(cpu) = stat.lines().next() else { return 0.0 };
    // user nice system idle iowait irq softirq steal: all but idle and iowait are busy.
    let fields: Vec<f64> = cpu.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
    let busy: f64 = fields.iter().take(8).enumerate().filter(|(i, _)| *i != 3 && *i != 4).map(|(_, v)| v).sum();
    busy / 100.0
}
