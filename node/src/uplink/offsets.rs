//! At-least-once offset tracking for the uplink's consumer.
//!
//! The uplink reads the local topics in order per partition, hands each record to the cloud
//! producer (or drops it by a rule), and learns that it is *done* in any order: acks from
//! different batches race, and skipped records are done at once. Committing a record's offset
//! before every earlier record is done would lose those earlier records on a crash, so the commit
//! position only moves over a contiguous prefix of done records.
//!
//! Only offsets that were `started` count: Kafka offsets have gaps (compaction, transaction
//! markers), and an offset the consumer never saw is not a hole. The position committed is Kafka's
//! "next offset to read": the last done offset of the prefix plus one.
//!
//! Memory is the records between the oldest unfinished one and the newest read, per partition;
//! the caller bounds it by pausing the consumer while [`OffsetTracker::in_flight`] is high.

use std::collections::BTreeMap;

/// Tracks started and done offsets per topic-partition and yields safe commit positions.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    /// Topic -> partition -> state. BTreeMaps: lookups by `&str` without allocating, and
    /// [`committable`](Self::committable) comes out in a stable order.
    topics: BTreeMap<String, BTreeMap<i32, Partition>>,
}

#[derive(Debug, Default)]
struct Partition {
    /// Started offsets not yet passed by the done prefix, with whether each is done.
    offsets: BTreeMap<i64, bool>,
    /// How many of `offsets` are not done (kept so `in_flight` need not scan).
    pending: usize,
    /// One past the last offset of the done prefix: the position that is safe to commit.
    safe: Option<i64>,
    /// The position last returned by `committable`, so none is returned twice and commits never
    /// move backwards.
    reported: Option<i64>,
}

impl OffsetTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The state of `topic/partition`, made on first use (without allocating the topic's name
    /// again when it is known).
    fn partition(&mut self, topic: &str, partition: i32) -> &mut Partition {
        if !self.topics.contains_key(topic) {
            self.topics.insert(topic.to_string(), Default::default());
        }
        self.topics
            .get_mut(topic)
            .expect("inserted above")
            .entry(partition)
            .or_default()
    }

    /// Records that the consumer read `offset` and handed it off. Offsets normally increase; an
    /// offset at or below one already started means the consumer went back (a seek or a
    /// rebalance), so the records from there on are forgotten and will be read again. Earlier
    /// records still in flight keep blocking the commit.
    pub fn started(&mut self, topic: &str, partition: i32, offset: i64) {
        let p = self.partition(topic, partition);
        if p.offsets
            .last_key_value()
            .is_some_and(|(&last, _)| last >= offset)
        {
            let reread = p.offsets.split_off(&offset);
            p.pending -= reread.values().filter(|&&done| !done).count();
        }
        p.offsets.insert(offset, false);
        p.pending += 1;
    }

    /// Records that `offset` is done (acked by the cloud, or skipped by a rule). Done twice, or
    /// for an offset not started (forgotten by a rewind or [`revoke`](Self::revoke)), is ignored.
    pub fn done(&mut self, topic: &str, partition: i32, offset: i64) {
        let Some(p) = self
            .topics
            .get_mut(topic)
            .and_then(|partitions| partitions.get_mut(&partition))
        else {
            return;
        };
        match p.offsets.get_mut(&offset) {
            Some(done) if !*done => {
                *done = true;
                p.pending -= 1;
            }
            _ => return,
        }
        // Advance the prefix now, so done records do not pile up behind nothing.
        while let Some(entry) = p.offsets.first_entry() {
            if !*entry.get() {
                break;
            }
            p.safe = Some(entry.key() + 1);
            entry.remove();
        }
    }

    /// The records of `topic/partition` below `next` no longer exist (they expired from the
    /// local broker before they were read): the commit may move to `next` as soon as every
    /// started offset before it is done, instead of waiting at the last one read for records that
    /// will never come. Ignored when `next` is not past the last started offset.
    pub fn passed(&mut self, topic: &str, partition: i32, next: i64) {
        let p = self.partition(topic, partition);
        if p.offsets
            .last_key_value()
            .is_some_and(|(&last, _)| last >= next - 1)
            || p.safe.is_some_and(|safe| safe >= next)
        {
            return;
        }
        // A done stand-in for the missing records: the prefix moves over it like over any.
        p.offsets.insert(next - 1, true);
        while let Some(entry) = p.offsets.first_entry() {
            if !*entry.get() {
                break;
            }
            p.safe = Some(entry.key() + 1);
            entry.remove();
        }
    }

    /// For each partition whose done prefix advanced since the last call, the offset to commit
    /// (next to read). Each position is returned once; positions only increase.
    pub fn committable(&mut self) -> Vec<(String, i32, i64)> {
        let mut out = Vec::new();
        for (topic, partitions) in &mut self.topics {
            for (&partition, p) in partitions.iter_mut() {
                if let Some(safe) = p.safe
                    && p.reported.is_none_or(|reported| safe > reported)
                {
                    p.reported = Some(safe);
                    out.push((topic.clone(), partition, safe));
                }
            }
        }
        out
    }

    /// Records started but not yet done, across all partitions.
    pub fn in_flight(&self) -> usize {
        self.topics
            .values()
            .flat_map(|partitions| partitions.values())
            .map(|p| p.pending)
            .sum()
    }

    /// Forgets a partition (after a rebalance took it away): its records will be read again by
    /// whichever consumer owns it now, and late acks for it are ignored.
    pub fn revoke(&mut self, topic: &str, partition: i32) {
        if let Some(partitions) = self.topics.get_mut(topic) {
            partitions.remove(&partition);
            if partitions.is_empty() {
                self.topics.remove(topic);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn commits(t: &mut OffsetTracker) -> Vec<(String, i32, i64)> {
        t.committable()
    }

    fn c(topic: &str, partition: i32, offset: i64) -> (String, i32, i64) {
        (topic.to_string(), partition, offset)
    }

    #[test]
    fn in_order() {
        let mut t = OffsetTracker::new();
        assert!(commits(&mut t).is_empty());
        for o in 0..5 {
            t.started("r", 0, o);
        }
        assert_eq!(t.in_flight(), 5);
        assert!(commits(&mut t).is_empty(), "nothing done yet");
        t.done("r", 0, 0);
        t.done("r", 0, 1);
        assert_eq!(commits(&mut t), [c("r", 0, 2)]);
        for o in 2..5 {
            t.done("r", 0, o);
        }
        assert_eq!(commits(&mut t), [c("r", 0, 5)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn out_of_order_waits_for_the_oldest() {
        let mut t = OffsetTracker::new();
        for o in 10..15 {
            t.started("r", 0, o);
        }
        for o in [14, 12, 11, 13] {
            t.done("r", 0, o);
            assert!(commits(&mut t).is_empty(), "10 is still in flight");
        }
        assert_eq!(t.in_flight(), 1);
        t.done("r", 0, 10);
        assert_eq!(commits(&mut t), [c("r", 0, 15)]);
    }

    #[test]
    fn gaps_between_started_offsets_are_not_holes() {
        let mut t = OffsetTracker::new();
        for o in [3, 7, 8, 20] {
            t.started("r", 0, o);
        }
        t.done("r", 0, 3);
        assert_eq!(commits(&mut t), [c("r", 0, 4)]);
        t.done("r", 0, 8);
        assert!(commits(&mut t).is_empty(), "7 blocks");
        t.done("r", 0, 7);
        assert_eq!(commits(&mut t), [c("r", 0, 9)]);
        t.done("r", 0, 20);
        assert_eq!(commits(&mut t), [c("r", 0, 21)]);
    }

    #[test]
    fn many_partitions_and_topics_are_independent() {
        let mut t = OffsetTracker::new();
        for partition in 0..8 {
            for o in 0..10 {
                t.started("frames", partition, o);
                t.started("results", partition, o * 2);
            }
        }
        assert_eq!(t.in_flight(), 160);
        for partition in 0..8 {
            t.done("frames", partition, 0);
            if partition % 2 == 0 {
                t.done("results", partition, 0);
                t.done("results", partition, 2);
            }
        }
        let mut want: Vec<_> = (0..8).map(|p| c("frames", p, 1)).collect();
        want.extend((0..8).step_by(2).map(|p| c("results", p, 3)));
        assert_eq!(commits(&mut t), want);
        assert_eq!(t.in_flight(), 160 - 8 - 8);
    }

    #[test]
    fn nothing_committable_twice() {
        let mut t = OffsetTracker::new();
        t.started("r", 0, 0);
        t.started("r", 0, 1);
        t.done("r", 0, 0);
        assert_eq!(commits(&mut t), [c("r", 0, 1)]);
        assert!(commits(&mut t).is_empty());
        // A duplicate ack or an ack for something never started changes nothing.
        t.done("r", 0, 0);
        t.done("r", 0, 99);
        t.done("other", 3, 0);
        assert!(commits(&mut t).is_empty());
        assert_eq!(t.in_flight(), 1);
    }

    #[test]
    fn rewind_rereads_later_records_but_keeps_earlier_ones_blocking() {
        let mut t = OffsetTracker::new();
        for o in 0..6 {
            t.started("r", 0, o);
        }
        t.done("r", 0, 1);
        // The consumer seeks back to 3: 3..6 will be read again.
        t.started("r", 0, 3);
        assert_eq!(t.in_flight(), 3, "0, 2 and the new 3");
        t.done("r", 0, 3);
        t.done("r", 0, 5); // late ack for a forgotten offset
        assert!(commits(&mut t).is_empty(), "0 still blocks");
        t.done("r", 0, 0);
        assert_eq!(commits(&mut t), [c("r", 0, 2)], "2 is still in flight");
        t.done("r", 0, 2);
        assert_eq!(commits(&mut t), [c("r", 0, 4)]);
        // Rewinding below the committed position never moves the commit back.
        t.started("r", 0, 1);
        t.done("r", 0, 1);
        assert!(commits(&mut t).is_empty());
    }

    #[test]
    fn revoked_partitions_are_forgotten() {
        let mut t = OffsetTracker::new();
        t.started("r", 0, 0);
        t.started("r", 1, 0);
        t.revoke("r", 0);
        assert_eq!(t.in_flight(), 1);
        t.done("r", 0, 0);
        t.done("r", 1, 0);
        assert_eq!(commits(&mut t), [c("r", 1, 1)]);
    }

    #[test]
    fn a_gap_of_expired_records_is_passed_once_the_records_before_it_are_done() {
        let mut t = OffsetTracker::new();
        t.started("f", 0, 3);
        t.started("f", 0, 4);
        t.done("f", 0, 3);
        assert_eq!(commits(&mut t), [c("f", 0, 4)]);
        // 5..80 expired; the next record read is 80.
        t.passed("f", 0, 80);
        t.started("f", 0, 80);
        assert!(commits(&mut t).is_empty(), "4 still blocks");
        t.done("f", 0, 4);
        assert_eq!(commits(&mut t), [c("f", 0, 80)], "past the gap, before 80");
        t.done("f", 0, 80);
        assert_eq!(commits(&mut t), [c("f", 0, 81)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn a_gap_with_nothing_in_flight_moves_the_commit_at_once() {
        let mut t = OffsetTracker::new();
        // After a restart: nothing started, the checkpoint below the log start.
        t.passed("f", 1, 40);
        assert_eq!(commits(&mut t), [c("f", 1, 40)]);
        assert_eq!(t.in_flight(), 0);
        // A gap that is not past what was read (a late report) changes nothing.
        t.started("f", 1, 40);
        t.passed("f", 1, 30);
        t.passed("f", 1, 41);
        assert!(commits(&mut t).is_empty());
        t.done("f", 1, 40);
        assert_eq!(commits(&mut t), [c("f", 1, 41)]);
    }

    /// Random ack orders against a model: every committed position must have every started
    /// offset below it done, and once all are done the last one must be committed.
    #[test]
    fn random_ack_orders_never_commit_past_an_unfinished_record() {
        let mut seed: u64 = 42;
        let mut next = move |n: usize| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) as usize % n
        };
        for _ in 0..200 {
            let mut t = OffsetTracker::new();
            let mut offset = 0;
            let mut started = Vec::new();
            for _ in 0..50 {
                offset += 1 + next(3) as i64; // gaps
                t.started("r", 0, offset);
                started.push(offset);
            }
            let mut pending = started.clone();
            let mut last = None;
            while !pending.is_empty() {
                let o = pending.swap_remove(next(pending.len()));
                t.done("r", 0, o);
                for (_, _, at) in commits(&mut t) {
                    assert!(last.is_none_or(|l| at > l));
                    assert!(pending.iter().all(|&p| p >= at), "{at} passes {pending:?}");
                    last = Some(at);
                }
            }
            assert_eq!(last, Some(offset + 1));
            assert_eq!(t.in_flight(), 0);
        }
    }
}
