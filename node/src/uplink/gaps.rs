//! Records that expired from the local broker before the uplink replicated them.
//!
//! The local broker deletes records by retention whether or not the cloud has them. When that
//! happens the uplink's checkpoint (or its read position) points below the partition's log start;
//! the consumer resumes at the log start (`auto.offset.reset = earliest`) and the next record read
//! has a higher offset than expected. [`GapDetector`] notices that jump and says which records
//! were lost, once per gap, so the loss is counted and logged instead of silent.
//!
//! Only the record read tells, not the watermarks: librdkafka fetches ahead of what the uplink
//! has taken, and records it already holds are delivered even after the broker deleted them, so
//! a log start above the uplink's position does not mean those records are lost.
//!
//! fovea's local topics are neither compacted nor written transactionally, so consecutive records
//! of a partition have consecutive offsets: a jump is records that are gone. Going back (a seek, a
//! re-read after a restart) is never a gap.

use std::collections::BTreeMap;
use std::fmt;

/// Records of one partition that expired before they were replicated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    pub topic: String,
    pub partition: i32,
    /// The first offset lost.
    pub from: i64,
    /// The offset of the record read after the gap (the log start when it was read).
    pub to: i64,
    /// Timestamp of the last record the uplink read before the gap, when it read one this run.
    pub last_before_ms: Option<i64>,
    /// Timestamp of the first record read after the gap.
    pub first_after_ms: Option<i64>,
}

impl Gap {
    pub fn records(&self) -> u64 {
        (self.to - self.from).max(0) as u64
    }
}

impl fmt::Display for Gap {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} records of {}/{} (offsets {}..{}) expired from the local broker before they were \
             replicated",
            self.records(),
            self.topic,
            self.partition,
            self.from,
            self.to - 1
        )?;
        match (self.last_before_ms, self.first_after_ms) {
            (Some(a), Some(b)) => write!(
                f,
                "; written between {} and {} ({:.1} s)",
                iso(a),
                iso(b),
                (b - a).max(0) as f64 / 1000.0
            ),
            (Some(a), None) => write!(f, "; written after {}", iso(a)),
            (None, Some(b)) => write!(f, "; written before {}", iso(b)),
            (None, None) => Ok(()),
        }
    }
}

/// `ms` since the Unix epoch as UTC `YYYY-MM-DDTHH:MM:SS.mmmZ`.
fn iso(ms: i64) -> String {
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(at).to_string()
}

#[derive(Debug, Default)]
struct Expect {
    /// The offset the next record read should have.
    next: Option<i64>,
    /// Timestamp of the last record read.
    last_ms: Option<i64>,
}

/// The offset each partition's next record should have, and the gaps when it has not.
#[derive(Debug, Default)]
pub struct GapDetector {
    partitions: BTreeMap<(String, i32), Expect>,
}

impl GapDetector {
    pub fn new() -> Self {
        Self::default()
    }

    /// The consumer starts `topic/partition` at `next` (the checkpoint, or the log start when the
    /// group has none).
    pub fn assigned(&mut self, topic: &str, partition: i32, next: i64) {
        let e = self.entry(topic, partition);
        e.next = Some(next);
    }

    /// A record was read. Returns the gap before it, if its offset is past the expected one.
    pub fn read(
        &mut self,
        topic: &str,
        partition: i32,
        offset: i64,
        timestamp_ms: Option<i64>,
    ) -> Option<Gap> {
        let e = self.entry(topic, partition);
        let gap = match e.next {
            Some(next) if offset > next => Some(Gap {
                topic: topic.to_string(),
                partition,
                from: next,
                to: offset,
                last_before_ms: e.last_ms,
                first_after_ms: timestamp_ms,
            }),
            _ => None,
        };
        // Also after a rewind: from here on the records follow this one.
        e.next = Some(offset + 1);
        e.last_ms = timestamp_ms.or(e.last_ms);
        gap
    }

    fn entry(&mut self, topic: &str, partition: i32) -> &mut Expect {
        self.partitions
            .entry((topic.to_string(), partition))
            .or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn times_are_utc() {
        assert_eq!(iso(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(iso(1_709_210_096_789), "2024-02-29T12:34:56.789Z");
    }

    #[test]
    fn consecutive_records_are_no_gap() {
        let mut d = GapDetector::new();
        d.assigned("f", 0, 5);
        for o in 5..20 {
            assert_eq!(d.read("f", 0, o, Some(o * 10)), None);
        }
    }

    #[test]
    fn a_jump_past_the_checkpoint_is_one_gap_with_its_range_and_times() {
        let mut d = GapDetector::new();
        d.assigned("f", 0, 3);
        assert_eq!(d.read("f", 0, 3, Some(1_000)), None);
        let gap = d.read("f", 0, 81, Some(9_000)).expect("a gap");
        assert_eq!(
            gap,
            Gap {
                topic: "f".into(),
                partition: 0,
                from: 4,
                to: 81,
                last_before_ms: Some(1_000),
                first_after_ms: Some(9_000),
            }
        );
        assert_eq!(gap.records(), 77);
        let text = gap.to_string();
        assert!(text.contains("77 records of f/0 (offsets 4..80)"), "{text}");
        assert!(text.contains("(8.0 s)"), "{text}");
        // Once: the records after the gap follow on.
        assert_eq!(d.read("f", 0, 82, Some(9_100)), None);
    }

    #[test]
    fn a_checkpoint_below_the_first_record_read_after_a_restart_is_a_gap() {
        let mut d = GapDetector::new();
        d.assigned("f", 1, 10);
        let gap = d.read("f", 1, 40, Some(5)).expect("a gap");
        assert_eq!((gap.from, gap.to, gap.last_before_ms), (10, 40, None));
        assert!(gap.to_string().contains("written before"), "{gap}");
    }

    #[test]
    fn rewinds_and_re_reads_are_no_gap() {
        let mut d = GapDetector::new();
        d.assigned("f", 0, 0);
        for o in 0..10 {
            assert_eq!(d.read("f", 0, o, None), None);
        }
        // The consumer goes back (a seek, a restart from an older checkpoint): read again.
        for o in 4..10 {
            assert_eq!(d.read("f", 0, o, None), None, "re-read of {o}");
        }
        // The same record twice.
        assert_eq!(d.read("f", 0, 9, None), None);
        assert_eq!(d.read("f", 0, 10, None), None);
    }

    #[test]
    fn partitions_and_topics_are_independent_and_unknown_ones_start_anywhere() {
        let mut d = GapDetector::new();
        d.assigned("f", 0, 0);
        d.assigned("r", 0, 100);
        assert_eq!(d.read("f", 0, 0, None), None);
        assert_eq!(d.read("r", 0, 100, None), None);
        // A partition with no expectation yet: its first record sets it.
        assert_eq!(d.read("f", 2, 55, None), None);
        assert!(d.read("f", 2, 57, None).is_some());
        assert!(d.read("f", 0, 2, None).is_some());
    }
}
