//! Reassembling frames from their chunks: many frames at once, in any order, bounded.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use prost::bytes::Bytes;

use super::layout;
use crate::v1::FrameChunk;

/// How many recently finished frames (completed, rejected, timed out or evicted) the
/// aggregator remembers, so that late or duplicate chunks of them are ignored instead of
/// starting a new frame that could only time out.
pub const RECENTLY_FINISHED: usize = 1024;

/// How many missing indexes an [`Outcome::Incomplete`] lists at most.
pub const MISSING_LISTED: usize = 16;

/// Bounds on what an [`Aggregator`] holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// A frame whose `total_size` is larger is rejected at its first chunk, without buffering.
    /// (A frame larger than `max_bytes_in_flight` is rejected the same way, as it could never fit.)
    pub max_frame_bytes: u64,
    /// Frames being reassembled at once; a new frame beyond it evicts the oldest. At least 1.
    pub max_frames_in_flight: usize,
    /// Sum of the `total_size` of the frames being reassembled (each is allocated in full at its
    /// first chunk, plus a bitmap of one bit per chunk); a new frame beyond it evicts the oldest
    /// until it fits.
    pub max_bytes_in_flight: u64,
    /// How long after its first chunk a frame may stay incomplete before [`Aggregator::expire`]
    /// gives up on it.
    pub timeout: Duration,
}

impl Default for Limits {
    /// 64 MiB frames, 64 frames and 256 MiB in flight, 30 s to complete.
    fn default() -> Self {
        Self {
            max_frame_bytes: 64 << 20,
            max_frames_in_flight: 64,
            max_bytes_in_flight: 256 << 20,
            timeout: Duration::from_secs(30),
        }
    }
}

/// A reassembled frame: the payload and what its chunks said about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Assembled {
    /// The frame's key, as its chunks gave it.
    pub frame_id: String,
    pub camera_id: String,
    /// From chunk 0, or the first chunk that named one.
    pub content_type: String,
    /// From chunk 0 (or, if it had none, the first chunk that carried any).
    pub metadata: HashMap<String, String>,
    /// The payload, its CRC-32C verified. A `Bytes` so that decoding a `Frame` from it shares
    /// the image bytes instead of copying them.
    pub payload: Bytes,
    /// How many chunks it came in.
    pub chunks: u32,
}

/// Why a frame was given up on without all its chunks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IncompleteReason {
    /// Not complete `timeout` after its first chunk (a lost chunk, or a consumer that started
    /// reading in the middle of the frame).
    TimedOut,
    /// Dropped, oldest first, to make room for a new frame under `max_frames_in_flight` or
    /// `max_bytes_in_flight`.
    Evicted,
}

/// What happened to a frame. Every frame the aggregator sees a valid chunk of ends in exactly
/// one outcome (unless it is still in flight).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Complete(Assembled),
    /// Given up on; `missing` lists the first [`MISSING_LISTED`] indexes that never came.
    Incomplete {
        frame_id: String,
        camera_id: String,
        /// Distinct chunks that did arrive, of `count`.
        received: u32,
        count: u32,
        missing: Vec<u32>,
        reason: IncompleteReason,
    },
    /// A chunk contradicted the frame or the reassembled payload failed its checksum: the
    /// whole frame is dropped.
    Rejected {
        frame_id: String,
        camera_id: String,
        reason: ChunkError,
    },
}

impl Outcome {
    /// The frame it is about: (camera id, frame id).
    pub fn key(&self) -> (&str, &str) {
        match self {
            Outcome::Complete(done) => (&done.camera_id, &done.frame_id),
            Outcome::Incomplete {
                camera_id,
                frame_id,
                ..
            }
            | Outcome::Rejected {
                camera_id,
                frame_id,
                ..
            } => (camera_id, frame_id),
        }
    }
}

/// Why a frame was rejected. Every one means the producer sent something inconsistent (or the
/// bytes were corrupted on the way): nothing to retry; log it, count it, dead-letter it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ChunkError {
    #[error("chunk has an empty frame id")]
    EmptyFrameId,
    #[error("chunk says the frame has 0 chunks")]
    ZeroCount,
    #[error("chunk index {index} is out of range for a frame of {count} chunks")]
    IndexOutOfRange { index: u32, count: u32 },
    #[error("frame of {total_size} bytes exceeds the limit of {limit} bytes")]
    TooLarge { total_size: u64, limit: u64 },
    #[error("a frame of {total_size} bytes cannot come in {count} non-empty chunks")]
    TooManyChunks { count: u32, total_size: u64 },
    #[error("chunk disagrees with the frame's first chunk on {field}: {first}, then {got}")]
    Inconsistent {
        field: &'static str,
        first: String,
        got: String,
    },
    #[error("chunk {index} carries {len} bytes, past the frame's total size of {total_size}")]
    DataBeyondTotal {
        index: u32,
        len: u64,
        total_size: u64,
    },
    #[error(
        "chunk {index} carries {len} bytes, which does not fit a frame of {total_size} bytes in \
         {count} chunks of equal size (stride {stride:?}) and a last chunk of 1 to stride bytes"
    )]
    BadLength {
        index: u32,
        len: u64,
        count: u32,
        total_size: u64,
        stride: Option<u64>,
    },
    #[error("chunk {index} arrived twice with different data")]
    DuplicateMismatch { index: u32 },
    #[error("reassembled payload has CRC-32C {actual:08x}, the chunks say {expected:08x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
}

/// Counters of chunks that changed nothing, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Stats {
    /// Chunks whose index had already arrived with the same data.
    pub duplicates: u64,
    /// Chunks of a recently finished frame (late duplicates, or the rest of a rejected,
    /// timed-out or evicted frame).
    pub after_finish: u64,
}

/// Reassembles the chunks of many frames, interleaved, in any order, with duplicates.
///
/// Frames are keyed by `(camera_id, frame_id)`. A frame's first chunk (whatever its index)
/// fixes its `count`, `total_size` and `crc32c` and allocates the whole payload; every chunk is
/// copied once, straight to its place (see the
/// [layout rule](crate::chunks#the-chunks-of-one-frame)). Memory is bounded by [`Limits`].
/// Nothing here reads the clock: the caller passes `now`, and should call
/// [`expire`](Self::expire) every second or so.
#[derive(Debug)]
pub struct Aggregator {
    limits: Limits,
    frames: HashMap<Key, Pending>,
    /// Frames in flight by arrival of their first chunk: the oldest is evicted first.
    arrival: BTreeMap<u64, Key>,
    next_arrival: u64,
    /// Sum of `total_size` over `frames`.
    bytes: u64,
    /// Keys of the last [`RECENTLY_FINISHED`] finished frames, oldest first, and the same as a set.
    finished_order: VecDeque<Key>,
    finished: HashSet<Key>,
    stats: Stats,
}

/// `(camera_id, frame_id)`.
type Key = (String, String);

/// A frame being reassembled.
#[derive(Debug)]
struct Pending {
    /// As the frame's first chunk said; every later chunk must agree.
    count: u32,
    total_size: u64,
    crc32c: u32,
    /// From the first chunk that named one.
    content_type: String,
    /// From chunk 0, or the first chunk that carried any.
    metadata: HashMap<String, String>,
    /// Bytes of every chunk but the last: any one chunk tells it.
    stride: u64,
    /// The payload, `total_size` long from the start; chunks are copied into place.
    payload: Vec<u8>,
    /// Which indexes arrived.
    received: Bitset,
    /// When the first chunk arrived: the timeout counts from here.
    first_seen: Instant,
    /// Key in `Aggregator::arrival`.
    arrival: u64,
}

impl Aggregator {
    /// An empty aggregator. `max_frames_in_flight` of 0 is taken as 1.
    pub fn new(limits: Limits) -> Self {
        Self {
            limits: Limits {
                max_frames_in_flight: limits.max_frames_in_flight.max(1),
                ..limits
            },
            frames: HashMap::new(),
            arrival: BTreeMap::new(),
            next_arrival: 0,
            bytes: 0,
            finished_order: VecDeque::new(),
            finished: HashSet::new(),
            stats: Stats::default(),
        }
    }

    /// Feeds one chunk received at `now`. Returns what completed or failed because of it:
    /// usually nothing; the frame it completed or rejected; frames evicted to make room for it.
    pub fn push(&mut self, chunk: FrameChunk, now: Instant) -> Vec<Outcome> {
        if chunk.frame_id.is_empty() {
            return vec![Outcome::Rejected {
                frame_id: chunk.frame_id,
                camera_id: chunk.camera_id,
                reason: ChunkError::EmptyFrameId,
            }];
        }
        let key = (chunk.camera_id.clone(), chunk.frame_id.clone());
        if self.finished.contains(&key) {
            self.stats.after_finish += 1;
            return Vec::new();
        }
        if self.frames.contains_key(&key) {
            return self.add_to_pending(key, chunk).into_iter().collect();
        }
        self.start_frame(key, chunk, now)
    }

    /// Gives up on frames whose first chunk arrived more than `timeout` before `now`: each is
    /// reported as [`Outcome::Incomplete`] ([`IncompleteReason::TimedOut`]), oldest first, and
    /// forgotten (its late chunks are then ignored).
    pub fn expire(&mut self, now: Instant) -> Vec<Outcome> {
        let timeout = self.limits.timeout;
        let expired: Vec<Key> = self
            .arrival
            .values()
            .filter(|key| {
                self.frames
                    .get(*key)
                    .is_some_and(|p| now.saturating_duration_since(p.first_seen) > timeout)
            })
            .cloned()
            .collect();
        expired
            .into_iter()
            .filter_map(|key| self.give_up(key, IncompleteReason::TimedOut))
            .collect()
    }

    /// Frames being reassembled, and the bytes allocated for them.
    pub fn in_flight(&self) -> (usize, u64) {
        (self.frames.len(), self.bytes)
    }

    /// Whether chunks of `(camera_id, frame_id)` are being gathered (it has not ended yet).
    pub fn is_pending(&self, camera_id: &str, frame_id: &str) -> bool {
        self.frames
            .contains_key(&(camera_id.to_string(), frame_id.to_string()))
    }

    /// Chunks that were ignored, by cause.
    pub fn stats(&self) -> Stats {
        self.stats
    }

    /// The first chunk seen of a frame: check it, complete a one-chunk frame at once, else
    /// make room and start buffering.
    fn start_frame(&mut self, key: Key, chunk: FrameChunk, now: Instant) -> Vec<Outcome> {
        let limit = self
            .limits
            .max_frame_bytes
            .min(self.limits.max_bytes_in_flight);
        let checked = if chunk.count == 0 {
            Err(ChunkError::ZeroCount)
        } else if chunk.index >= chunk.count {
            Err(ChunkError::IndexOutOfRange {
                index: chunk.index,
                count: chunk.count,
            })
        } else if chunk.total_size > limit || usize::try_from(chunk.total_size).is_err() {
            Err(ChunkError::TooLarge {
                total_size: chunk.total_size,
                limit,
            })
        } else if u64::from(chunk.count) > chunk.total_size.max(1) {
            // Every chunk carries a byte at least, so a lying count cannot make us allocate
            // more than the payload's size in bookkeeping.
            Err(ChunkError::TooManyChunks {
                count: chunk.count,
                total_size: chunk.total_size,
            })
        } else {
            layout::place(
                chunk.total_size,
                chunk.count,
                None,
                chunk.index,
                chunk.data.len() as u64,
            )
        };
        let (start, stride) = match checked {
            Ok(placed) => placed,
            Err(reason) => return vec![self.reject(key, reason)],
        };

        if chunk.count == 1 {
            // Complete already: no copy, no buffering.
            self.remember(key);
            return vec![finish(
                chunk.crc32c,
                Assembled {
                    frame_id: chunk.frame_id,
                    camera_id: chunk.camera_id,
                    content_type: chunk.content_type,
                    metadata: chunk.metadata,
                    payload: chunk.data,
                    chunks: 1,
                },
            )];
        }

        let mut outcomes = Vec::new();
        while self.frames.len() >= self.limits.max_frames_in_flight
            || self.bytes.saturating_add(chunk.total_size) > self.limits.max_bytes_in_flight
        {
            let Some(oldest) = self.arrival.values().next().cloned() else {
                break;
            };
            outcomes.extend(self.give_up(oldest, IncompleteReason::Evicted));
        }

        // Fits usize: checked above.
        let mut payload = vec![0u8; chunk.total_size as usize];
        copy_into(&mut payload, start, &chunk.data);
        let mut received = Bitset::new(chunk.count);
        received.set(chunk.index);
        let arrival = self.next_arrival;
        self.next_arrival += 1;
        self.arrival.insert(arrival, key.clone());
        self.bytes += chunk.total_size;
        self.frames.insert(
            key,
            Pending {
                count: chunk.count,
                total_size: chunk.total_size,
                crc32c: chunk.crc32c,
                content_type: chunk.content_type,
                metadata: chunk.metadata,
                stride,
                payload,
                received,
                first_seen: now,
                arrival,
            },
        );
        outcomes
    }

    /// A chunk of a frame in flight: check it against the frame, copy it into place, and
    /// finish the frame if it was the last one missing.
    fn add_to_pending(&mut self, key: Key, chunk: FrameChunk) -> Option<Outcome> {
        let pending = self.frames.get_mut(&key)?;
        match pending.accept(chunk) {
            Ok(Accepted::Duplicate) => {
                self.stats.duplicates += 1;
                None
            }
            Ok(Accepted::Stored) if pending.received.count() < pending.count => None,
            Ok(Accepted::Stored) => {
                let pending = self.forget(&key)?;
                self.remember(key.clone());
                let (camera_id, frame_id) = key;
                Some(finish(
                    pending.crc32c,
                    Assembled {
                        frame_id,
                        camera_id,
                        content_type: pending.content_type,
                        metadata: pending.metadata,
                        payload: Bytes::from(pending.payload),
                        chunks: pending.count,
                    },
                ))
            }
            Err(reason) => {
                self.forget(&key);
                Some(self.reject(key, reason))
            }
        }
    }

    /// Drops a frame in flight, reporting it as incomplete.
    fn give_up(&mut self, key: Key, reason: IncompleteReason) -> Option<Outcome> {
        let pending = self.forget(&key)?;
        self.remember(key.clone());
        let (camera_id, frame_id) = key;
        Some(Outcome::Incomplete {
            frame_id,
            camera_id,
            received: pending.received.count(),
            count: pending.count,
            missing: pending.received.missing(MISSING_LISTED),
            reason,
        })
    }

    /// Reports a frame as rejected and remembers it, so its other chunks are ignored.
    fn reject(&mut self, key: Key, reason: ChunkError) -> Outcome {
        self.remember(key.clone());
        let (camera_id, frame_id) = key;
        Outcome::Rejected {
            frame_id,
            camera_id,
            reason,
        }
    }

    /// Removes a frame from flight, releasing its bytes.
    fn forget(&mut self, key: &Key) -> Option<Pending> {
        let pending = self.frames.remove(key)?;
        self.arrival.remove(&pending.arrival);
        self.bytes -= pending.total_size;
        Some(pending)
    }

    fn remember(&mut self, key: Key) {
        if self.finished.insert(key.clone()) {
            self.finished_order.push_back(key);
            while self.finished_order.len() > RECENTLY_FINISHED {
                if let Some(old) = self.finished_order.pop_front() {
                    self.finished.remove(&old);
                }
            }
        }
    }
}

/// Verifies a reassembled payload's checksum.
fn finish(expected: u32, assembled: Assembled) -> Outcome {
    let actual = crc32c::crc32c(&assembled.payload);
    if actual == expected {
        Outcome::Complete(assembled)
    } else {
        Outcome::Rejected {
            frame_id: assembled.frame_id,
            camera_id: assembled.camera_id,
            reason: ChunkError::ChecksumMismatch { expected, actual },
        }
    }
}

fn copy_into(payload: &mut [u8], start: u64, data: &[u8]) {
    // `layout::place` checked that start + data.len() <= total_size == payload.len().
    let start = start as usize;
    payload[start..start + data.len()].copy_from_slice(data);
}

enum Accepted {
    Stored,
    Duplicate,
}

impl Pending {
    fn accept(&mut self, chunk: FrameChunk) -> Result<Accepted, ChunkError> {
        let inconsistent = |field, first: &dyn ToString, got: &dyn ToString| {
            Err(ChunkError::Inconsistent {
                field,
                first: first.to_string(),
                got: got.to_string(),
            })
        };
        if chunk.count != self.count {
            return inconsistent("count", &self.count, &chunk.count);
        }
        if chunk.total_size != self.total_size {
            return inconsistent("total_size", &self.total_size, &chunk.total_size);
        }
        if chunk.crc32c != self.crc32c {
            return inconsistent(
                "crc32c",
                &format!("{:08x}", self.crc32c),
                &format!("{:08x}", chunk.crc32c),
            );
        }
        if chunk.index >= self.count {
            return Err(ChunkError::IndexOutOfRange {
                index: chunk.index,
                count: self.count,
            });
        }
        if !chunk.content_type.is_empty()
            && !self.content_type.is_empty()
            && chunk.content_type != self.content_type
        {
            return inconsistent("content_type", &self.content_type, &chunk.content_type);
        }
        if self.received.get(chunk.index) {
            let (start, end) = layout::range(self.total_size, self.stride, chunk.index);
            return if self.payload[start as usize..end as usize] == chunk.data[..] {
                Ok(Accepted::Duplicate)
            } else {
                Err(ChunkError::DuplicateMismatch { index: chunk.index })
            };
        }
        let (start, stride) = layout::place(
            self.total_size,
            self.count,
            Some(self.stride),
            chunk.index,
            chunk.data.len() as u64,
        )?;
        self.stride = stride;
        copy_into(&mut self.payload, start, &chunk.data);
        self.received.set(chunk.index);
        if self.content_type.is_empty() {
            self.content_type = chunk.content_type;
        }
        // Chunk 0's metadata is the frame's; others may repeat it.
        if !chunk.metadata.is_empty() && (chunk.index == 0 || self.metadata.is_empty()) {
            self.metadata = chunk.metadata;
        }
        Ok(Accepted::Stored)
    }
}

/// Which chunk indexes arrived: one bit per chunk.
#[derive(Debug)]
struct Bitset {
    words: Vec<u64>,
    /// Number of bits (the frame's chunk count).
    len: u32,
    /// Bits set, so that completion is a comparison.
    ones: u32,
}

impl Bitset {
    fn new(len: u32) -> Self {
        Self {
            words: vec![0; (len as usize).div_ceil(64)],
            len,
            ones: 0,
        }
    }

    fn get(&self, i: u32) -> bool {
        self.words[i as usize / 64] & (1 << (i % 64)) != 0
    }

    fn set(&mut self, i: u32) {
        if !self.get(i) {
            self.words[i as usize / 64] |= 1 << (i % 64);
            self.ones += 1;
        }
    }

    fn count(&self) -> u32 {
        self.ones
    }

    /// The first `limit` unset indexes, skipping full words.
    fn missing(&self, limit: usize) -> Vec<u32> {
        let mut out = Vec::new();
        for (w, &word) in self.words.iter().enumerate() {
            let mut unset = !word;
            while unset != 0 && out.len() < limit {
                let i = w as u32 * 64 + unset.trailing_zeros();
                if i >= self.len {
                    return out;
                }
                out.push(i);
                unset &= unset - 1;
            }
            if out.len() >= limit {
                break;
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::Bitset;

    #[test]
    fn bitset_lists_missing_indexes_in_order() {
        let mut bits = Bitset::new(130);
        for i in (0..130).filter(|i| i % 3 != 0 || *i < 60) {
            bits.set(i);
        }
        bits.set(5);
        assert_eq!(
            bits.count(),
            60 + (60..130).filter(|i| i % 3 != 0).count() as u32
        );
        assert_eq!(bits.missing(4), vec![60, 63, 66, 69]);
        assert_eq!(bits.missing(100).last(), Some(&129));
        let full = {
            let mut b = Bitset::new(64);
            (0..64).for_each(|i| b.set(i));
            b
        };
        assert!(full.missing(16).is_empty());
        assert!(full.get(63) && !Bitset::new(3).get(2));
    }
}
