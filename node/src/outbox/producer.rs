//! The rdkafka producer for the local broker, and the one way records are handed to it.
//!
//! Settings and why: idempotence (no duplicates or reordering from librdkafka's own retries;
//! implies acks=all); compression from config;
//! `message.max.bytes` just above our record limit, so librdkafka enforces what the broker would;
//! `message.timeout.ms = spool.divert_after_ms`: a record the broker has not acknowledged by then
//! comes back as failed and goes to the spool, so a missing broker never holds a frame's ack for
//! longer than that.

use crate::config::KafkaConfig;
use crate::records::Record;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::time::Duration;

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
            (cfg.record_limit_bytes + 4096).to_string(),
        )
        .set("log.connection.close", "false");
    for (k, v) in &cfg.producer {
        c.set(k, v);
    }
    c
}

pub fn create(
    cfg: &KafkaConfig,
    client_id: &str,
    divert_after_ms: u64,
) -> anyhow::Result<FutureProducer> {
    Ok(client_config(cfg, client_id, divert_after_ms).create()?)
}

/// Hands a record to librdkafka. When its queue is full this waits (that is the back-pressure
/// from Kafka to the pipeline); other errors are returned for the caller to classify
/// ([`crate::records::classify`]).
pub async fn enqueue(
    producer: &FutureProducer,
    record: &Record,
) -> Result<DeliveryFuture, KafkaError> {
    let rec = FutureRecord::to(&record.topic)
        .key(record.key.as_str())
        .payload(record.value.as_slice())
        .headers(record.kafka_headers());
    send_waiting(producer, rec).await
}

/// [`enqueue`] for a record in parts: the old outbox's records and spooled records being drained
/// (kept until the outbox hands `Record`s to [`enqueue`] too).
pub async fn enqueue_parts<'a>(
    producer: &FutureProducer,
    topic: &str,
    key: &str,
    header_pairs: impl Iterator<Item = (&'a str, &'a str)>,
    value: &[u8],
) -> Result<DeliveryFuture, KafkaError> {
    let mut headers = OwnedHeaders::new();
    for (key, value) in header_pairs {
        headers = headers.insert(Header {
            key,
            value: Some(value),
        });
    }
    let rec = FutureRecord::to(topic)
        .key(key)
        .payload(value)
        .headers(headers);
    send_waiting(producer, rec).await
}

/// Sends `rec`, waiting while librdkafka's queue is full.
async fn send_waiting(
    producer: &FutureProducer,
    mut rec: FutureRecord<'_, str, [u8]>,
) -> Result<DeliveryFuture, KafkaError> {
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
