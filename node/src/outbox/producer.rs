//! The rdkafka producer for the local broker, behind [`Produce`] so that the outbox loop can be
//! driven by a test double.
//!
//! Settings and why: idempotence (no duplicates or reordering from librdkafka's own retries;
//! implies acks=all); compression from config; `message.max.bytes` just above our record limit
//! ([`RecordLimit::producer_max_bytes`]), so librdkafka enforces what the broker would;
//! `message.timeout.ms = spool.divert_after_ms`: a record the broker has not acknowledged by then
//! comes back as failed and goes to the spool, so a missing broker never holds a frame's ack for
//! longer than that.

use super::topics::TopicSpec;
use crate::config::KafkaConfig;
use crate::records::{Record, RecordLimit};
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord, Producer};
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

/// The broker's answer about one record, to be awaited.
pub type Delivery = Pin<Box<dyn Future<Output = Result<(), KafkaError>> + Send>>;

/// What the outbox needs of a producer.
pub trait Produce: Send + 'static {
    /// Hands `record` over, waiting while the client's queue is full (that is the back-pressure
    /// from Kafka to the pipeline). `Err`: refused at once (e.g. too large for the client).
    fn enqueue(
        &self,
        record: Arc<Record>,
    ) -> impl Future<Output = Result<Delivery, KafkaError>> + Send;

    /// Whether the broker is reachable, creating the node's topics if they are missing.
    fn probe(&self) -> impl Future<Output = Result<(), String>> + Send + use<Self>;

    /// Replaces a producer that reported a fatal error.
    fn rebuild(&mut self) -> anyhow::Result<()>;

    /// Waits up to `deadline` for what the client holds to be delivered.
    fn flush(&self, deadline: Duration);
}

/// The local broker's producer.
pub struct KafkaProducer {
    producer: FutureProducer,
    config: ClientConfig,
    /// For probing and creating topics.
    kafka: KafkaConfig,
    topics: Arc<[TopicSpec]>,
    /// Set once the first successful probe has checked the topics' retention (once per run: the
    /// settings do not change while the node runs, and every probe after an outage need not ask).
    retention_checked: Arc<AtomicBool>,
}

impl KafkaProducer {
    pub fn new(
        cfg: &KafkaConfig,
        topics: Vec<TopicSpec>,
        client_id: &str,
        divert_after_ms: u64,
    ) -> anyhow::Result<Self> {
        let config = client_config(cfg, client_id, divert_after_ms);
        Ok(KafkaProducer {
            producer: config.create()?,
            config,
            kafka: cfg.clone(),
            topics: topics.into(),
            retention_checked: Arc::new(AtomicBool::new(false)),
        })
    }

    /// The rdkafka handle (for the uplink's and shutdown's flush).
    pub fn handle(&self) -> FutureProducer {
        self.producer.clone()
    }
}

impl Produce for KafkaProducer {
    fn enqueue(
        &self,
        record: Arc<Record>,
    ) -> impl Future<Output = Result<Delivery, KafkaError>> + Send {
        let producer = self.producer.clone();
        async move {
            let future = enqueue(&producer, &record).await?;
            Ok(Box::pin(async move {
                match future.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    Err(_) => Err(KafkaError::Canceled),
                }
            }) as Delivery)
        }
    }

    fn probe(&self) -> impl Future<Output = Result<(), String>> + Send + use<> {
        let (kafka, topics) = (self.kafka.clone(), self.topics.clone());
        let checked = self.retention_checked.clone();
        async move {
            let check = !checked.load(Ordering::Relaxed);
            super::topics::create(&kafka, &topics, check).await?;
            checked.store(true, Ordering::Relaxed);
            Ok(())
        }
    }

    fn rebuild(&mut self) -> anyhow::Result<()> {
        let fatal = self.producer.client().fatal_error();
        log::error!(
            "local producer failed fatally ({}); building a new one",
            fatal.map_or_else(
                || "no detail".to_string(),
                |(code, why)| format!("{code:?}: {why}")
            )
        );
        self.producer = self.config.create()?;
        Ok(())
    }

    fn flush(&self, deadline: Duration) {
        if let Err(e) = self.producer.flush(deadline) {
            log::warn!("producer flush: {e}");
        }
    }
}

pub fn client_config(cfg: &KafkaConfig, client_id: &str, divert_after_ms: u64) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", divert_after_ms.to_string())
        .set("socket.connection.setup.timeout.ms", "3000")
        .set("reconnect.backoff.max.ms", "2000")
        .set(
            "message.max.bytes",
            RecordLimit::new(cfg.record_limit_bytes)
                .producer_max_bytes()
                .to_string(),
        )
        .set("log.connection.close", "false");
    for (k, v) in &cfg.producer {
        c.set(k, v);
    }
    c
}

/// Hands a record to librdkafka. When its queue is full this waits; other errors are returned
/// for the caller to classify ([`crate::records::classify`]).
pub async fn enqueue(
    producer: &FutureProducer,
    record: &Record,
) -> Result<DeliveryFuture, KafkaError> {
    let mut rec = FutureRecord::to(&record.topic)
        .key(&record.key)
        .payload(&record.value)
        .headers(record.kafka_headers());
    loop {
        match producer.send_result(rec) {
            Ok(delivery) => return Ok(delivery),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), back)) => {
                rec = back;
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
            Err((e, _)) => return Err(e),
        }
    }
}
