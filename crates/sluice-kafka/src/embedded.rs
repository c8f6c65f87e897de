//! The embedded default: librdkafka's in-process mock cluster.
//!
//! It speaks the Kafka protocol on a loopback port, so every client in the
//! process (and the stages' consumer groups, commits and watermarks) works as
//! against a real broker. It is for the demo and fast tests, not a substitute
//! for the broker process in integration tests.

use rdkafka::mocking::MockCluster;
use rdkafka::producer::DefaultProducerContext;

use crate::admin::TopicSpec;
use crate::{KafkaConfig, KafkaRuntimeError};

/// A running mock cluster; dropped, it stops.
pub struct EmbeddedCluster {
    cluster: MockCluster<'static, DefaultProducerContext>,
}

impl std::fmt::Debug for EmbeddedCluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EmbeddedCluster").field("brokers", &self.cluster.bootstrap_servers()).finish()
    }
}

impl EmbeddedCluster {
    /// Starts a one-broker cluster.
    pub fn start() -> Result<Self, KafkaRuntimeError> {
        let cluster = MockCluster::new(1).map_err(|e| KafkaRuntimeError::client("mock cluster", e))?;
        Ok(Self { cluster })
    }

    /// The bootstrap address to give clients.
    pub fn brokers(&self) -> String {
        self.cluster.bootstrap_servers()
    }

    /// A [`KafkaConfig`] pointing at this cluster, other settings from `base`.
    pub fn kafka_config(&self, base: &KafkaConfig) -> KafkaConfig {
        KafkaConfig { brokers: self.brokers(), ..base.clone() }
    }

    /// Creates topics (the admin API cannot create topics on the mock cluster).
    pub fn create_topics(&self, topics: &[TopicSpec]) -> Result<(), KafkaRuntimeError> {
        for t in topics {
            self.cluster
                .create_topic(&t.name, t.partitions, t.replication)
                .map_err(|e| KafkaRuntimeError::Admin { topic: t.name.clone(), message: e.to_string() })?;
        }
        Ok(())
    }
}
