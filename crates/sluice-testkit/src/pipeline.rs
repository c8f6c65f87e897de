//! One call that starts a whole deployment for a test, and stops it on drop
//! (kafka-delta-ingest's `create_and_run_kdi`).

use std::path::PathBuf;
use std::sync::MutexGuard;

use sluice_kafka::KafkaConfig;
use sluice_kafka::client::TopicReader;

use crate::{
    Broker, StageProcess, heavy_test_lock, sluice, start_stages, tail, temp_dir, unique, write_config, write_events,
};

/// How a [`TestPipeline`]'s stages run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Processes {
    /// Each stage its own `sluice run <stage>` process.
    EachStage,
    /// All four in one `sluice pipeline` process.
    OneProcess,
    /// None yet: the test starts what it needs.
    None,
}

/// A tansu broker, a configuration of the test's own (its topics and groups
/// under a unique prefix), the topics created, and the stages running. Drop
/// kills every process; the heavy-test lock is held meanwhile.
#[derive(Debug)]
pub struct TestPipeline {
    pub broker: Broker,
    /// Where the configuration, the logs and any files of the test go.
    pub dir: PathBuf,
    /// The topics are `{prefix}.{name}`, the groups `{prefix}-{stage}`.
    pub prefix: String,
    pub config: PathBuf,
    /// A client configuration for the test's own producers and readers.
    pub kafka: KafkaConfig,
    pub stages: Vec<StageProcess>,
    _heavy: MutexGuard<'static, ()>,
}

impl TestPipeline {
    /// Starts it: `extra` is TOML appended to the configuration (see
    /// [`write_config`]), `partitions` those of every topic.
    pub fn start(name: &str, partitions: i32, extra: &str, processes: Processes) -> Self {
        let heavy = heavy_test_lock();
        let broker = Broker::start();
        let dir = temp_dir(name);
        let prefix = unique(name);
        let config = write_config(&dir, &broker.addr, &prefix, partitions, extra);
        sluice(&config, &["topics", "create"]);
        let stages = match processes {
            Processes::EachStage => start_stages(&config, &dir),
            Processes::OneProcess => vec![StageProcess::command(&config, &["pipeline"], "pipeline", &dir)],
            Processes::None => Vec::new(),
        };
        let kafka = KafkaConfig { brokers: broker.addr.clone(), ..KafkaConfig::default() };
        Self { broker, dir, prefix, config, kafka, stages, _heavy: heavy }
    }

    /// The topic named `name` in the configuration (`predictions`, `dead-letters`, ...).
    pub fn topic(&self, name: &str) -> String {
        format!("{}.{name}", self.prefix)
    }

    /// A reader of `topics` (by name) from their beginning, in a group of its own.
    pub fn reader(&self, topics: &[&str]) -> TopicReader {
        let topics: Vec<String> = topics.iter().map(|t| self.topic(t)).collect();
        let names: Vec<&str> = topics.iter().map(String::as_str).collect();
        TopicReader::new(&self.kafka, &unique("observer"), &names).expect("reader")
    }

    /// `sluice <args>` with this configuration, to completion.
    pub fn sluice(&self, args: &[&str]) -> String {
        sluice(&self.config, args)
    }

    /// Publishes `lines` (one JSON event each) with `sluice produce --file`,
    /// from a file in `subdir` of the test's directory.
    pub fn produce<T: AsRef<[u8]>>(&self, subdir: &str, lines: impl IntoIterator<Item = T>) {
        let dir = self.dir.join(subdir);
        std::fs::create_dir_all(&dir).expect("events dir");
        let file = write_events(&dir, lines);
        self.sluice(&["produce", "--file", file.to_str().expect("utf-8 path")]);
    }

    /// Starts `sluice run <stage>` again (after a kill), in place of the old one.
    pub fn restart(&mut self, index: usize) {
        let name = self.stages[index].stage.clone();
        self.stages[index] = StageProcess::start(&self.config, &name, &self.dir);
    }

    /// Each stage's last `lines` log lines, for failure messages.
    pub fn logs(&self, lines: usize) -> String {
        self.stages.iter().map(|s| format!("--- {}\n{}\n", s.stage, tail(&s.logs(), lines))).collect()
    }

    /// The test's directory.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}
