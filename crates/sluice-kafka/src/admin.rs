//! Topic creation on a real broker.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use crate::{KafkaConfig, KafkaRuntimeError};

/// A topic to create.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicSpec {
    pub name: String,
    pub partitions: i32,
    pub replication: i32,
}

/// Creates the topics; one that already exists is left as it is.
pub async fn create_topics(config: &KafkaConfig, topics: &[TopicSpec]) -> Result<Vec<String>, KafkaRuntimeError> {
    let admin: AdminClient<DefaultClientContext> =
        config.base("sluice-admin").create().map_err(|e| KafkaRuntimeError::client("admin", e))?;
    let new: Vec<NewTopic<'_>> =
        topics.iter().map(|t| NewTopic::new(&t.name, t.partitions, TopicReplication::Fixed(t.replication))).collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    let results = admin.create_topics(&new, &options).await.map_err(|e| KafkaRuntimeError::Admin {
        topic: topics.iter().map(|t| t.name.as_str()).collect::<Vec<_>>().join(","),
        message: e.to_string(),
    })?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(name) => created.push(name),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => return Err(KafkaRuntimeError::Admin { topic, message: code.to_string() }),
        }
    }
    Ok(created)
}
