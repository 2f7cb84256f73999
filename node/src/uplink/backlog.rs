//! How old the uplink's oldest unreplicated record is, per local topic, against the topic's
//! `retention.ms`: the local broker deletes records at that age whether or not the cloud has
//! them, so the ratio says how close a long outage is to losing records.
//!
//! The uplink reads records in order and holds them until the cloud acknowledges them (or a rule
//! skips them); while it waits, reading pauses. So the oldest unreplicated record of a topic is
//! the oldest one read and not yet done; with nothing held, the uplink reads on and is caught
//! up. (A frames topic not read while the results catch up is not aged until its first frame is
//! read: results go first.)

use std::collections::BTreeMap;

/// Timestamps of the records read and not yet done, per topic and partition.
#[derive(Debug, Default)]
pub struct Backlog {
    topics: BTreeMap<String, BTreeMap<i32, BTreeMap<i64, i64>>>,
}

/// One topic's figures, for `/metrics` and `/readyz`.
#[derive(Debug, Clone, PartialEq)]
pub struct RetentionUse {
    /// Age of the oldest unreplicated record, seconds (0 when none is held).
    pub oldest_age_seconds: f64,
    /// The topic's `retention.ms` (-1: no time limit).
    pub retention_ms: i64,
}

impl RetentionUse {
    /// Age over retention (0 without a time limit).
    pub fn ratio(&self) -> f64 {
        if self.retention_ms > 0 {
            self.oldest_age_seconds * 1000.0 / self.retention_ms as f64
        } else {
            0.0
        }
    }
}

impl Backlog {
    pub fn new() -> Self {
        Self::default()
    }

    /// A record stored at `timestamp_ms` was read (read again after a rewind: kept once).
    pub fn started(&mut self, topic: &str, partition: i32, offset: i64, timestamp_ms: i64) {
        let partitions = match self.topics.get_mut(topic) {
            Some(p) => p,
            None => self.topics.entry(topic.to_string()).or_default(),
        };
        partitions
            .entry(partition)
            .or_default()
            .insert(offset, timestamp_ms);
    }

    /// The record is in the cloud (or skipped, or dead-lettered): no longer unreplicated.
    pub fn done(&mut self, topic: &str, partition: i32, offset: i64) {
        if let Some(p) = self
            .topics
            .get_mut(topic)
            .and_then(|t| t.get_mut(&partition))
        {
            p.remove(&offset);
        }
    }

    /// The oldest timestamp of `topic`'s records held, if any.
    pub fn oldest_ms(&self, topic: &str) -> Option<i64> {
        self.topics
            .get(topic)?
            .values()
            .flat_map(|offsets| offsets.values())
            .min()
            .copied()
    }

    /// `topic`'s figures at `now_ms`, against `retention_ms`.
    pub fn usage(&self, topic: &str, retention_ms: i64, now_ms: i64) -> RetentionUse {
        let age_ms = self
            .oldest_ms(topic)
            .map_or(0, |ms| now_ms.saturating_sub(ms).max(0));
        RetentionUse {
            oldest_age_seconds: age_ms as f64 / 1000.0,
            retention_ms,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_oldest_held_record_sets_the_age() {
        let mut b = Backlog::new();
        assert_eq!(b.usage("r", 20_000, 50_000).oldest_age_seconds, 0.0);
        b.started("r", 0, 7, 30_000);
        b.started("r", 1, 3, 20_000);
        b.started("r", 0, 8, 40_000);
        b.started("f", 0, 0, 1_000);
        let u = b.usage("r", 60_000, 50_000);
        assert_eq!(u.oldest_age_seconds, 30.0);
        assert_eq!(u.ratio(), 0.5);
        // Acks in any order: the oldest still held counts.
        b.done("r", 0, 8);
        assert_eq!(b.oldest_ms("r"), Some(20_000));
        b.done("r", 1, 3);
        assert_eq!(b.oldest_ms("r"), Some(30_000));
        b.done("r", 0, 7);
        assert_eq!(b.oldest_ms("r"), None);
        assert_eq!(b.usage("r", 60_000, 50_000).ratio(), 0.0);
        assert_eq!(b.oldest_ms("f"), Some(1_000), "topics are apart");
    }

    #[test]
    fn re_reads_and_unknown_acks_change_nothing() {
        let mut b = Backlog::new();
        b.started("r", 0, 1, 100);
        b.started("r", 0, 1, 100);
        b.done("r", 0, 9);
        b.done("x", 0, 1);
        assert_eq!(b.oldest_ms("r"), Some(100));
        b.done("r", 0, 1);
        assert_eq!(b.oldest_ms("r"), None);
    }

    #[test]
    fn no_time_limit_is_no_ratio_and_clock_skew_no_negative_age() {
        let mut b = Backlog::new();
        b.started("r", 0, 0, 10_000);
        assert_eq!(b.usage("r", -1, 20_000).ratio(), 0.0);
        assert_eq!(b.usage("r", 1000, 5_000).oldest_age_seconds, 0.0);
    }
}
