//! The one typed configuration: built-in defaults (`default.toml`), then a
//! file, then `SLUICE_<SECTION>__<KEY>` environment variables, then flags.
//! Validated at start; every error names the key.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use figment::Figment;
use figment::providers::{Env, Format, Serialized, Toml};
use serde::{Deserialize, Serialize};
use sluice_control::cache::LruConfig;
use sluice_control::rollout::Rollout;
use sluice_control::{Settings, overrides};
use sluice_core::{ConfigError, Secret};
use sluice_kafka::admin::TopicSpec;
use sluice_kafka::{BatchPolicy, KafkaConfig};
use sluice_messages::envelope::WindowPrecision;
use sluice_model::{ModelConfig, ModelKind};
use sluice_postgres::PostgresConfig;
use sluice_stages::fetcher::SyntheticConfig;
use sluice_stages::inferrer::stock::admits;

const DEFAULTS: &str = include_str!("default.toml");

/// Everything a Sluice process needs to know.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SluiceConfig {
    pub kafka: KafkaConfig,
    pub topics: TopicsConfig,
    pub runtime: RuntimeConfig,
    pub fetcher: FetcherConfig,
    pub normalizer: NormalizerConfig,
    pub inferrer: InferrerConfig,
    pub writer: WriterConfig,
    pub postgres: PostgresConfig,
    pub control: ControlConfig,
    pub cache: CacheConfig,
    pub observe: ObserveConfig,
    pub lanes: LanesConfig,
}

/// Live before bulk: bulk work travels in twin topics and each stage serves
/// live first (docs/tuning.md, "Lanes").
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LanesConfig {
    /// Off: one lane, and `priority` in requests is accepted and ignored.
    pub enabled: bool,
    /// A topic's bulk twin is named `{topic}{bulk_suffix}`.
    pub bulk_suffix: String,
    /// While both lanes wait, one batch in this many is bulk; the model
    /// stages follow the live setting `bulk_share`.
    pub bulk_share: u64,
}

impl LanesConfig {
    /// The bulk twin of `topic`.
    pub fn twin(&self, topic: &str) -> String {
        sluice_kafka::lanes::twin(topic, &self.bulk_suffix)
    }
}

/// Where live overrides and the shared cache tier are kept.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ControlConfig {
    /// Empty: the embedded default (in-process overrides, LRU tier only).
    /// May hold a password: a [`Secret`], never printed.
    pub redis_url: Secret,
    pub prefix: String,
    pub pipeline: String,
    pub reconcile_ms: u64,
}

/// The prediction cache's defaults (overridable at run time).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct CacheConfig {
    pub enabled: bool,
    pub ttl_s: u64,
    pub lru: LruConfig,
}

/// Topic names and how to create them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TopicsConfig {
    /// Producers' JSON request events.
    pub requests: String,
    /// Envelopes from the fetcher.
    pub fetched: String,
    /// Envelopes from the normalizer: stock windows.
    pub normalized: String,
    /// Envelopes from the normalizer: query token ids (the query inferrer's input).
    pub tokenized: String,
    /// Envelopes from the inferrer (predictions not yet written).
    pub inferred: String,
    /// Envelopes of a rollout's candidate's shadow answers (docs/operations.md,
    /// "Model rollout"), never read by the writer.
    pub inferred_shadow: String,
    /// The JSON output topic.
    pub predictions: String,
    /// A rollout's shadow answers as JSON records, as `predictions` has them
    /// (the writer's `shadow-writer` consumer), never read by users' consumers
    /// of `predictions`.
    pub predictions_shadow: String,
    /// Dead letters from every stage.
    pub dead_letters: String,
    /// Partitions of every topic `sluice topics create` makes: the most
    /// replicas any stage can use.
    pub partitions: i32,
    pub replication: i32,
}

impl TopicsConfig {
    /// Every topic, for creation.
    pub fn specs(&self) -> Vec<TopicSpec> {
        self.names()
            .into_iter()
            .map(|(_, name)| TopicSpec {
                name: name.clone(),
                partitions: self.partitions,
                replication: self.replication,
            })
            .collect()
    }

    /// The topics that carry work between Sluice's own stages: with lanes,
    /// each has a bulk twin (`predictions` and `dead_letters` have none).
    pub fn laned(&self) -> [&String; 5] {
        [&self.requests, &self.fetched, &self.normalized, &self.tokenized, &self.inferred]
    }

    /// Every topic name with its key under `[topics]`.
    pub fn names(&self) -> [(&'static str, &String); 9] {
        [
            ("requests", &self.requests),
            ("fetched", &self.fetched),
            ("normalized", &self.normalized),
            ("tokenized", &self.tokenized),
            ("inferred", &self.inferred),
            ("inferred_shadow", &self.inferred_shadow),
            ("predictions", &self.predictions),
            ("predictions_shadow", &self.predictions_shadow),
            ("dead_letters", &self.dead_letters),
        ]
    }

    /// Every topic named `{prefix}.{key}` (for runs that must not meet others).
    pub fn prefixed(&self, prefix: &str) -> Self {
        let name = |key: &str| format!("{prefix}.{key}");
        Self {
            requests: name("requests"),
            fetched: name("fetched"),
            normalized: name("normalized"),
            tokenized: name("tokenized"),
            inferred: name("inferred"),
            inferred_shadow: name("inferred_shadow"),
            predictions: name("predictions"),
            predictions_shadow: name("predictions_shadow"),
            dead_letters: name("dead_letters"),
            ..self.clone()
        }
    }
}

/// Settings of the Kafka runtime shared by the stages.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuntimeConfig {
    /// How long a shutdown may spend finishing in-flight work. Keep it below
    /// the Kubernetes termination grace period.
    pub drain_timeout_ms: u64,
    /// Messages buffered between a stage's consumer and its batcher.
    pub queue_capacity: usize,
    /// Bytes of consumed messages a stage holds at most between its consumer
    /// and its producer (queued, batched, in process), whatever their count.
    pub queue_max_bytes: usize,
    /// Whether a stage is given the next batch, where it is already cut, to
    /// prepare while it processes the current one (the model stage decodes,
    /// looks up and lays out the next batch while the model runs).
    pub prepare_next_batch: bool,
    /// The time constant (ms) of the acknowledged rate behind
    /// `sluice_stage_drain_seconds` (lag ÷ rate).
    pub throughput_window_ms: u64,
    /// An assigned partition with lag and no offset stored for this long (ms)
    /// is reported stalled (gauge, log line, `/readyz`, alert).
    pub stall_after_ms: u64,
}

/// Where history comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    Synthetic,
    /// The `features` table (`[postgres]`).
    Postgres,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FetcherConfig {
    pub source: SourceKind,
    /// Larger requests are dead letters (`request_too_large`), never parsed.
    pub max_request_bytes: usize,
    pub batch: BatchPolicy,
    pub synthetic: SyntheticConfig,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NormalizerConfig {
    pub batch: BatchPolicy,
    /// Tokenize query events with the query model's tokenizer
    /// (`inferrer.query.model`); off: they are `unsupported_kind` dead letters.
    pub tokenize_queries: bool,
    /// Longer query texts (in UTF-8 bytes) are `text_too_long` dead letters.
    pub max_query_bytes: usize,
    /// The number format normalised windows travel in to the inferrer:
    /// `fp32`, or `bf16` / `fp16` (half the bytes through the broker) when
    /// the stock model computes in that precision anyway
    /// (`inferrer.model.precision`); otherwise refused unless
    /// `inferrer.model.accept_lossy_inputs = true`.
    pub window_precision: WindowPrecision,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct InferrerConfig {
    /// The kinds `sluice run inferrer` serves: each has its own consumer and
    /// batcher, so both can share a process, or each have a deployment.
    pub serve: Vec<ModelKind>,
    /// `max_batch_size` is the model batch; `max_wait_ms` bounds how long the
    /// oldest waiting event waits for a fuller batch.
    pub batch: BatchPolicy,
    /// Threads that decode one large batch (of at least 256 inputs) in parts
    /// at once, for both kinds; 1 decodes on the stage's own thread.
    pub decode_threads: usize,
    /// A stock event older than this (ms from its request; 0: no limit) is
    /// not computed on its first pass: a `deadline_exceeded` dead letter.
    /// The live `max_age_ms` of the stock model's scope.
    pub max_age_ms: u64,
    /// A p99 target (ms) from arrival at the stock model stage to the
    /// answer; 0: off, `batch` applies as it is. With it, `batch` gives the
    /// bounds the stage moves its batch size and wait within.
    pub latency_target_ms: u64,
    /// The stock model.
    pub model: ModelConfig,
    /// A rollout of the stock model this process starts by itself, where
    /// there is no Redis (with Redis: `sluice rollout start`).
    pub rollout: RolloutConfig,
    /// The query model, its batches and its token budget.
    pub query: QueryInferrerConfig,
}

/// A rollout started by the configuration, in a process without Redis: the
/// process's alone (docs/operations.md, "Model rollout"). The flags of
/// `sluice rollout start`, as keys.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutConfig {
    /// The candidate version (empty: no rollout); a number is taken as its digits.
    #[serde(deserialize_with = "sluice_model::version_name")]
    pub candidate: String,
    pub shadow: f64,
    pub canary: f64,
    pub schedule: Vec<f64>,
    pub step_every_s: u64,
    pub gates: sluice_control::rollout::Gates,
}

impl RolloutConfig {
    /// The rollout it starts beside `model`'s configured version, if any,
    /// checked (refused with the key at fault under `key`).
    pub fn rollout(&self, key: &str, name: &str, model: &ModelConfig) -> Result<Option<Rollout>, ConfigError> {
        if self.candidate.is_empty() {
            return Ok(None);
        }
        if !model.has_version(&self.candidate) {
            let message = format!("version {} is not installed under {}", self.candidate, model.dir.display());
            return Err(invalid(&format!("{key}.candidate"), message));
        }
        Rollout::new(
            name,
            &model.version,
            &self.candidate,
            self.shadow,
            self.canary,
            self.gates.clone(),
            self.schedule.clone(),
            self.step_every_s,
        )
        .map(Some)
        .map_err(|message| {
            let (field, why) = message.split_once(": ").unwrap_or(("candidate", message.as_str()));
            let field = if sluice_control::rollout::Gates::FIELDS.contains(&field) {
                format!("gates.{field}")
            } else {
                field.to_string()
            };
            invalid(&format!("{key}.{field}"), why.to_string())
        })
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QueryInferrerConfig {
    /// `max_batch_size` caps the rows of one model call.
    pub batch: BatchPolicy,
    /// Caps one model call's padded tokens (rows x its longest sequence).
    pub max_batch_tokens: usize,
    /// As `inferrer.max_age_ms`, for query events.
    pub max_age_ms: u64,
    /// As `inferrer.latency_target_ms`, for the query model stage.
    pub latency_target_ms: u64,
    pub model: ModelConfig,
    /// As `inferrer.rollout`, for the query model.
    pub rollout: RolloutConfig,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WriterConfig {
    pub batch: BatchPolicy,
    /// Predictions with a lower confidence are counted and dropped.
    pub min_confidence: f32,
    /// A JSON-lines file every saved prediction is appended to.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Also save predictions in PostgreSQL (`[postgres]`).
    pub postgres: bool,
}

/// Metrics, health and logs.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ObserveConfig {
    /// Address of the HTTP server for `/metrics`, `/healthz`, `/readyz`,
    /// `/status` (port 0: any free port, logged at start).
    pub listen: SocketAddr,
    pub log_format: LogFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogFormat {
    Text,
    Json,
}

fn invalid(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::new(key, message)
}

impl SluiceConfig {
    /// Defaults, then `file`, then the environment (`SLUICE_<SECTION>__<KEY>`),
    /// then `overrides` (flags). Every error names its key.
    pub fn load(file: Option<&Path>, overrides: &Figment) -> anyhow::Result<Self> {
        let mut figment = Figment::from(Toml::string(DEFAULTS));
        if let Some(file) = file {
            if !file.exists() {
                anyhow::bail!("config file {} does not exist", file.display());
            }
            figment = figment.merge(Toml::file(file));
        }
        // Only SLUICE_<SECTION>__<KEY> names: SLUICE_MODEL_DIR, SLUICE_CACHE and
        // the like are read elsewhere and are not configuration keys.
        figment = figment.merge(Env::prefixed("SLUICE_").filter(|k| k.as_str().contains("__")).split("__"));
        Self::extract(&figment.merge(overrides.clone())).map_err(|e| invalid_configuration(&e))
    }

    /// What a process would load from a configuration file's `text` and its
    /// environment `variables` (name, value), for checking deployment files:
    /// the same defaults, parsing and validation as [`SluiceConfig::load`].
    pub fn from_text(text: &str, variables: &[(String, String)]) -> Result<Self, Vec<ConfigError>> {
        let mut figment = Figment::from(Toml::string(DEFAULTS)).merge(Toml::string(text));
        for (name, value) in variables {
            let Some(key) = name.strip_prefix("SLUICE_").filter(|k| k.contains("__")) else { continue };
            let key = key.to_lowercase().replace("__", ".");
            // Parsed as figment parses an environment variable.
            let value: figment::value::Value = value.parse().unwrap_or_else(|e: std::convert::Infallible| match e {});
            figment = figment.merge(Serialized::default(&key, value));
        }
        Self::extract(&figment)
    }

    fn extract(figment: &Figment) -> Result<Self, Vec<ConfigError>> {
        let mut config: Self =
            figment.extract().map_err(|e| e.into_iter().map(|e| config_error(&e)).collect::<Vec<_>>())?;
        if config.inferrer.model.dir.as_os_str().is_empty() {
            config.inferrer.model.dir = default_model_dir("SLUICE_MODEL_DIR", "stock-lstm");
        }
        if config.inferrer.query.model.dir.as_os_str().is_empty() {
            config.inferrer.query.model.dir = default_model_dir("SLUICE_QUERY_MODEL_DIR", "query-intent");
        }
        // Warm up with at least a full batch: the first real one must not pay.
        let warmup = &mut config.inferrer.model.warmup_batch_size;
        *warmup = (*warmup).max(config.inferrer.batch.max_batch_size);
        let warmup = &mut config.inferrer.query.model.warmup_batch_size;
        *warmup = (*warmup).max(config.inferrer.query.batch.max_batch_size);
        config.validate().map_err(|e| vec![e])?;
        Ok(config)
    }

    /// Figment overrides from a value, for flags.
    pub fn flag(key: &str, value: impl Serialize) -> Figment {
        Figment::new().merge(Serialized::default(key, value))
    }

    /// Rules the types cannot express.
    /// Each model's configured rollout (`[inferrer.rollout]`, `[inferrer.query.rollout]`)
    /// with its key and the model it rolls out.
    pub fn rollouts(&self) -> [(&'static str, &RolloutConfig, &ModelConfig); 2] {
        [
            ("inferrer.rollout", &self.inferrer.rollout, &self.inferrer.model),
            ("inferrer.query.rollout", &self.inferrer.query.rollout, &self.inferrer.query.model),
        ]
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        // A setting that can also change live is checked against its one
        // declaration (sluice_control::overrides::FIELDS).
        let live = |name: &str| overrides::field(name).map(|f| f.bounds).expect("a declared live setting");
        let check = |key: &str, name: &str, value: u64| live(name).check_count(value).map_err(|m| invalid(key, m));
        for (key, policy) in [
            ("fetcher.batch", &self.fetcher.batch),
            ("normalizer.batch", &self.normalizer.batch),
            ("inferrer.batch", &self.inferrer.batch),
            ("inferrer.query.batch", &self.inferrer.query.batch),
            ("writer.batch", &self.writer.batch),
        ] {
            // The models' batch size may be left to the device (0).
            let by_device = key.starts_with("inferrer.") && policy.max_batch_size == 0;
            if !by_device {
                check(&format!("{key}.max_batch_size"), "max_batch_size", policy.max_batch_size as u64)?;
            }
            check(&format!("{key}.max_wait_ms"), "max_wait_ms", policy.max_wait_ms)?;
        }
        for (key, rollout, model) in self.rollouts() {
            if !rollout.candidate.is_empty() && !self.control.redis_url.is_empty() {
                return Err(invalid(
                    &format!("{key}.candidate"),
                    "with control.redis_url set, a rollout lives in Redis for every replica: start it with `sluice rollout start`",
                ));
            }
            rollout.rollout(key, "model", model)?;
        }
        for (key, model) in
            [("inferrer.model", &self.inferrer.model), ("inferrer.query.model", &self.inferrer.query.model)]
        {
            overrides::check_version_name(&model.version).map_err(|m| invalid(&format!("{key}.version"), m))?;
            // 0: half the cores.
            if model.intra_op_threads != 0 {
                check(&format!("{key}.intra_op_threads"), "intra_op_threads", model.intra_op_threads as u64)?;
            }
        }
        live("min_confidence")
            .check_ratio(self.writer.min_confidence)
            .map_err(|m| invalid("writer.min_confidence", m))?;
        check("cache.ttl_s", "cache_ttl_s", self.cache.ttl_s)?;
        check("inferrer.query.max_batch_tokens", "max_batch_tokens", self.inferrer.query.max_batch_tokens as u64)?;
        check("inferrer.max_age_ms", "max_age_ms", self.inferrer.max_age_ms)?;
        check("inferrer.query.max_age_ms", "max_age_ms", self.inferrer.query.max_age_ms)?;
        check("inferrer.latency_target_ms", "latency_target_ms", self.inferrer.latency_target_ms)?;
        check("inferrer.query.latency_target_ms", "latency_target_ms", self.inferrer.query.latency_target_ms)?;
        self.kafka.validate()?;
        let t = &self.topics;
        let names = t.names();
        for (i, (key, name)) in names.iter().enumerate() {
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                return Err(invalid(&format!("topics.{key}"), format!("{name:?} is not a valid topic name")));
            }
            if let Some((other, _)) = names[..i].iter().find(|(_, n)| n == name) {
                return Err(invalid(&format!("topics.{key}"), format!("{name:?} is also topics.{other}")));
            }
        }
        if self.lanes.enabled {
            let suffix = &self.lanes.bulk_suffix;
            if suffix.is_empty() || !suffix.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
                return Err(invalid(
                    "lanes.bulk_suffix",
                    format!("{suffix:?} cannot end a topic name (1 or more of A-Z a-z 0-9 . _ -)"),
                ));
            }
            for laned in t.laned() {
                let twin = self.lanes.twin(laned);
                if let Some((key, _)) = names.iter().find(|(_, n)| **n == twin) {
                    return Err(invalid(
                        "lanes.bulk_suffix",
                        format!("the bulk twin of {laned:?} would be topics.{key}"),
                    ));
                }
            }
        }
        check("lanes.bulk_share", "bulk_share", self.lanes.bulk_share)?;
        if t.partitions < 1 {
            return Err(invalid("topics.partitions", "must be at least 1"));
        }
        if t.replication < 1 {
            return Err(invalid("topics.replication", "must be at least 1"));
        }
        if !(1..=64).contains(&self.inferrer.decode_threads) {
            return Err(invalid("inferrer.decode_threads", "outside 1..=64"));
        }
        if self.runtime.drain_timeout_ms == 0 {
            return Err(invalid("runtime.drain_timeout_ms", "must be above 0"));
        }
        if !(1_000..=3_600_000).contains(&self.runtime.throughput_window_ms) {
            return Err(invalid("runtime.throughput_window_ms", "outside 1000..=3600000 (1 s to 1 h)"));
        }
        if !(5_000..=86_400_000).contains(&self.runtime.stall_after_ms) {
            return Err(invalid("runtime.stall_after_ms", "outside 5000..=86400000 (5 s to a day)"));
        }
        if self.runtime.queue_capacity == 0 {
            return Err(invalid("runtime.queue_capacity", "must be above 0"));
        }
        if !(1 << 20..=1 << 31).contains(&self.runtime.queue_max_bytes) {
            return Err(invalid("runtime.queue_max_bytes", "outside 1048576..=2147483648 (1 MiB to 2 GiB)"));
        }
        if !(1024..=64 << 20).contains(&self.fetcher.max_request_bytes) {
            return Err(invalid("fetcher.max_request_bytes", "outside 1024..=67108864 (1 KiB to 64 MiB)"));
        }
        let name_ok = |s: &str| !s.is_empty() && s.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c));
        if !name_ok(&self.control.prefix) {
            return Err(invalid("control.prefix", "not a key prefix (A-Z a-z 0-9 . _ -)"));
        }
        if !name_ok(&self.control.pipeline) {
            return Err(invalid("control.pipeline", "not a pipeline name (A-Z a-z 0-9 . _ -)"));
        }
        if !(50..=60_000).contains(&self.control.reconcile_ms) {
            return Err(invalid("control.reconcile_ms", "outside 50..=60000"));
        }
        if self.fetcher.source == SourceKind::Postgres || self.writer.postgres || !self.postgres.dsn.is_empty() {
            self.postgres.validate().map_err(|e| match e {
                sluice_postgres::PostgresError::Config(e) => e,
                other => invalid("postgres", other.to_string()),
            })?;
        }
        let url = self.control.redis_url.expose();
        if !(url.is_empty() || url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(invalid("control.redis_url", "must start with redis:// or rediss://"));
        }
        if self.cache.lru.max_entries == 0 {
            return Err(invalid("cache.lru.max_entries", "must be above 0"));
        }
        if self.cache.lru.max_bytes < 1024 {
            return Err(invalid("cache.lru.max_bytes", "must be at least 1024"));
        }
        if !(1..=1_048_576).contains(&self.normalizer.max_query_bytes) {
            return Err(invalid("normalizer.max_query_bytes", "outside 1..=1048576"));
        }
        let (window, model) = (self.normalizer.window_precision, &self.inferrer.model);
        if !admits(window, model) {
            return Err(invalid(
                "normalizer.window_precision",
                format!(
                    "{window:?} windows would round the inputs of a model computing in {:?} \
                     (inferrer.model.precision); set inferrer.model.accept_lossy_inputs = true to allow it",
                    model.precision
                )
                .to_lowercase(),
            ));
        }
        if self.inferrer.serve.is_empty() {
            return Err(invalid("inferrer.serve", "must name at least one kind (stock, query)"));
        }
        if self.fetcher.synthetic.universe == 0 || self.fetcher.synthetic.universe > 10_000 {
            return Err(invalid("fetcher.synthetic.universe", "must be within 1..=10000 (symbols S0000..S9999)"));
        }
        Ok(())
    }
}

impl SluiceConfig {
    /// The configuration as JSON, for `sluice config` and `/status`: every
    /// secret (DSN, Redis URL, librdkafka property values) shows as `<redacted>`.
    pub fn shown(&self) -> serde_json::Value {
        serde_json::to_value(self).unwrap_or_default()
    }

    /// Every topic `sluice topics create` makes: with lanes, the bulk twins too.
    pub fn topic_specs(&self) -> Vec<TopicSpec> {
        let mut specs = self.topics.specs();
        if self.lanes.enabled {
            let twins = self.topics.laned().map(|name| self.lanes.twin(name));
            let (partitions, replication) = (self.topics.partitions, self.topics.replication);
            specs.extend(twins.into_iter().map(|name| TopicSpec { name, partitions, replication }));
        }
        specs
    }

    /// The settings overrides can change, as configured (before any override).
    pub fn base_settings(&self) -> Settings {
        Settings {
            max_batch_size: self.inferrer.batch.max_batch_size,
            max_batch_tokens: self.inferrer.query.max_batch_tokens,
            max_wait_ms: self.inferrer.batch.max_wait_ms,
            min_confidence: self.writer.min_confidence,
            model_version: self.inferrer.model.version.clone(),
            cache_enabled: self.cache.enabled,
            cache_ttl_s: self.cache.ttl_s,
            intra_op_threads: self.inferrer.model.threads(),
            max_age_ms: self.inferrer.max_age_ms,
            latency_target_ms: self.inferrer.latency_target_ms,
            bulk_share: self.lanes.bulk_share,
        }
    }

    /// The query model's settings, as configured (before any override).
    pub fn query_base_settings(&self) -> Settings {
        let query = &self.inferrer.query;
        Settings {
            max_batch_size: query.batch.max_batch_size,
            max_wait_ms: query.batch.max_wait_ms,
            model_version: query.model.version.clone(),
            intra_op_threads: query.model.threads(),
            max_age_ms: query.max_age_ms,
            latency_target_ms: query.latency_target_ms,
            ..self.base_settings()
        }
    }
}

/// One of figment's errors as a [`ConfigError`] naming the dotted key.
fn config_error(e: &figment::Error) -> ConfigError {
    use figment::error::{Actual, Kind};
    let key = e.path.join(".");
    let what = |actual: &Actual| match actual {
        Actual::Str(_) | Actual::Char(_) => "string",
        Actual::Unsigned(_) | Actual::Signed(_) => "integer",
        Actual::Float(_) => "float",
        Actual::Bool(_) => "boolean",
        Actual::Seq => "array",
        Actual::Map => "table",
        _ => "another type",
    };
    match &e.kind {
        Kind::UnknownField(field, _) => {
            let key = if key.is_empty() { field.clone() } else { format!("{key}.{field}") };
            ConfigError::new(&key, format!("unknown key {key} (every key: crates/sluice-app/src/default.toml)"))
        }
        Kind::InvalidType(actual, expected) => {
            ConfigError::new(&key, format!("{key} has type {}, Sluice expects {expected}", what(actual)))
        }
        kind => ConfigError::new(&key, kind.to_string()),
    }
}

/// The errors of a configuration that cannot load, one per line.
fn invalid_configuration(errors: &[ConfigError]) -> anyhow::Error {
    let lines: Vec<String> = errors.iter().map(ToString::to_string).collect();
    anyhow::anyhow!("invalid configuration:\n  {}", lines.join("\n  "))
}

/// Where `make setup` exports the fixture model.
/// `$variable`, else `$SLUICE_CACHE/models/{name}`, else `~/.cache/sluice/models/{name}`
/// (where `make setup` exports the models).
fn default_model_dir(variable: &str, name: &str) -> PathBuf {
    if let Some(dir) = std::env::var_os(variable) {
        return dir.into();
    }
    let cache = std::env::var_os("SLUICE_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/sluice"));
    cache.join("models").join(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn load_with(toml: &str) -> anyhow::Result<SluiceConfig> {
        let dir = std::env::temp_dir().join(format!("sluice-config-{}-{}", std::process::id(), toml.len()));
        std::fs::write(&dir, toml)?;
        let result = SluiceConfig::load(Some(&dir), &Figment::new());
        std::fs::remove_file(&dir)?;
        result
    }

    #[test]
    fn defaults_are_valid() {
        let config = SluiceConfig::load(None, &Figment::new()).expect("defaults load");
        assert_eq!(config.inferrer.batch.max_batch_size, 0, "by device");
        assert_eq!(config.inferrer.model.warmup_batch_size, 64);
        assert!(!config.inferrer.model.dir.as_os_str().is_empty());
    }

    #[test]
    fn errors_name_the_key() {
        let e = load_with("[writer]\nbatch = { max_batch_size = 0, max_wait_ms = 5 }\n").expect_err("zero");
        assert!(e.to_string().contains("writer.batch.max_batch_size"), "{e}");
        let e = load_with("[inferrer]\nbatch = { max_batch_size = 70000, max_wait_ms = 5 }\n").expect_err("big");
        assert!(e.to_string().contains("inferrer.batch.max_batch_size"), "{e}");
        let e = load_with("[writer]\nmin_confidence = 1.5\n").expect_err("range");
        assert!(e.to_string().contains("writer.min_confidence"), "{e}");
        let e = load_with("[inferrer.batch]\nmax_batch_size = \"big\"\n").expect_err("type");
        assert!(e.to_string().contains("inferrer.batch.max_batch_size"), "{e}");
        let e = load_with("[kafka]\nbrokerz = \"x\"\n").expect_err("unknown");
        assert!(e.to_string().contains("brokerz"), "{e}");
        let e = load_with("[topics]\nfetched = \"sluice.requests\"\n").expect_err("duplicate");
        assert!(e.to_string().contains("topics.fetched"), "{e}");
        let e = load_with("[kafka.consumer_properties]\n\"enable.auto.commit\" = \"false\"\n").expect_err("reserved");
        assert!(e.to_string().contains("kafka.consumer_properties.enable.auto.commit"), "{e}");
        let e = load_with("[kafka]\nsession_timeout_ms = 10\n").expect_err("range");
        assert!(e.to_string().contains("kafka.session_timeout_ms"), "{e}");
        let e = load_with("[inferrer.query]\nmax_age_ms = 700000000\n").expect_err("range");
        assert!(e.to_string().contains("inferrer.query.max_age_ms"), "{e}");
        let e = load_with("[inferrer]\ndecode_threads = 0\n").expect_err("range");
        assert!(e.to_string().contains("inferrer.decode_threads"), "{e}");
    }

    #[test]
    fn half_precision_windows_need_a_model_in_that_precision_or_consent() {
        let e = load_with("[normalizer]\nwindow_precision = \"bf16\"\n").expect_err("bf16 windows, fp32 model");
        let message = e.to_string();
        assert!(message.contains("normalizer.window_precision") && message.contains("accept_lossy_inputs"), "{e}");
        let e = load_with("[normalizer]\nwindow_precision = \"fp16\"\n[inferrer.model]\nprecision = \"bf16\"\n")
            .expect_err("fp16 windows, bf16 model");
        assert!(e.to_string().contains("normalizer.window_precision"), "{e}");
        let same = load_with("[normalizer]\nwindow_precision = \"bf16\"\n[inferrer.model]\nprecision = \"bf16\"\n")
            .expect("bf16 windows for a bf16 model");
        assert_eq!(same.normalizer.window_precision, WindowPrecision::Bf16);
        load_with("[normalizer]\nwindow_precision = \"bf16\"\n[inferrer.model]\naccept_lossy_inputs = true\n")
            .expect("bf16 windows for an fp32 model, asked for");
        let e = load_with("[normalizer]\nwindow_precision = \"fp8\"\n").expect_err("unknown");
        assert!(e.to_string().contains("normalizer.window_precision"), "{e}");
    }

    #[test]
    #[allow(clippy::result_large_err, reason = "figment::Jail's closure returns figment's own error")]
    fn a_numeric_model_version_from_the_environment_or_a_file_is_a_version_name() {
        figment::Jail::expect_with(|jail| {
            jail.set_env("SLUICE_INFERRER__MODEL__VERSION", "2");
            jail.set_env("SLUICE_INFERRER__QUERY__MODEL__VERSION", "3");
            let config = SluiceConfig::load(None, &Figment::new()).map_err(|e| e.to_string())?;
            assert_eq!(
                (config.inferrer.model.version.as_str(), config.inferrer.query.model.version.as_str()),
                ("2", "3")
            );
            Ok(())
        });
        let config = load_with("[inferrer.model]\nversion = 7\n").expect("a number");
        assert_eq!(config.inferrer.model.version, "7");
        let e = load_with("[inferrer.model]\nversion = 1.5\n").expect_err("not a whole number");
        assert!(e.to_string().contains("inferrer.model.version"), "{e}");
    }

    #[test]
    fn flags_override_the_file() {
        let config = SluiceConfig::load(None, &SluiceConfig::flag("kafka.brokers", "10.0.0.1:9092")).expect("load");
        assert_eq!(config.kafka.brokers, "10.0.0.1:9092");
    }
}
