//! How to reach the brokers, and the librdkafka properties we rely on.

use std::collections::BTreeMap;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use sluice_core::{ConfigError, Secret};

/// Broker connection settings shared by every stage of a process.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `host:port[,host:port...]`.
    pub brokers: String,
    /// Consumer groups are `{group_prefix}-{stage}`: one group per stage, so any
    /// stage can run as many replicas as its input topic has partitions.
    pub group_prefix: String,
    /// librdkafka `session.timeout.ms`. tansu makes a first group join wait for
    /// half of it, hence the short default.
    pub session_timeout_ms: u32,
    /// A name this member keeps across restarts (a pod's name): static group
    /// membership (`group.instance.id`). A member restarted under the same
    /// name takes its partitions back at once instead of waiting for the
    /// dead one's session to expire; empty: dynamic membership.
    pub instance_id: String,
    /// Extra librdkafka properties for every client (security settings:
    /// `security.protocol`, `sasl.*`, `ssl.*`). Values may hold passwords:
    /// [`Secret`]s, never printed.
    pub properties: BTreeMap<String, Secret>,
    /// Extra properties for consumers only.
    pub consumer_properties: BTreeMap<String, Secret>,
    /// Extra properties for producers only.
    pub producer_properties: BTreeMap<String, Secret>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            group_prefix: "sluice".into(),
            session_timeout_ms: 6000,
            instance_id: String::new(),
            properties: BTreeMap::new(),
            consumer_properties: BTreeMap::new(),
            producer_properties: BTreeMap::new(),
        }
    }
}

/// librdkafka properties the delivery guarantee depends on: refused in the
/// pass-through maps.
pub const RESERVED_PROPERTIES: [&str; 8] = [
    "enable.auto.offset.store",
    "enable.auto.commit",
    "group.id",
    "enable.idempotence",
    "acks",
    "bootstrap.servers",
    "auto.offset.reset",
    // kafka.instance_id sets it, validated.
    "group.instance.id",
];

impl KafkaConfig {
    /// Checks what serde cannot; the error names the key.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.brokers.trim().is_empty() {
            return Err(ConfigError::new("kafka.brokers", "empty"));
        }
        if !(1000..=300_000).contains(&self.session_timeout_ms) {
            return Err(ConfigError::new(
                "kafka.session_timeout_ms",
                format!("{} is outside 1000..=300000", self.session_timeout_ms),
            ));
        }
        let id = &self.instance_id;
        if id.len() > 249 || !id.chars().all(|c| c.is_ascii_alphanumeric() || "._-".contains(c)) {
            return Err(ConfigError::new("kafka.instance_id", "must be at most 249 of A-Z a-z 0-9 . _ - (or empty)"));
        }
        for (section, map) in [
            ("properties", &self.properties),
            ("consumer_properties", &self.consumer_properties),
            ("producer_properties", &self.producer_properties),
        ] {
            if let Some(key) = map.keys().find(|k| RESERVED_PROPERTIES.contains(&k.as_str())) {
                let why = if key == "group.instance.id" {
                    "is set from kafka.instance_id: set that instead"
                } else {
                    "is set by Sluice (at-least-once delivery depends on it) and cannot be overridden"
                };
                return Err(ConfigError::new(format!("kafka.{section}.{key}"), why));
            }
        }
        Ok(())
    }

    pub(crate) fn base(&self, client_id: &str) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers).set("client.id", client_id);
        for (k, v) in &self.properties {
            config.set(k, v.expose());
        }
        config
    }

    /// A producer that never duplicates on its own retries and waits for all
    /// in-sync replicas: an acknowledgement means the output is safe.
    pub fn producer_config(&self, client_id: &str) -> ClientConfig {
        let mut config = self.base(client_id);
        config
            .set("enable.idempotence", "true")
            .set("acks", "all")
            // A stage enqueues a whole batch at once and then waits for its
            // acknowledgements, so lingering batches nothing more; it only adds
            // to every hop's latency (5 ms here cost about 20 ms end to end).
            .set("linger.ms", "1")
            .set("queue.buffering.max.messages", "200000")
            // Bytes waiting in the producer (librdkafka's default is 1 GiB): part
            // of a stage's memory bound; when full, the stage waits to enqueue.
            .set("queue.buffering.max.kbytes", "65536");
        for (k, v) in &self.producer_properties {
            config.set(k, v.expose());
        }
        config
    }

    /// A consumer whose offsets are stored by the runtime (only after the
    /// outputs are acknowledged) and committed in the background and on
    /// revocation and close.
    pub fn consumer_config(&self, client_id: &str, group_id: &str) -> ClientConfig {
        let mut config = self.base(client_id);
        config
            .set("group.id", group_id)
            .set("enable.auto.commit", "true")
            .set("auto.commit.interval.ms", "1000")
            .set("enable.auto.offset.store", "false")
            .set("auto.offset.reset", "earliest")
            .set("session.timeout.ms", self.session_timeout_ms.to_string())
            .set("heartbeat.interval.ms", (self.session_timeout_ms / 4).max(100).to_string())
            // A member joining or leaving moves only the partitions that change
            // owner; the others keep flowing (incremental assignment). Work in
            // flight for a moved partition is not committed by its old owner
            // (a stale offset, counted) and is redone by the new one.
            .set("partition.assignment.strategy", "cooperative-sticky")
            // The default (1000 ms) stalls a batching consumer about 0.5 s every few
            // thousand messages once its prefetch queue fills (docs/decisions.md).
            .set("fetch.queue.backoff.ms", "10")
            // A broker that holds an empty fetch for the full wait (the mock
            // cluster and tansu do; Kafka answers as soon as data arrives) adds
            // up to this much latency per stage: 100 ms made the low-load
            // end-to-end p50 about 130 ms through tansu, 10 ms about 30 ms.
            .set("fetch.wait.max.ms", "10")
            // Bound what librdkafka prefetches for this consumer (KiB, all
            // partitions together), overshot by at most one fetch response
            // (`fetch.max.bytes`; a single larger message still comes through):
            // with the runtime's byte budget this bounds the process's memory.
            .set("queued.max.messages.kbytes", "32768")
            .set("fetch.max.bytes", "16777216")
            // Consumer lag per partition (`sluice_kafka_consumer_lag`) comes
            // from librdkafka's statistics, read by the stage's consumer
            // context; `consumer_properties."statistics.interval.ms" = "0"`
            // turns them off.
            .set("statistics.interval.ms", "5000");
        if !self.instance_id.is_empty() {
            config.set("group.instance.id", &self.instance_id);
        }
        for (k, v) in &self.consumer_properties {
            config.set(k, v.expose());
        }
        config
    }
}
