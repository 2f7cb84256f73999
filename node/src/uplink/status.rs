//! `fovea status`: how far behind the uplink is, read from the brokers themselves (the uplink's
//! committed offsets on the local broker against the ends of the topics), so it works whether
//! the node is running or not.

use crate::config::{Config, TopicClass};
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
    /// Records between the checkpoint and the log start: deleted locally by retention before
    /// the checkpoint passed them. Lost to the cloud unless the running uplink already holds them
    /// (read, not yet acknowledged); the uplink counts the lost ones when it reads on.
    pub expired: i64,
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
    let mut expired = 0;
    let mut oldest: Option<i64> = None;
    for e in committed.elements() {
        let (low, high) = consumer.fetch_watermarks(topic, e.partition(), timeout)?;
        // A checkpoint below the log start: the records in between are gone, not lagging.
        let from = match e.offset() {
            Offset::Offset(n) if n < low => {
                expired += low - n;
                low
            }
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
        expired,
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

/// One topic's line: records behind, the oldest one's age against the topic's `retention.ms`
/// (records older than that are deleted before the cloud has them), and records already lost.
fn lag_line(l: &Lag, retention_ms: i64) -> String {
    let retention = if retention_ms > 0 {
        format!("retention {}", duration(retention_ms as f64 / 1000.0))
    } else {
        "no retention time limit".to_string()
    };
    let age = match l.seconds {
        Some(s) if retention_ms > 0 => format!(
            "oldest {} of {retention} ({:.0}%)",
            duration(s),
            s * 1000.0 / retention_ms as f64 * 100.0
        ),
        Some(s) => format!("oldest {}, {retention}", duration(s)),
        None => format!("oldest -, {retention}"),
    };
    let mut line = format!("lag {}: {} records, {age}", l.topic, l.records);
    if l.expired > 0 {
        let _ = write!(
            line,
            "; {} records below the log start (deleted before the checkpoint passed them)",
            l.expired
        );
    }
    line
}

/// Seconds as `12.3 s`, `45 min` or `6.0 h`.
fn duration(s: f64) -> String {
    if s < 120.0 {
        format!("{s:.1} s")
    } else if s < 7200.0 {
        format!("{:.0} min", s / 60.0)
    } else {
        format!("{:.1} h", s / 3600.0)
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
    let mut topics = vec![(&cfg.kafka.topics.results, TopicClass::Results)];
    if cfg.uplink.frames.enabled {
        topics.push((&cfg.kafka.topics.frames, TopicClass::Frames));
    }
    for (topic, class) in topics {
        match lag(cfg, topic) {
            Ok(l) => {
                let retention_ms = cfg.kafka.retention.of(class).retention_ms;
                let _ = writeln!(out, "{}", lag_line(&l, retention_ms));
            }
            Err(e) => {
                let _ = writeln!(out, "lag {topic}: unknown ({e})");
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lag(records: i64, seconds: Option<f64>, expired: i64) -> Lag {
        Lag {
            topic: "fovea.results".into(),
            records,
            seconds,
            expired,
        }
    }

    #[test]
    fn the_age_is_shown_against_the_retention() {
        assert_eq!(
            lag_line(&lag(12, Some(5400.0), 0), 6 * 3_600_000),
            "lag fovea.results: 12 records, oldest 90 min of retention 6.0 h (25%)"
        );
        assert_eq!(
            lag_line(&lag(0, None, 0), 20_000),
            "lag fovea.results: 0 records, oldest -, retention 20.0 s"
        );
        assert_eq!(
            lag_line(&lag(3, Some(2.0), 40), -1),
            "lag fovea.results: 3 records, oldest 2.0 s, no retention time limit; 40 records \
             below the log start (deleted before the checkpoint passed them)"
        );
    }
}
