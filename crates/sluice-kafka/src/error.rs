use thiserror::Error;

/// What can stop a stage's Kafka runtime.
#[derive(Debug, Error)]
pub enum KafkaRuntimeError {
    /// A client could not be created or configured: fatal, fix the configuration.
    #[error("kafka client for {what}: {source}")]
    Client {
        what: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The broker refused or lost an output after librdkafka's own retries.
    /// Nothing past it was committed, so a restart re-processes it.
    #[error("delivery to {topic} failed: {source}")]
    Delivery {
        topic: String,
        #[source]
        source: rdkafka::error::KafkaError,
    },
    /// The stage failed a batch in a way retrying cannot fix.
    #[error("stage {stage} failed: {message}")]
    Stage { stage: &'static str, message: String },
    /// A topic could not be created.
    #[error("creating topic {topic}: {message}")]
    Admin { topic: String, message: String },
    /// The in-flight work did not drain within the drain timeout.
    #[error("stage {stage} did not drain within {seconds:.1}s")]
    DrainTimeout { stage: &'static str, seconds: f64 },
}

impl KafkaRuntimeError {
    pub(crate) fn client(what: impl Into<String>, source: rdkafka::error::KafkaError) -> Self {
        Self::Client { what: what.into(), source }
    }
}
