//! The uplink's chunk bookkeeping: frames that reach the local topic in chunks are reassembled
//! (to be decided by the rules, thumbnailed, and chunked again for the cloud's limit), and every
//! local position that carried a chunk must end *done* so the checkpoint can pass it.
//!
//! [`Aggregator`] reports a frame once (complete, incomplete, rejected) and says nothing about a
//! chunk that changed nothing: a duplicate of a chunk it holds, or a chunk of a frame it already
//! finished (the same chunked frame written twice, a late chunk of a frame given up on). Such a
//! position would wait forever and wedge the checkpoint. So [`Reassembly`]
//!
//! - attaches a duplicate of a held chunk to its frame: it ends with the frame;
//! - hands back at once the position of a chunk of a finished frame (the aggregator's
//!   `after_finish` count tells), to be marked done with nothing sent;
//! - sweeps positions whose frame the aggregator no longer holds past its time-out (none should
//!   be left; this is the guard that keeps a bookkeeping gap from ever wedging the checkpoint).
//!
//! Plain data, no I/O: tested without a broker.

use fovea_proto::chunks::{Aggregator, Limits, Outcome};
use fovea_proto::v1::FrameChunk;
use prost::bytes::Bytes;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A local offset: (topic, partition, offset).
pub type Pos = (String, i32, i64);

/// `(camera_id, frame_id)`, as the aggregator keys frames.
type Key = (String, String);

/// What became of chunk positions.
#[derive(Debug)]
pub enum Event {
    /// A frame was reassembled: its encoded `Frame`, and every position that carried a chunk of
    /// it (duplicates included).
    Complete { payload: Bytes, positions: Vec<Pos> },
    /// Positions of a frame given up on (incomplete, rejected, or held too long): done with
    /// nothing sent. `why` is for the log.
    Dropped { positions: Vec<Pos>, why: String },
    /// The position of a chunk of a frame already complete or given up on (a duplicate or a late
    /// chunk): done with nothing sent.
    Late { position: Pos },
}

struct Held {
    positions: Vec<Pos>,
    since: Instant,
}

pub struct Reassembly {
    aggregator: Aggregator,
    held: HashMap<Key, Held>,
    /// Positions held longer than this are swept (the aggregator's time-out, twice).
    sweep_after: Duration,
}

impl Reassembly {
    pub fn new(limits: Limits) -> Reassembly {
        Reassembly {
            sweep_after: limits.timeout.saturating_mul(2),
            aggregator: Aggregator::new(limits),
            held: HashMap::new(),
        }
    }

    /// Feeds the chunk read at `pos`.
    pub fn push(&mut self, chunk: FrameChunk, pos: Pos, now: Instant) -> Vec<Event> {
        let key = (chunk.camera_id.clone(), chunk.frame_id.clone());
        self.held
            .entry(key.clone())
            .or_insert_with(|| Held {
                positions: Vec::new(),
                since: now,
            })
            .positions
            .push(pos);
        let late_before = self.aggregator.stats().after_finish;
        let outcomes = self.aggregator.push(chunk, now);
        let mut events = self.resolve(outcomes);
        if self.aggregator.stats().after_finish > late_before
            && let Some(held) = self.held.remove(&key)
        {
            // Held only this chunk: the frame's own positions went with its outcome.
            events.extend(
                held.positions
                    .into_iter()
                    .map(|position| Event::Late { position }),
            );
        }
        events
    }

    /// Frames past the time-out (incomplete), then any positions still held past twice that.
    pub fn expire(&mut self, now: Instant) -> Vec<Event> {
        let outcomes = self.aggregator.expire(now);
        let mut events = self.resolve(outcomes);
        let stale: Vec<Key> = self
            .held
            .iter()
            .filter(|(_, h)| now.saturating_duration_since(h.since) > self.sweep_after)
            .map(|(k, _)| k.clone())
            .collect();
        for key in stale {
            if let Some(held) = self.held.remove(&key) {
                events.push(Event::Dropped {
                    positions: held.positions,
                    why: format!("frame {} (camera {}) held too long", key.1, key.0),
                });
            }
        }
        events
    }

    /// Positions waiting for their frame to complete.
    pub fn held(&self) -> usize {
        self.held.values().map(|h| h.positions.len()).sum()
    }

    fn resolve(&mut self, outcomes: Vec<Outcome>) -> Vec<Event> {
        outcomes
            .into_iter()
            .map(|outcome| match outcome {
                Outcome::Complete(done) => Event::Complete {
                    positions: self.take(&done.camera_id, &done.frame_id),
                    payload: done.payload,
                },
                Outcome::Incomplete {
                    frame_id,
                    camera_id,
                    received,
                    count,
                    reason,
                    ..
                } => Event::Dropped {
                    positions: self.take(&camera_id, &frame_id),
                    why: format!(
                        "frame {frame_id} (camera {camera_id}) incomplete: {received} of {count} \
                         chunks ({reason:?})"
                    ),
                },
                Outcome::Rejected {
                    frame_id,
                    camera_id,
                    reason,
                } => Event::Dropped {
                    positions: self.take(&camera_id, &frame_id),
                    why: format!("frame {frame_id} (camera {camera_id}) rejected: {reason}"),
                },
            })
            .collect()
    }

    fn take(&mut self, camera: &str, frame: &str) -> Vec<Pos> {
        self.held
            .remove(&(camera.to_string(), frame.to_string()))
            .map(|h| h.positions)
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::uplink::offsets::OffsetTracker;
    use fovea_proto::chunks;

    const TOPIC: &str = "fovea.frames";

    fn limits() -> Limits {
        Limits {
            timeout: Duration::from_secs(10),
            ..Limits::default()
        }
    }

    fn chunks_of(camera: &str, frame: &str, size: usize) -> Vec<FrameChunk> {
        let payload: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        chunks::split(
            frame,
            camera,
            "fovea.v1.Frame",
            &Default::default(),
            &payload,
            1000,
        )
        .unwrap()
    }

    /// Reads `chunks` as consecutive offsets from `next`, marking done what comes back; returns
    /// the completed frames.
    fn read(
        r: &mut Reassembly,
        t: &mut OffsetTracker,
        next: &mut i64,
        chunks: Vec<FrameChunk>,
        now: Instant,
    ) -> usize {
        let mut complete = 0;
        for c in chunks {
            t.started(TOPIC, 0, *next);
            let events = r.push(c, (TOPIC.into(), 0, *next), now);
            *next += 1;
            complete += finish(t, events);
        }
        complete
    }

    fn finish(t: &mut OffsetTracker, events: Vec<Event>) -> usize {
        let mut complete = 0;
        for e in events {
            let positions = match e {
                Event::Complete { positions, .. } => {
                    complete += 1;
                    positions
                }
                Event::Dropped { positions, .. } => positions,
                Event::Late { position } => vec![position],
            };
            for (topic, p, o) in positions {
                t.done(&topic, p, o);
            }
        }
        complete
    }

    fn committed(t: &mut OffsetTracker) -> Option<i64> {
        t.committable().last().map(|(_, _, o)| *o)
    }

    #[test]
    fn a_frame_completes_with_all_its_positions() {
        let (mut r, mut t, mut next) = (Reassembly::new(limits()), OffsetTracker::new(), 0);
        let parts = chunks_of("cam", "f1", 4500);
        assert_eq!(parts.len(), 5);
        let now = Instant::now();
        assert_eq!(read(&mut r, &mut t, &mut next, parts, now), 1);
        assert_eq!(committed(&mut t), Some(5));
        assert_eq!((t.in_flight(), r.held()), (0, 0));
    }

    #[test]
    fn the_same_chunked_frame_written_twice_does_not_wedge_the_checkpoint() {
        let (mut r, mut t, mut next) = (Reassembly::new(limits()), OffsetTracker::new(), 0);
        let now = Instant::now();
        let parts = chunks_of("cam", "f1", 4500);
        assert_eq!(read(&mut r, &mut t, &mut next, parts.clone(), now), 1);
        // The second copy is not sent again, and each of its positions is done at once.
        assert_eq!(read(&mut r, &mut t, &mut next, parts, now), 0);
        assert_eq!(committed(&mut t), Some(10));
        // Later frames still go, and the checkpoint follows them.
        let later = chunks_of("cam", "f2", 2500);
        assert_eq!(read(&mut r, &mut t, &mut next, later, now), 1);
        assert_eq!(committed(&mut t), Some(13));
        assert_eq!((t.in_flight(), r.held()), (0, 0));
    }

    #[test]
    fn a_duplicate_of_a_held_chunk_ends_with_its_frame() {
        let (mut r, mut t, mut next) = (Reassembly::new(limits()), OffsetTracker::new(), 0);
        let now = Instant::now();
        let parts = chunks_of("cam", "f1", 2500);
        let twice = vec![
            parts[0].clone(),
            parts[1].clone(),
            parts[0].clone(),
            parts[1].clone(),
        ];
        assert_eq!(read(&mut r, &mut t, &mut next, twice, now), 0);
        assert_eq!((r.held(), committed(&mut t)), (4, None));
        assert_eq!(
            read(&mut r, &mut t, &mut next, vec![parts[2].clone()], now),
            1
        );
        assert_eq!(committed(&mut t), Some(5));
    }

    #[test]
    fn interleaved_cameras_and_an_incomplete_frame_all_end_done() {
        let (mut r, mut t, mut next) = (Reassembly::new(limits()), OffsetTracker::new(), 0);
        let now = Instant::now();
        let a = chunks_of("a", "f1", 2500);
        let b = chunks_of("b", "f1", 2500);
        // a's chunk 1 never comes; b's frame (same frame id, other camera) completes.
        let order = vec![
            a[0].clone(),
            b[0].clone(),
            b[1].clone(),
            a[2].clone(),
            b[2].clone(),
        ];
        assert_eq!(read(&mut r, &mut t, &mut next, order, now), 1);
        assert_eq!((r.held(), committed(&mut t)), (2, None), "a's chunks wait");
        // Before the time-out nothing changes; after it a's positions are dropped.
        assert_eq!(finish(&mut t, r.expire(now + Duration::from_secs(5))), 0);
        assert_eq!(committed(&mut t), None);
        assert_eq!(finish(&mut t, r.expire(now + Duration::from_secs(11))), 0);
        assert_eq!(committed(&mut t), Some(5));
        // A late chunk of the given-up frame is dropped at once.
        assert_eq!(read(&mut r, &mut t, &mut next, vec![a[1].clone()], now), 0);
        assert_eq!(committed(&mut t), Some(6));
        assert_eq!((t.in_flight(), r.held()), (0, 0));
    }

    #[test]
    fn a_rejected_frame_drops_every_position_of_it() {
        let (mut r, mut t, mut next) = (Reassembly::new(limits()), OffsetTracker::new(), 0);
        let now = Instant::now();
        let parts = chunks_of("cam", "f1", 2500);
        let mut liar = parts[1].clone();
        liar.total_size += 1; // disagrees with chunk 0
        assert_eq!(
            read(&mut r, &mut t, &mut next, vec![parts[0].clone(), liar], now),
            0
        );
        assert_eq!(committed(&mut t), Some(2));
        // The rest of it, now late, goes the same way.
        assert_eq!(
            read(&mut r, &mut t, &mut next, vec![parts[2].clone()], now),
            0
        );
        assert_eq!(committed(&mut t), Some(3));
    }

    #[test]
    fn positions_nothing_resolves_are_swept() {
        let (mut r, mut t) = (Reassembly::new(limits()), OffsetTracker::new());
        let now = Instant::now();
        // A position held with no frame in the aggregator (as a bookkeeping gap would leave it).
        t.started(TOPIC, 0, 0);
        r.held.insert(
            ("cam".into(), "ghost".into()),
            Held {
                positions: vec![(TOPIC.into(), 0, 0)],
                since: now,
            },
        );
        assert_eq!(finish(&mut t, r.expire(now + Duration::from_secs(15))), 0);
        assert_eq!(committed(&mut t), None, "not before twice the time-out");
        finish(&mut t, r.expire(now + Duration::from_secs(21)));
        assert_eq!((committed(&mut t), r.held()), (Some(1), 0));
    }
}
