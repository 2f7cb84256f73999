//! `FrameChunk` decoding (prost) and the chunk `Aggregator`, driven by a sequence of chunks.
//!
//! Input (`fovea::fuzzing`): four bytes of small aggregator limits, then pieces, each pushed
//! as a `FrameChunk` decoded from its bytes or, by its tag, advancing the clock and expiring.
//! A first byte of `ROUND_TRIP` instead asks for a payload split with `chunks::split` and put
//! back together.
//!
//! Checks, against a model of which frames are in flight: never a panic; a chunk with an empty
//! frame id is rejected alone; a chunk of a recently finished frame changes nothing; every
//! outcome is for a frame in flight or started by that chunk, and ends it (at most one outcome
//! per frame); a frame completes only with the size, chunk count and CRC-32C its first chunk
//! gave; an incomplete frame lists at most `MISSING_LISTED` missing indexes, in order, below its
//! count; expiring gives up on exactly the frames older than the timeout; in-flight frames and
//! bytes are what the model says and never over the limits. Round trip: every chunk encodes
//! within the limit and the frame completes exactly once, byte for byte.
#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use fovea_fuzz::{EXPIRE, ROUND_TRIP, aggregator_limits, pieces};
use fovea_proto::chunks::{
    Aggregator, ChunkError, IncompleteReason, Limits, MISSING_LISTED, Outcome, split,
};
use fovea_proto::v1::FrameChunk;
use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| match data {
    [ROUND_TRIP, a, b, payload @ ..] =>
        round_trip(usize::from(u16::from_le_bytes([*a, *b])), payload),
    [a, b, c, d, steps @ ..] => sequence(aggregator_limits([*a, *b, *c, *d]), steps),
    _ => {}
});

/// What the first chunk of a frame in flight said, and when it came.
struct Started {
    total_size: u64,
    count: u32,
    crc32c: u32,
    at: Instant,
}

type Key = (String, String);

fn sequence(limits: Limits, steps: &[u8]) {
    let mut aggregator = Aggregator::new(limits.clone());
    let max_frames = limits.max_frames_in_flight.max(1);
    let mut in_flight: HashMap<Key, Started> = HashMap::new();
    let mut now = Instant::now();
    for (tag, piece) in pieces(steps) {
        if tag >= EXPIRE {
            now += Duration::from_millis(100) * u32::from(tag - EXPIRE);
            let outcomes = aggregator.expire(now);
            for outcome in &outcomes {
                let started = end(&mut in_flight, outcome);
                assert!(now.duration_since(started.at) > limits.timeout);
                assert!(matches!(
                    outcome,
                    Outcome::Incomplete {
                        reason: IncompleteReason::TimedOut,
                        ..
                    }
                ));
            }
            assert!(
                in_flight
                    .values()
                    .all(|s| now.duration_since(s.at) <= limits.timeout),
                "a frame older than the timeout is still in flight"
            );
        } else {
            let Ok(chunk) = FrameChunk::decode(piece) else {
                continue;
            };
            push(&mut aggregator, &mut in_flight, chunk, now);
        }
        let (frames, bytes) = aggregator.in_flight();
        assert_eq!(frames, in_flight.len());
        assert_eq!(bytes, in_flight.values().map(|s| s.total_size).sum::<u64>());
        assert!(
            frames <= max_frames,
            "{frames} frames in flight, limit {max_frames}"
        );
        assert!(
            bytes <= limits.max_bytes_in_flight,
            "{bytes} bytes in flight"
        );
    }
}

fn push(
    aggregator: &mut Aggregator,
    in_flight: &mut HashMap<Key, Started>,
    chunk: FrameChunk,
    now: Instant,
) {
    let key = (chunk.camera_id.clone(), chunk.frame_id.clone());
    let after_finish = aggregator.stats().after_finish;
    let started = Started {
        total_size: chunk.total_size,
        count: chunk.count,
        crc32c: chunk.crc32c,
        at: now,
    };
    let outcomes = aggregator.push(chunk, now);
    if key.1.is_empty() {
        assert!(
            matches!(
                &outcomes[..],
                [Outcome::Rejected {
                    reason: ChunkError::EmptyFrameId,
                    ..
                }]
            ),
            "{outcomes:?}"
        );
        return;
    }
    if aggregator.stats().after_finish > after_finish {
        assert!(
            outcomes.is_empty(),
            "a late chunk changed something: {outcomes:?}"
        );
        return;
    }
    in_flight.entry(key).or_insert(started);
    for outcome in &outcomes {
        end(in_flight, outcome);
    }
}

/// Checks an outcome against the frame it ends, and forgets the frame.
fn end(in_flight: &mut HashMap<Key, Started>, outcome: &Outcome) -> Started {
    let (camera, frame) = outcome.key();
    let key = (camera.to_string(), frame.to_string());
    let started = in_flight
        .remove(&key)
        .unwrap_or_else(|| panic!("an outcome for a frame not in flight: {outcome:?}"));
    match outcome {
        Outcome::Complete(a) => {
            assert_eq!(a.payload.len() as u64, started.total_size);
            assert_eq!(a.chunks, started.count);
            assert_eq!(crc32c::crc32c(&a.payload), started.crc32c);
        }
        Outcome::Incomplete {
            received,
            count,
            missing,
            ..
        } => {
            assert_eq!(*count, started.count);
            assert!(received < count);
            assert!(!missing.is_empty() && missing.len() <= MISSING_LISTED);
            assert!(missing.windows(2).all(|w| w[0] < w[1]));
            assert!(missing.iter().all(|i| i < count));
        }
        Outcome::Rejected { reason, .. } => {
            let _ = reason.to_string();
        }
    }
    started
}

fn round_trip(max_chunk_bytes: usize, payload: &[u8]) {
    let meta = HashMap::from([("site".to_string(), "dock".to_string())]);
    let Ok(chunks) = split(
        "node/cam/s1",
        "cam",
        "image/png",
        &meta,
        payload,
        max_chunk_bytes,
    ) else {
        return;
    };
    let mut aggregator = Aggregator::new(Limits::default());
    let now = Instant::now();
    let mut outcomes = Vec::new();
    // Backwards, each through its encoding, and chunk 0 once more after the frame completed.
    for chunk in chunks.iter().rev().chain(chunks.first()) {
        let bytes = chunk.encode_to_vec();
        assert!(
            bytes.len() <= max_chunk_bytes,
            "a chunk of {} bytes",
            bytes.len()
        );
        let decoded = FrameChunk::decode(&bytes[..]).expect("a chunk decodes");
        assert_eq!(&decoded, chunk);
        outcomes.extend(aggregator.push(decoded, now));
    }
    let [Outcome::Complete(frame)] = &outcomes[..] else {
        panic!("{} chunks gave {outcomes:?}", chunks.len());
    };
    assert_eq!(&frame.payload[..], payload);
    assert_eq!(frame.chunks as usize, chunks.len());
    assert_eq!(frame.metadata, meta);
    assert_eq!(aggregator.in_flight(), (0, 0));
}
