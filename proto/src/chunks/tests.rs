//! Splitting and reassembly together: round trips, disorder, duplicates, loss, bounds, and a
//! seeded random model of many interleaved frames.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use prost::Message;
use prost::bytes::Bytes;

use super::*;
use crate::v1::FrameChunk;

const TIMEOUT: Duration = Duration::from_secs(10);

/// SplitMix64: a small deterministic PRNG, so failures reproduce from the seed.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi`.
    fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next() % (hi - lo) as u64) as usize
    }

    fn shuffle<T>(&mut self, items: &mut [T]) {
        for i in (1..items.len()).rev() {
            items.swap(i, self.range(0, i + 1));
        }
    }
}

fn payload(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = Rng(seed);
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        out.extend_from_slice(&rng.next().to_le_bytes());
    }
    out.truncate(len);
    out
}

fn limits() -> Limits {
    Limits {
        max_frame_bytes: 64 << 20,
        max_frames_in_flight: 64,
        max_bytes_in_flight: 256 << 20,
        timeout: TIMEOUT,
    }
}

fn meta() -> HashMap<String, String> {
    [
        ("site".to_owned(), "dock-3".to_owned()),
        ("exposure_us".to_owned(), "1250".to_owned()),
    ]
    .into()
}

fn chunks_of(frame: &str, camera: &str, data: &[u8], max: usize) -> Vec<FrameChunk> {
    let chunks = split(frame, camera, "image/jpeg", &meta(), data, max).unwrap();
    for chunk in &chunks {
        assert!(
            chunk.encoded_len() <= max,
            "chunk {} of {frame}",
            chunk.index
        );
    }
    chunks
}

fn push_all(
    aggregator: &mut Aggregator,
    chunks: impl IntoIterator<Item = FrameChunk>,
    now: Instant,
) -> Vec<Outcome> {
    chunks
        .into_iter()
        .flat_map(|chunk| aggregator.push(chunk, now))
        .collect()
}

fn completed(outcomes: &[Outcome]) -> Vec<&Assembled> {
    outcomes
        .iter()
        .map(|o| match o {
            Outcome::Complete(a) => a,
            other => panic!("expected only completions, got {other:?}"),
        })
        .collect()
}

fn only_rejection(outcomes: &[Outcome]) -> &ChunkError {
    match outcomes {
        [Outcome::Rejected { reason, .. }] => reason,
        other => panic!("expected one rejection, got {other:?}"),
    }
}

fn round_trip(len: usize, max: usize) -> usize {
    let data = payload(len, len as u64);
    let chunks = chunks_of("s1", "cam-1", &data, max);
    let n = chunks.len();
    let mut aggregator = Aggregator::new(limits());
    let outcomes = push_all(&mut aggregator, chunks, Instant::now());
    let done = completed(&outcomes);
    assert_eq!(done.len(), 1, "len {len}");
    assert_eq!(done[0].payload, data, "len {len}");
    assert_eq!(done[0].chunks as usize, n);
    assert_eq!(done[0].metadata, meta());
    assert_eq!(done[0].content_type, "image/jpeg");
    assert_eq!(aggregator.in_flight(), (0, 0));
    n
}

#[test]
fn round_trip_empty_one_byte_and_around_the_limit() {
    // Empty payload: one chunk without data (documented), reassembled to an empty payload.
    assert_eq!(round_trip(0, 200), 1);
    assert_eq!(round_trip(1, 200), 1);

    // The largest payload whose single chunk encodes to exactly the limit.
    let max = 1000;
    let exact = (0..max)
        .rev()
        .find(|&len| {
            let chunks = split("s1", "cam-1", "image/jpeg", &meta(), &vec![0; len], 1 << 20);
            chunks.unwrap()[0].encoded_len() == max
        })
        .unwrap();
    let one = chunks_of("s1", "cam-1", &vec![0; exact], max);
    assert_eq!(one.len(), 1);
    assert_eq!(one[0].encoded_len(), max);
    assert_eq!(round_trip(exact, max), 1);
    assert_eq!(round_trip(exact + 1, max), 2);
}

#[test]
fn round_trip_50_mb_in_1_mib_chunks() {
    let max = 1 << 20;
    let data = payload(50 << 20, 5);
    let mut chunks = chunks_of("node-1/cam-1/s9", "cam-1", &data, max);
    assert_eq!(chunks.len(), 51);
    // Full chunks: every one but the last carries the same stride, within a few hundred
    // bytes of the limit.
    assert!(chunks[0].data.len() > max - 200);
    Rng(1).shuffle(&mut chunks);
    let mut aggregator = Aggregator::new(limits());
    let outcomes = push_all(&mut aggregator, chunks, Instant::now());
    let done = completed(&outcomes);
    assert_eq!(done.len(), 1);
    assert!(done[0].payload == data);
}

#[test]
fn every_chunk_fits_including_chunk_0_with_metadata() {
    let big_meta: HashMap<String, String> = (0..20)
        .map(|i| (format!("key-{i}"), "v".repeat(i * 7)))
        .collect();
    for (len, max) in [
        (100_000, 4096),
        (100_000, 2000),
        (5000, 1700),
        (70_000, 1650),
    ] {
        let data = payload(len, 3);
        let chunks = split("s1", "cam-1", "image/png", &big_meta, &data, max).unwrap();
        assert!(chunks.iter().all(|c| c.encoded_len() <= max), "{len}/{max}");
        assert_eq!(chunks[0].metadata, big_meta);
        assert!(chunks[1..].iter().all(|c| c.metadata.is_empty()));
        let mut aggregator = Aggregator::new(limits());
        let outcomes = push_all(&mut aggregator, chunks, Instant::now());
        assert_eq!(completed(&outcomes)[0].metadata, big_meta);
    }
}

#[test]
fn single_chunk_frame_completes_at_once_without_buffering() {
    let data = payload(300, 1);
    let chunks = chunks_of("s1", "cam-1", &data, 1000);
    assert_eq!(chunks.len(), 1);
    let mut aggregator = Aggregator::new(limits());
    let outcomes = aggregator.push(chunks[0].clone(), Instant::now());
    assert_eq!(completed(&outcomes)[0].payload, data);
    assert_eq!(aggregator.in_flight(), (0, 0));
    // Its duplicate is ignored.
    assert!(
        aggregator
            .push(chunks[0].clone(), Instant::now())
            .is_empty()
    );
    assert_eq!(aggregator.stats().after_finish, 1);
}

#[test]
fn shuffled_order_reassembles() {
    let data = payload(20_000, 2);
    let mut chunks = chunks_of("s1", "cam-1", &data, 500);
    let n = chunks.len();
    let mut rng = Rng(7);
    rng.shuffle(&mut chunks);
    let mut aggregator = Aggregator::new(limits());
    let now = Instant::now();
    let (last, rest) = chunks.split_last().unwrap();
    for chunk in rest {
        assert!(aggregator.push(chunk.clone(), now).is_empty());
    }
    assert_eq!(aggregator.in_flight(), (1, 20_000));
    let outcomes = aggregator.push(last.clone(), now);
    let done = completed(&outcomes);
    assert_eq!(done[0].payload, data);
    assert_eq!(done[0].chunks as usize, n);
    assert_eq!(aggregator.in_flight(), (0, 0));
}

#[test]
fn interleaved_frames_of_10_cameras() {
    let mut rng = Rng(10);
    let mut expected = HashMap::new();
    let mut all = Vec::new();
    for cam in 0..10 {
        for seq in 0..3 {
            // Every camera uses the same frame ids: the key is (camera, frame).
            let (camera, frame) = (format!("cam-{cam}"), format!("s{seq}"));
            let data = payload(rng.range(1, 30_000), rng.next());
            all.extend(chunks_of(&frame, &camera, &data, 1024));
            expected.insert((camera, frame), data);
        }
    }
    rng.shuffle(&mut all);
    let mut aggregator = Aggregator::new(limits());
    let outcomes = push_all(&mut aggregator, all, Instant::now());
    let done = completed(&outcomes);
    assert_eq!(done.len(), 30);
    for a in done {
        let data = expected
            .remove(&(a.camera_id.clone(), a.frame_id.clone()))
            .unwrap();
        assert_eq!(a.payload, data);
    }
    assert!(expected.is_empty());
}

#[test]
fn duplicates_are_ignored_not_double_counted() {
    let data = payload(5000, 4);
    let chunks = chunks_of("s1", "cam-1", &data, 600);
    let mut aggregator = Aggregator::new(limits());
    let now = Instant::now();
    let (last, rest) = chunks.split_last().unwrap();
    for chunk in rest.iter().chain(rest.iter()) {
        assert!(aggregator.push(chunk.clone(), now).is_empty());
    }
    assert_eq!(aggregator.stats().duplicates, rest.len() as u64);
    let outcomes = aggregator.push(last.clone(), now);
    assert_eq!(completed(&outcomes)[0].payload, data);
}

#[test]
fn duplicate_index_with_other_data_rejects_the_frame() {
    let data = payload(5000, 4);
    let chunks = chunks_of("s1", "cam-1", &data, 600);
    let mut aggregator = Aggregator::new(limits());
    let now = Instant::now();
    assert!(aggregator.push(chunks[1].clone(), now).is_empty());
    let mut forged = chunks[1].clone();
    let mut bytes = forged.data.to_vec();
    bytes[10] ^= 1;
    forged.data = Bytes::from(bytes);
    let outcomes = aggregator.push(forged, now);
    assert_eq!(
        only_rejection(&outcomes),
        &ChunkError::DuplicateMismatch { index: 1 }
    );
    assert_eq!(aggregator.in_flight(), (0, 0));
    // The rest of the frame is ignored, and nothing times out later.
    assert!(push_all(&mut aggregator, chunks, now).is_empty());
    assert!(aggregator.expire(now + 2 * TIMEOUT).is_empty());
}

#[test]
fn missing_chunk_times_out_and_later_frames_are_unaffected() {
    let data = payload(10_000, 6);
    let mut chunks = chunks_of("s1", "cam-1", &data, 1000);
    assert!(chunks.len() > 6);
    chunks.remove(5);
    chunks.remove(2);
    let mut aggregator = Aggregator::new(limits());
    let t0 = Instant::now();
    assert!(push_all(&mut aggregator, chunks.clone(), t0).is_empty());

    // The next frame of the same camera completes while s1 waits.
    let next = payload(3000, 7);
    let outcomes = push_all(
        &mut aggregator,
        chunks_of("s2", "cam-1", &next, 1000),
        t0 + Duration::from_secs(1),
    );
    assert_eq!(completed(&outcomes)[0].payload, next);

    // Not before the timeout.
    assert!(aggregator.expire(t0 + TIMEOUT).is_empty());
    let outcomes = aggregator.expire(t0 + TIMEOUT + Duration::from_millis(1));
    assert_eq!(
        outcomes,
        vec![Outcome::Incomplete {
            frame_id: "s1".into(),
            camera_id: "cam-1".into(),
            received: chunks.len() as u32,
            count: chunks.len() as u32 + 2,
            missing: vec![2, 5],
            reason: IncompleteReason::TimedOut,
        }]
    );
    assert_eq!(aggregator.in_flight(), (0, 0));
    // A straggler of the expired frame does not start it again.
    let straggler = split("s1", "cam-1", "image/jpeg", &meta(), &data, 1000).unwrap();
    assert!(
        aggregator
            .push(straggler[5].clone(), t0 + 2 * TIMEOUT)
            .is_empty()
    );
    assert!(aggregator.expire(t0 + 10 * TIMEOUT).is_empty());
}

#[test]
fn missing_list_is_capped() {
    let chunks = chunks_of("s1", "cam-1", &payload(50_000, 8), 200);
    let mut aggregator = Aggregator::new(limits());
    let t0 = Instant::now();
    let n = chunks.len() as u32;
    push_all(&mut aggregator, chunks.into_iter().skip(100), t0);
    match &aggregator.expire(t0 + 2 * TIMEOUT)[..] {
        [
            Outcome::Incomplete {
                received,
                count,
                missing,
                ..
            },
        ] => {
            assert_eq!((*received, *count), (n - 100, n));
            assert_eq!(missing, &(0..MISSING_LISTED as u32).collect::<Vec<_>>());
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn consumer_starting_mid_frame_loses_only_that_frame() {
    let first = payload(8000, 9);
    let second = payload(8000, 10);
    let third = payload(100, 11);
    let stream: Vec<FrameChunk> = chunks_of("s1", "cam-1", &first, 1000)
        .into_iter()
        .skip(4)
        .chain(chunks_of("s2", "cam-1", &second, 1000))
        .chain(chunks_of("s3", "cam-1", &third, 1000))
        .collect();
    let mut aggregator = Aggregator::new(limits());
    let t0 = Instant::now();
    let outcomes = push_all(&mut aggregator, stream, t0);
    let done = completed(&outcomes);
    assert_eq!(done.len(), 2);
    assert_eq!(
        (done[0].payload.as_ref(), done[1].payload.as_ref()),
        (&second[..], &third[..])
    );
    match &aggregator.expire(t0 + 2 * TIMEOUT)[..] {
        [
            Outcome::Incomplete {
                frame_id, missing, ..
            },
        ] => {
            assert_eq!(frame_id, "s1");
            assert_eq!(missing, &[0, 1, 2, 3]);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn late_duplicates_after_completion_are_ignored() {
    let data = payload(4000, 12);
    let chunks = chunks_of("s1", "cam-1", &data, 1000);
    let mut aggregator = Aggregator::new(limits());
    let t0 = Instant::now();
    assert_eq!(push_all(&mut aggregator, chunks.clone(), t0).len(), 1);
    // A redelivery of some of its chunks starts nothing.
    assert!(push_all(&mut aggregator, chunks[1..3].to_vec(), t0).is_empty());
    assert_eq!(aggregator.in_flight(), (0, 0));
    assert!(aggregator.expire(t0 + 2 * TIMEOUT).is_empty());
    assert_eq!(aggregator.stats().after_finish, 2);
}

#[test]
fn remembers_only_the_recently_finished() {
    let mut aggregator = Aggregator::new(limits());
    let now = Instant::now();
    let first = chunks_of("f0", "cam-1", b"x", 1000);
    assert_eq!(push_all(&mut aggregator, first.clone(), now).len(), 1);
    for i in 1..=RECENTLY_FINISHED {
        let chunks = chunks_of(&format!("f{i}"), "cam-1", b"y", 1000);
        assert_eq!(push_all(&mut aggregator, chunks, now).len(), 1);
    }
    // f0 fell out of memory: a whole redelivery completes again (consumers dedupe on the
    // record id).
    assert_eq!(push_all(&mut aggregator, first, now).len(), 1);
}

#[test]
fn eviction_by_frames_in_flight() {
    let mut aggregator = Aggregator::new(Limits {
        max_frames_in_flight: 3,
        ..limits()
    });
    let t0 = Instant::now();
    let frames: Vec<Vec<FrameChunk>> = (0..4)
        .map(|i| chunks_of(&format!("s{i}"), "cam-1", &payload(5000, i), 1000))
        .collect();
    for (i, chunks) in frames.iter().take(3).enumerate() {
        let t = t0 + Duration::from_secs(i as u64);
        assert!(aggregator.push(chunks[0].clone(), t).is_empty());
    }
    assert_eq!(aggregator.in_flight(), (3, 15_000));
    // A fourth frame evicts the oldest, s0.
    let outcomes = aggregator.push(frames[3][0].clone(), t0 + Duration::from_secs(3));
    match &outcomes[..] {
        [
            Outcome::Incomplete {
                frame_id,
                received: 1,
                reason: IncompleteReason::Evicted,
                ..
            },
        ] => assert_eq!(frame_id, "s0"),
        other => panic!("{other:?}"),
    }
    assert_eq!(aggregator.in_flight(), (3, 15_000));
    // The others still complete; s0's remaining chunks are ignored.
    for chunks in &frames[1..] {
        let outcomes = push_all(&mut aggregator, chunks[1..].to_vec(), t0);
        assert_eq!(completed(&outcomes).len(), 1);
    }
    assert!(push_all(&mut aggregator, frames[0].clone(), t0).is_empty());
    assert_eq!(aggregator.in_flight(), (0, 0));
}

#[test]
fn eviction_by_bytes_in_flight() {
    let mut aggregator = Aggregator::new(Limits {
        max_bytes_in_flight: 20_000,
        ..limits()
    });
    let now = Instant::now();
    let a = chunks_of("a", "cam-1", &payload(8000, 1), 1000);
    let b = chunks_of("b", "cam-2", &payload(8000, 2), 1000);
    let c = chunks_of("c", "cam-3", &payload(12_000, 3), 1000);
    assert!(aggregator.push(a[0].clone(), now).is_empty());
    assert!(aggregator.push(b[0].clone(), now).is_empty());
    assert_eq!(aggregator.in_flight(), (2, 16_000));
    // c needs 12 000: evicting a leaves 8 000 + 12 000, which fits.
    let outcomes = aggregator.push(c[0].clone(), now);
    match &outcomes[..] {
        [
            Outcome::Incomplete {
                frame_id,
                reason: IncompleteReason::Evicted,
                ..
            },
        ] => assert_eq!(frame_id, "a"),
        other => panic!("{other:?}"),
    }
    assert_eq!(aggregator.in_flight(), (2, 20_000));
}

#[test]
fn too_large_frame_is_rejected_at_its_first_chunk() {
    let mut aggregator = Aggregator::new(Limits {
        max_frame_bytes: 10_000,
        ..limits()
    });
    let now = Instant::now();
    let chunks = chunks_of("s1", "cam-1", &payload(10_001, 1), 1000);
    let outcomes = aggregator.push(chunks[3].clone(), now);
    assert_eq!(
        only_rejection(&outcomes),
        &ChunkError::TooLarge {
            total_size: 10_001,
            limit: 10_000
        }
    );
    assert_eq!(aggregator.in_flight(), (0, 0));
    // Its other chunks are neither buffered nor rejected again.
    assert!(push_all(&mut aggregator, chunks, now).is_empty());
    assert_eq!(aggregator.in_flight(), (0, 0));
    // At the limit it is fine.
    let ok = chunks_of("s2", "cam-1", &payload(10_000, 1), 1000);
    assert_eq!(completed(&push_all(&mut aggregator, ok, now)).len(), 1);
}

#[test]
fn corrupted_data_fails_the_checksum() {
    let data = payload(5000, 13);
    let mut chunks = chunks_of("s1", "cam-1", &data, 1000);
    let mut bytes = chunks[2].data.to_vec();
    bytes[0] ^= 0x80;
    chunks[2].data = Bytes::from(bytes);
    let mut aggregator = Aggregator::new(limits());
    let outcomes = push_all(&mut aggregator, chunks, Instant::now());
    let expected = crc32c::crc32c(&data);
    let reason = only_rejection(&outcomes);
    let ChunkError::ChecksumMismatch {
        expected: e,
        actual,
    } = reason
    else {
        panic!("{reason:?}");
    };
    assert_eq!(*e, expected);
    assert_ne!(*actual, expected);
    // Also for a single-chunk frame.
    let mut one = chunks_of("s2", "cam-1", b"hello", 1000);
    one[0].data = Bytes::from_static(b"hellO");
    let outcomes = push_all(&mut aggregator, one, Instant::now());
    assert!(matches!(
        only_rejection(&outcomes),
        ChunkError::ChecksumMismatch { .. }
    ));
}

#[test]
fn inconsistent_chunks_reject_the_frame() {
    let data = payload(5000, 14);
    let chunks = chunks_of("s1", "cam-1", &data, 1000);
    let now = Instant::now();
    let cases: [(&str, Corrupt); 4] = [
        ("count", |c| c.count += 1),
        ("total_size", |c| c.total_size += 1),
        ("crc32c", |c| c.crc32c ^= 1),
        ("content_type", |c| c.content_type = "image/png".into()),
    ];
    for (field, corrupt) in cases {
        let mut aggregator = Aggregator::new(limits());
        assert!(aggregator.push(chunks[0].clone(), now).is_empty());
        let mut bad = chunks[1].clone();
        corrupt(&mut bad);
        let outcomes = aggregator.push(bad, now);
        let reason = only_rejection(&outcomes);
        let ChunkError::Inconsistent { field: f, .. } = reason else {
            panic!("{field}: {reason:?}");
        };
        assert_eq!(*f, field);
        assert!(outcomes_display(&outcomes).contains(field));
        assert_eq!(aggregator.in_flight(), (0, 0));
        assert!(push_all(&mut aggregator, chunks.clone(), now).is_empty());
    }
}

/// Spoils one field of a chunk.
type Corrupt = fn(&mut FrameChunk);

fn outcomes_display(outcomes: &[Outcome]) -> String {
    only_rejection(outcomes).to_string()
}

#[test]
fn malformed_first_chunks_are_rejected() {
    let chunks = chunks_of("s1", "cam-1", &payload(5000, 15), 1000);
    let now = Instant::now();
    let check = |corrupt: fn(&mut FrameChunk), expect: fn(&ChunkError) -> bool| {
        let mut aggregator = Aggregator::new(limits());
        let mut bad = chunks[1].clone();
        corrupt(&mut bad);
        let outcomes = aggregator.push(bad, now);
        let reason = only_rejection(&outcomes);
        assert!(expect(reason), "{reason:?}");
        assert_eq!(aggregator.in_flight(), (0, 0));
    };
    check(|c| c.frame_id.clear(), |e| *e == ChunkError::EmptyFrameId);
    check(|c| c.count = 0, |e| *e == ChunkError::ZeroCount);
    check(
        |c| c.index = c.count,
        |e| matches!(e, ChunkError::IndexOutOfRange { .. }),
    );
    check(
        |c| c.count = 5001,
        |e| matches!(e, ChunkError::TooManyChunks { .. }),
    );
    check(
        |c| c.data = c.data.slice(..10),
        |e| matches!(e, ChunkError::BadLength { .. }),
    );
    check(
        |c| c.data = Bytes::from(vec![0; 6000]),
        |e| matches!(e, ChunkError::DataBeyondTotal { .. }),
    );
}

#[test]
fn chunk_that_breaks_the_stride_rejects_the_frame() {
    let chunks = chunks_of("s1", "cam-1", &payload(5000, 16), 1000);
    let mut aggregator = Aggregator::new(limits());
    let now = Instant::now();
    assert!(aggregator.push(chunks[0].clone(), now).is_empty());
    let mut short = chunks[1].clone();
    short.data = short.data.slice(..short.data.len() - 1);
    let outcomes = aggregator.push(short, now);
    assert!(matches!(
        only_rejection(&outcomes),
        ChunkError::BadLength { index: 1, .. }
    ));
}

/// Several frames, random sizes and limits, chunks interleaved at random, some sent two or
/// three times, some redelivered after their frame completed: every frame comes out exactly
/// once, byte for byte, and nothing is left behind. Every chunk goes through the wire format.
#[test]
fn random_interleavings_reassemble_every_frame_exactly_once() {
    for seed in 0..150 {
        let mut rng = Rng(seed);
        let mut expected: HashMap<(String, String), Vec<u8>> = HashMap::new();
        let mut wire: Vec<Bytes> = Vec::new();
        for f in 0..rng.range(1, 8) {
            let camera = format!("cam-{}", rng.range(0, 3));
            let frame = format!("node-1/{camera}/s{f}");
            let len = match rng.range(0, 4) {
                0 => rng.range(0, 3),
                _ => rng.range(0, 40_000),
            };
            let max = rng.range(90, 5000);
            let data = payload(len, rng.next());
            let mut metadata = HashMap::new();
            for k in 0..rng.range(0, 3) {
                metadata.insert(format!("k{k}"), "x".repeat(rng.range(0, 20)));
            }
            let chunks = split(&frame, &camera, "image/png", &metadata, &data, max).unwrap();
            for chunk in chunks {
                let bytes = Bytes::from(chunk.encode_to_vec());
                assert!(bytes.len() <= max, "seed {seed}");
                for _ in 0..[1, 1, 1, 2, 3][rng.range(0, 5)] {
                    wire.push(bytes.clone());
                }
            }
            expected.insert((camera, frame), data);
        }
        rng.shuffle(&mut wire);

        let mut aggregator = Aggregator::new(limits());
        let now = Instant::now();
        let mut seen = 0;
        for bytes in wire {
            let chunk = FrameChunk::decode(bytes).unwrap();
            for outcome in aggregator.push(chunk, now) {
                let Outcome::Complete(a) = outcome else {
                    panic!("seed {seed}: {outcome:?}");
                };
                let data = expected.remove(&(a.camera_id.clone(), a.frame_id.clone()));
                assert_eq!(Some(&a.payload[..]), data.as_deref(), "seed {seed}");
                seen += 1;
            }
        }
        assert!(
            expected.is_empty(),
            "seed {seed}: {} missing",
            expected.len()
        );
        assert!(seen > 0);
        assert_eq!(aggregator.in_flight(), (0, 0), "seed {seed}");
        assert!(aggregator.expire(now + 2 * TIMEOUT).is_empty());
    }
}
