//! `fovea status`: how far behind the uplink is, read from the brokers themselves (the uplink's
//! committed offsets on the local broker against the ends of the topics), so it works whether
//! the node is running or not.

use crate::config::Config;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::{Message, Timestamp};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::fmt::Write as _;
use std::time::Duration;

/// Replication lag of one local topic.
#[derive(Debug, Clone, PartialEq)]
pub struct Lag {
    pub topic: String,
    /// Records not yet replicated (end offset minus committed offset, summed over partitions).
    pub records: i64,
    /// Age of the oldest record not yet replicated, in seconds (None when nothing lags).
    pub seconds: Option<f64>,
}

pub fn lag(cfg: &Config, topic: &str) -> anyhow::Result<Lag> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", cfg.uplink_group())
        .set("enable.auto.commit", "false")
        .set("log.connection.close", "false")
        .create()?;
    let timeout = Duration::from_secs(5);
    let md = consumer.fetch_metadata(Some(topic), timeout)?;
    let partitions = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition(topic, p);
    }
    let committed = consumer.committed_offsets(tpl, timeout)?;
    let mut records = 0;
    let mut oldest: Option<i64> = None;
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        let from = match e.offset() {
            Offset::Offset(n) => n,
            _ => low,
        };
        if high > from {
            records += high - from;
            if let Some(ms) = timestamp_at(&consumer, topic, e.partition(), from) {
                oldest = Some(oldest.map_or(ms, |o: i64| o.min(ms)));
            }
        }
    }
    let now = crate::job::now_ms();
    Ok(Lag {
        topic: topic.to_string(),
        records,
        seconds: oldest.map(|ms| (now - ms).max(0) as f64 / 1000.0),
    })
}

/// The timestamp of the record at `offset`, read with a one-off assignment.
fn timestamp_at(consumer: &BaseConsumer, topic: &str, partition: i32, offset: i64) -> Option<i64> {
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(offset))
        .ok()?;
    consumer.assign(&tpl).ok()?;
    let msg = consumer.poll(Duration::from_secs(3))?.ok()?;
    match msg.timestamp() {
        Timestamp::CreateTime(ms) | Timestamp::LogAppendTime(ms) => Some(ms),
        Timestamp::NotAvailable => None,
    }
}

/// The text `fovea status` prints.
pub fn report(cfg: &Config) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "node: {}", cfg.node_id());
    let _ = writeln!(out, "local broker: {}", cfg.kafka.brokers);
    if !cfg.uplink.enabled {
        let _ = writeln!(out, "uplink: disabled");
        return out;
    }
    let _ = writeln!(
        out,
        "uplink: to {} as group {}",
        cfg.uplink.brokers,
        cfg.uplink_group()
    );
    let mut topics = vec![&cfg.kafka.topics.results];
    if cfg.uplink.frames.enabled {
        topics.push(&cfg.kafka.topics.frames);
    }
    for topic in topics {
        match lag(cfg, topic) {
            Ok(l) => {
                let age = l.seconds.map_or("-".to_string(), |s| format!("{s:.1} s"));
                let _ = writeln!(out, "lag {}: {} records, oldest {age}", l.topic, l.records);
            }
            Err(e) => {
                let _ = writeln!(out, "lag {topic}: unknown ({e})");
            }
        }
    }
    out
}
