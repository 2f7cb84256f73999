//! Cutting a payload into [`FrameChunk`]s that each encode to at most a given size.

use std::collections::HashMap;

use prost::Message;
use prost::bytes::Bytes;

use crate::v1::FrameChunk;

/// Why a payload could not be split. Each is a caller's mistake: fix the argument, retrying
/// the same call fails the same way.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SplitError {
    /// Chunks are keyed by frame id; an empty one would be rejected by every aggregator.
    #[error("frame id is empty")]
    EmptyFrameId,
    /// The limit does not leave room for a single byte of data next to the chunk's other
    /// fields (ids, content type, and on chunk 0 the metadata). Raise the limit or shrink
    /// the metadata.
    #[error(
        "max_chunk_bytes {max_chunk_bytes} leaves no room for data: a chunk's other fields \
         (ids, sizes, content type, metadata on chunk 0) take {overhead} bytes, and one byte \
         of data needs 3 more"
    )]
    LimitTooSmall {
        max_chunk_bytes: usize,
        overhead: usize,
    },
    /// The payload would need more than `u32::MAX` chunks at this limit.
    #[error(
        "a payload of {total_size} bytes needs {count} chunks of {stride} bytes, \
         more than a u32 counts"
    )]
    TooManyChunks {
        total_size: u64,
        count: u64,
        stride: usize,
    },
}

/// Cuts `payload` into chunks whose *encoded* size is at most `max_chunk_bytes`.
///
/// Every chunk carries `frame_id`, `camera_id`, `content_type`, its index, the chunk count,
/// the payload's size and CRC-32C; chunk 0 alone carries `metadata`. The bytes follow the
/// [layout rule](crate::chunks#the-chunks-of-one-frame): every chunk but the last carries the
/// same number of bytes, as many as the tightest chunk can hold (chunk 0 with its metadata, or
/// the one with the widest index). An empty payload gives one chunk with no data (`count` 1,
/// `total_size` 0), which [`Aggregator`](super::Aggregator) reassembles into an empty payload.
///
/// Copies the payload once, into the chunks.
pub fn split(
    frame_id: &str,
    camera_id: &str,
    content_type: &str,
    metadata: &HashMap<String, String>,
    payload: &[u8],
    max_chunk_bytes: usize,
) -> Result<Vec<FrameChunk>, SplitError> {
    if frame_id.is_empty() {
        return Err(SplitError::EmptyFrameId);
    }
    let total_size = payload.len() as u64;
    let mut template = FrameChunk {
        frame_id: frame_id.to_owned(),
        camera_id: camera_id.to_owned(),
        index: 0,
        count: 0,
        total_size,
        crc32c: crc32c::crc32c(payload),
        data: Bytes::new(),
        content_type: content_type.to_owned(),
        metadata: HashMap::new(),
    };
    let sizes = Overhead {
        common: template.encoded_len(),
        metadata: FrameChunk {
            metadata: metadata.clone(),
            ..FrameChunk::default()
        }
        .encoded_len(),
    };
    let (count, stride) = plan(&sizes, payload.len(), max_chunk_bytes)?;

    template.count = count;
    let mut chunks = Vec::with_capacity(count as usize);
    for index in 0..count {
        let start = (index as usize).saturating_mul(stride).min(payload.len());
        let end = start.saturating_add(stride).min(payload.len());
        let mut chunk = template.clone();
        chunk.index = index;
        chunk.data = Bytes::copy_from_slice(&payload[start..end]);
        if index == 0 {
            chunk.metadata = metadata.clone();
        }
        chunks.push(chunk);
    }
    Ok(chunks)
}

/// Encoded sizes of a chunk's fields other than `index`, `count` and `data`.
struct Overhead {
    /// Ids, total size, checksum and content type: the same on every chunk.
    common: usize,
    /// The metadata map, on chunk 0 only.
    metadata: usize,
}

/// Chooses the chunk count and stride for `len` bytes: the stride is what the tightest chunk
/// can carry, and the count is fixed up until it agrees with the width its own varint (and the
/// last index's) takes. A larger count only ever shrinks the stride, so this converges, in a
/// few rounds at most.
fn plan(sizes: &Overhead, len: usize, max: usize) -> Result<(u32, usize), SplitError> {
    let mut count: u64 = 1;
    loop {
        // Chunk 0 has no index on the wire (proto3 skips zeros) but has the metadata.
        let common = sizes.common + 1 + varint_len(count);
        let first = common + sizes.metadata;
        let last_index = count - 1;
        let last = common
            + if last_index == 0 {
                0
            } else {
                1 + varint_len(last_index)
            };
        let too_small = |overhead| SplitError::LimitTooSmall {
            max_chunk_bytes: max,
            overhead,
        };
        if len == 0 {
            // One empty chunk: it needs only room for its header.
            return if first <= max {
                Ok((1, 0))
            } else {
                Err(too_small(first))
            };
        }
        let mut stride = data_capacity(max.saturating_sub(first));
        if count > 1 {
            stride = stride.min(data_capacity(max.saturating_sub(last)));
        }
        if stride == 0 {
            return Err(too_small(first.max(last)));
        }
        let needed = len.div_ceil(stride) as u64;
        if needed <= count {
            return Ok((count as u32, stride));
        }
        if needed > u64::from(u32::MAX) {
            return Err(SplitError::TooManyChunks {
                total_size: len as u64,
                count: needed,
                stride,
            });
        }
        count = needed;
    }
}

/// Encoded size of a `bytes` field of `len` bytes (tag, length varint, data; nothing when empty).
fn data_field_len(len: usize) -> usize {
    if len == 0 {
        0
    } else {
        1 + varint_len(len as u64) + len
    }
}

/// The most data a `bytes` field can hold within `budget` encoded bytes.
fn data_capacity(budget: usize) -> usize {
    if budget < 3 {
        return 0;
    }
    // Never too much: data_field_len(d) <= 1 + varint_len(budget - 1) + d == budget.
    let mut d = budget - 1 - varint_len((budget - 1) as u64);
    while data_field_len(d + 1) <= budget {
        d += 1;
    }
    d
}

/// Bytes a protobuf varint of `v` takes.
fn varint_len(v: u64) -> usize {
    let bits = 64 - (v | 1).leading_zeros() as usize;
    bits.div_ceil(7)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn varint_and_capacity_match_prost() {
        for v in [
            0u64,
            1,
            127,
            128,
            16_383,
            16_384,
            u64::from(u32::MAX),
            u64::MAX,
        ] {
            assert_eq!(varint_len(v), prost::encoding::encoded_len_varint(v), "{v}");
        }
        for budget in 0..70_000usize {
            let d = data_capacity(budget);
            assert!(data_field_len(d) <= budget, "budget {budget}");
            assert!(data_field_len(d + 1) > budget, "budget {budget}");
            let encoded = FrameChunk {
                data: Bytes::from(vec![1u8; d]),
                ..FrameChunk::default()
            }
            .encoded_len();
            assert_eq!(encoded, data_field_len(d));
        }
    }

    #[test]
    fn split_rejects_empty_frame_id_and_tiny_limits() {
        let meta = HashMap::new();
        assert_eq!(
            split("", "cam", "", &meta, b"abc", 1000),
            Err(SplitError::EmptyFrameId)
        );
        let err = split("f", "cam", "image/jpeg", &meta, b"abc", 20).unwrap_err();
        assert!(matches!(err, SplitError::LimitTooSmall { .. }), "{err}");
        assert!(err.to_string().contains("max_chunk_bytes 20"), "{err}");
        // Metadata too large for chunk 0 alone.
        let big: HashMap<String, String> = [("k".to_owned(), "v".repeat(500))].into();
        assert!(matches!(
            split("f", "cam", "", &big, b"abc", 400),
            Err(SplitError::LimitTooSmall { .. })
        ));
        // Even an empty payload needs room for its one chunk's header.
        assert!(matches!(
            split("f", "cam", "", &big, b"", 400),
            Err(SplitError::LimitTooSmall { .. })
        ));
    }

    #[test]
    fn split_fills_chunks_up_to_the_limit() {
        let meta = HashMap::new();
        let payload = vec![7u8; 10_000];
        for max in [
            40usize, 41, 100, 127, 128, 129, 130, 200, 1000, 9_999, 10_100,
        ] {
            let chunks = split("s1", "cam-1", "image/png", &meta, &payload, max).unwrap();
            let sizes: Vec<usize> = chunks.iter().map(Message::encoded_len).collect();
            assert!(sizes.iter().all(|&s| s <= max), "max {max}: {sizes:?}");
            // The stride is the most the tightest chunk can carry: one byte more would not fit
            // chunk 0 (with its metadata) or a chunk at the last, widest index.
            let stride = chunks[0].data.len();
            let mut first = chunks[0].clone();
            first.data = Bytes::from(vec![7u8; stride + 1]);
            let mut widest = chunks[chunks.len() - 1].clone();
            widest.data = first.data.clone();
            assert!(
                chunks.len() == 1 || first.encoded_len().max(widest.encoded_len()) > max,
                "max {max}: stride {stride} could be larger"
            );
        }
    }
}
