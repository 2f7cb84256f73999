//! The rdkafka producer for the local broker, and the one way records are handed to it.
//!
//! Settings and why: idempotence (no duplicates or reordering from librdkafka's own retries;
//! implies acks=all); `message.timeout.ms = 0` (never give up on a record while the broker is
//! away: the frame stays un-acked at the MQTT broker until Kafka has it); compression from config;
//! `message.max.bytes` just above our record limit, so librdkafka enforces what the broker would.

use super::records::Record;
use crate::config::KafkaConfig;
use rdkafka::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::time::Duration;

pub fn client_config(cfg: &KafkaConfig, client_id: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", client_id)
        .set("enable.idempotence", "true")
        .set("compression.type", &cfg.compression)
        .set("linger.ms", cfg.linger_ms.to_string())
        .set("message.timeout.ms", "0")
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

pub fn create(cfg: &KafkaConfig, client_id: &str) -> anyhow::Result<FutureProducer> {
    Ok(client_config(cfg, client_id).create()?)
}

/// Hands a record to librdkafka. When its queue is full this waits (that is the back-pressure
/// from Kafka to the pipeline); other errors are returned, they mean the record can never go.
pub async fn enqueue(
    producer: &FutureProducer,
    record: &Record,
) -> Result<DeliveryFuture, KafkaError> {
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (key, value) in &record.headers {
        headers = headers.insert(Header {
            key,
            value: Some(value.as_str()),
        });
    }
    let mut rec = FutureRecord::to(&record.topic)
        .key(record.key.as_str())
        .payload(record.value.as_slice())
        .headers(headers);
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
