//! Frames larger than a message limit, as [`FrameChunk`](crate::v1::FrameChunk)s: [`split`] cuts
//! a payload into chunks that each encode to at most a given size; an [`Aggregator`] puts them
//! back together.
//!
//! Kafka refuses records over its limit (1 MB by default) and cameras may be held to small MQTT
//! payloads (say 128 KB), while images are larger. The same code serves both ends: fovea's
//! outbox splits an encoded `Frame` into Kafka records, fovea's MQTT ingress reassembles frames
//! cameras send in chunks, and any consumer of fovea's topics reassembles the chunk records.
//! It needs nothing but `prost` and `crc32c` (and `thiserror` for the error types).
//!
//! | module | what |
//! |---|---|
//! | `split` | [`split`], [`SplitError`] |
//! | `aggregator` | [`Aggregator`], its [`Limits`], [`Outcome`]s and [`ChunkError`]s |
//! | `layout` | the rule that places each chunk's bytes in the payload (below) |
//!
//! # The chunks of one frame
//!
//! - All share `frame_id`, `camera_id`, `count`, `total_size` (of the whole payload) and
//!   `crc32c` (CRC-32C, Castagnoli, of the whole payload); `index` runs `0..count`.
//! - **Layout**: every chunk but the last carries the same number of bytes (the *stride*), the
//!   last one 1 to stride bytes, i.e. `payload.chunks(stride)`. Any chunk alone thus tells where
//!   its bytes go, and the aggregator copies each straight into place. An empty payload is one
//!   chunk with no data (`count` 1, `total_size` 0).
//! - `metadata` is the frame's, on chunk 0 (others may repeat it; chunk 0's wins).
//!   `content_type` is on every chunk [`split`] makes; a producer may put it on chunk 0 only.
//! - A camera chunking its own frames over MQTT follows the same rules, e.g. with a stride of
//!   100 KiB under a 128 KB limit.
//!
//! # Reassembly
//!
//! A frame is keyed by `(camera_id, frame_id)` and ends in exactly one [`Outcome`]:
//! `Complete` once every index arrived and the CRC-32C matched; `Rejected` as soon as a chunk
//! contradicts it (see [`ChunkError`]); `Incomplete` when [`Aggregator::expire`] finds it still
//! missing chunks `timeout` after its first one, or when it is evicted, oldest first, to make
//! room for a new frame under the [`Limits`]. Duplicate chunks are ignored; so are chunks of
//! the last [`RECENTLY_FINISHED`] frames that ended, so late duplicates never start a frame
//! that could only time out. A consumer that starts reading in the middle of a frame sees only
//! its later chunks: that one frame times out, the next ones complete.
//!
//! # On Kafka
//!
//! A frame whose `fovea.v1.Frame` record would exceed the record limit is written as one record
//! per chunk, with size policy [`SIZE_POLICY_CHUNKED`]:
//!
//! | | |
//! |---|---|
//! | value | an encoded `fovea.v1.FrameChunk`; the reassembled payload is the encoded `fovea.v1.Frame` the inline record would have held |
//! | key | the camera id, like every fovea record: all chunks land in one partition, in order |
//! | `FrameChunk.frame_id` | the frame's record id (`node/camera/frame-id`), so that chunks of two nodes' cameras of the same name never mix once merged upstream |
//! | `FrameChunk.camera_id` | the camera id |
//! | `content-type` | `application/x-protobuf` |
//! | `fovea-schema` | `fovea.v1.FrameChunk` ([`headers::SCHEMA_FRAME_CHUNK`](crate::headers::SCHEMA_FRAME_CHUNK)) |
//! | `fovea-record-id` | the frame's record id, the same on every chunk |
//! | `fovea-node`, `fovea-camera`, `fovea-image-type` | as on an inline frame record |
//! | `fovea-size-policy` | `chunked` |
//! | [`HEADER_CHUNK_INDEX`], [`HEADER_CHUNK_COUNT`] | the chunk's `index` and `count` in decimal, for tools that do not decode values |
//!
//! `max_chunk_bytes` is the record limit less room for the key and headers. A consumer routes
//! on `fovea-schema`, feeds `FrameChunk`s to an [`Aggregator`] and decodes a `Frame` from each
//! completed payload; it deduplicates on `fovea-record-id` as for any fovea record (a frame
//! redelivered whole, after the aggregator forgot it, completes a second time). Chunks of
//! other records interleave with a frame's chunks on the partition, so a consumer should
//! commit an offset only when no frame with chunks before it is still in flight; otherwise a
//! restart begins mid-frame and that frame is reported incomplete.
//!
//! ```
//! use std::collections::HashMap;
//! use std::time::{Duration, Instant};
//! use fovea_proto::chunks::{split, Aggregator, Limits, Outcome};
//!
//! let payload = vec![42u8; 10_000];
//! let chunks = split("node-1/cam-1/s7", "cam-1", "image/jpeg", &HashMap::new(), &payload, 4096)?;
//! assert_eq!(chunks.len(), 3);
//!
//! let mut aggregator = Aggregator::new(Limits::default());
//! let now = Instant::now();
//! let mut outcomes = Vec::new();
//! for chunk in chunks.into_iter().rev() {
//!     outcomes.extend(aggregator.push(chunk, now));
//! }
//! let [Outcome::Complete(frame)] = &outcomes[..] else { panic!("{outcomes:?}") };
//! assert_eq!(frame.payload, payload);
//! assert!(aggregator.expire(now + Duration::from_secs(60)).is_empty());
//! # Ok::<(), fovea_proto::chunks::SplitError>(())
//! ```

mod aggregator;
mod layout;
mod split;
#[cfg(test)]
mod tests;

pub use aggregator::{
    Aggregator, Assembled, ChunkError, IncompleteReason, Limits, MISSING_LISTED, Outcome,
    RECENTLY_FINISHED, Stats,
};
pub use split::{SplitError, split};

/// Kafka header on chunk records: the chunk's index, in decimal.
pub const HEADER_CHUNK_INDEX: &str = "fovea-chunk-index";
/// Kafka header on chunk records: how many chunks the frame has, in decimal.
pub const HEADER_CHUNK_COUNT: &str = "fovea-chunk-count";
/// Value of the `fovea-size-policy` header ([`headers::SIZE_POLICY`](crate::headers::SIZE_POLICY))
/// on chunk records.
pub const SIZE_POLICY_CHUNKED: &str = "chunked";
