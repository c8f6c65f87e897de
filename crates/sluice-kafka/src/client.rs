//! Plain clients for tools and tests (not stages): a publisher that keeps a
//! bounded window of deliveries in flight, and a reader that follows topics
//! from their beginning without committing anything.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rdkafka::consumer::{Consumer, StreamConsumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{DeliveryFuture, FutureProducer, Producer};
use rdkafka::{ClientContext, Message};

use crate::{KafkaConfig, KafkaRuntimeError};

/// Deliveries allowed in flight before `send` waits for the oldest.
const WINDOW: usize = 20_000;

/// Publishes records and reports any that the broker did not take.
pub struct Publisher {
    producer: FutureProducer<Sent>,
    /// What librdkafka's statistics last said was sent (see [`Sent`]).
    sent: Arc<AtomicU64>,
    in_flight: VecDeque<(String, DeliveryFuture)>,
    delivered: u64,
}

impl std::fmt::Debug for Publisher {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Publisher")
            .field("in_flight", &self.in_flight.len())
            .field("delivered", &self.delivered)
            .finish()
    }
}

impl Publisher {
    pub fn new(kafka: &KafkaConfig, client_id: &str) -> Result<Self, KafkaRuntimeError> {
        let sent = Arc::new(AtomicU64::new(0));
        let producer = kafka
            .producer_config(client_id)
            .create_with_context(Sent { bytes: sent.clone() })
            .map_err(|e| KafkaRuntimeError::client("publisher", e))?;
        Ok(Self { producer, sent, in_flight: VecDeque::new(), delivered: 0 })
    }

    /// Bytes sent to the brokers so far (requests and their framing, after
    /// compression), as of librdkafka's last statistics: 0 unless
    /// `kafka.producer_properties."statistics.interval.ms"` is set.
    pub fn bytes_sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    /// Queues one record; waits for the oldest delivery when the window is full.
    pub async fn send(&mut self, topic: &str, key: Option<&[u8]>, payload: &[u8]) -> Result<(), KafkaRuntimeError> {
        if self.in_flight.len() >= WINDOW {
            self.settle_one().await?;
        }
        let delivery = crate::runtime::enqueue(&self.producer, topic, key, payload, None).await?;
        self.in_flight.push_back((topic.to_string(), delivery));
        Ok(())
    }

    /// Records acknowledged so far.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    async fn settle_one(&mut self) -> Result<(), KafkaRuntimeError> {
        if let Some((topic, delivery)) = self.in_flight.pop_front() {
            match delivery.await {
                Ok(Ok(_)) => self.delivered += 1,
                Ok(Err((source, _))) => return Err(KafkaRuntimeError::Delivery { topic, source }),
                Err(_) => return Err(KafkaRuntimeError::Delivery { topic, source: KafkaError::Canceled }),
            }
        }
        Ok(())
    }

    /// Waits for every queued record; returns how many were acknowledged so far.
    pub async fn settle(&mut self) -> Result<u64, KafkaRuntimeError> {
        while !self.in_flight.is_empty() {
            self.settle_one().await?;
        }
        Ok(self.delivered)
    }

    /// Waits for every queued record; returns how many were acknowledged.
    pub async fn finish(mut self) -> Result<u64, KafkaRuntimeError> {
        self.settle().await?;
        let _ = self.producer.flush(Duration::from_secs(5));
        Ok(self.delivered)
    }
}

/// The publisher's callbacks: librdkafka's statistics, for [`Publisher::bytes_sent`].
struct Sent {
    bytes: Arc<AtomicU64>,
}

impl ClientContext for Sent {
    fn stats_raw(&self, statistics: &[u8]) {
        #[derive(serde::Deserialize)]
        struct Totals {
            tx_bytes: u64,
        }
        if let Ok(totals) = serde_json::from_slice::<Totals>(statistics) {
            self.bytes.store(totals.tx_bytes, Ordering::Relaxed);
        }
    }
}

/// One record read by a [`TopicReader`].
#[derive(Debug, Clone)]
pub struct Record {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
}

/// Follows topics from the beginning, in a group of its own, committing nothing.
pub struct TopicReader {
    consumer: StreamConsumer,
}

impl std::fmt::Debug for TopicReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicReader").finish_non_exhaustive()
    }
}

impl TopicReader {
    pub fn new(kafka: &KafkaConfig, group_id: &str, topics: &[&str]) -> Result<Self, KafkaRuntimeError> {
        let mut config = kafka.consumer_config(group_id, group_id);
        // No statistics: they are for the stages' lag, and rdkafka's default
        // context would log each one.
        config.set("enable.auto.commit", "false").set("statistics.interval.ms", "0");
        let consumer: StreamConsumer = config.create().map_err(|e| KafkaRuntimeError::client("reader", e))?;
        consumer.subscribe(topics).map_err(|e| KafkaRuntimeError::client("reader subscribe", e))?;
        Ok(Self { consumer })
    }

    /// The next record, or `None` if none arrives within `wait`.
    pub async fn next(&self, wait: Duration) -> Option<Result<Record, KafkaRuntimeError>> {
        let received = tokio::time::timeout(wait, self.consumer.recv()).await.ok()?;
        Some(
            received
                .map(|m| Record {
                    topic: m.topic().to_string(),
                    partition: m.partition(),
                    offset: m.offset(),
                    key: m.key().map(<[u8]>::to_vec),
                    payload: m.payload().unwrap_or_default().to_vec(),
                })
                .map_err(|e| KafkaRuntimeError::client("reader", e)),
        )
    }
}
