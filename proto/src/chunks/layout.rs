//! Where each chunk's bytes sit in the payload: the one rule splitter and aggregator share.
//!
//! Every chunk but the last carries the same number of bytes, the *stride*; the last carries
//! the rest, between 1 and `stride` bytes (what `payload.chunks(stride)` gives). A frame of one
//! chunk carries the whole payload, which may be empty. So chunk `i` starts at `i * stride`, and
//! any single chunk tells the stride: a middle chunk by its length, the last one by
//! `(total_size - len) / (count - 1)`. That lets the aggregator copy every chunk straight into
//! place, in whatever order chunks arrive, and check each one's length.

use super::aggregator::ChunkError;

/// Checks that a chunk of `len` bytes at `index` fits a frame of `total_size` bytes in `count`
/// chunks (and the `stride` already learnt from its other chunks, if any), and returns the
/// chunk's offset in the payload and the frame's stride.
///
/// The caller has already checked `count >= 1`, `index < count` and `count <= max(total_size, 1)`.
pub(crate) fn place(
    total_size: u64,
    count: u32,
    stride: Option<u64>,
    index: u32,
    len: u64,
) -> Result<(u64, u64), ChunkError> {
    let bad = || ChunkError::BadLength {
        index,
        len,
        count,
        total_size,
        stride,
    };
    if len > total_size {
        return Err(ChunkError::DataBeyondTotal {
            index,
            len,
            total_size,
        });
    }
    if count == 1 {
        // The whole payload in one chunk: its length is the stride.
        return if len == total_size {
            Ok((0, len))
        } else {
            Err(bad())
        };
    }
    if len == 0 {
        return Err(bad());
    }
    let last = u64::from(count) - 1;
    let this_stride = if u64::from(index) == last {
        // The last chunk ends the payload; what comes before it is `last` strides.
        let before = total_size - len;
        if !before.is_multiple_of(last) {
            return Err(bad());
        }
        before / last
    } else {
        len
    };
    // Every stride-sized chunk but the last, then a last chunk of 1..=stride bytes.
    let full = u128::from(last) * u128::from(this_stride);
    let fits =
        full < u128::from(total_size) && u128::from(total_size) <= full + u128::from(this_stride);
    if !fits || stride.is_some_and(|s| s != this_stride) {
        return Err(bad());
    }
    // `index * stride <= last * stride < total_size`, so this cannot overflow.
    Ok((u64::from(index) * this_stride, this_stride))
}

/// The byte range of chunk `index` once the frame's stride is known.
pub(crate) fn range(total_size: u64, stride: u64, index: u32) -> (u64, u64) {
    let start = u64::from(index).saturating_mul(stride).min(total_size);
    let end = start.saturating_add(stride).min(total_size);
    (start, end)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn layout_follows_payload_chunks() {
        // 10 bytes in chunks of 4: 4, 4, 2.
        assert_eq!(place(10, 3, None, 0, 4), Ok((0, 4)));
        assert_eq!(place(10, 3, None, 1, 4), Ok((4, 4)));
        assert_eq!(place(10, 3, None, 2, 2), Ok((8, 4)));
        assert_eq!(place(10, 3, Some(4), 2, 2), Ok((8, 4)));
        // A full last chunk: 12 bytes in 3 chunks of 4.
        assert_eq!(place(12, 3, None, 2, 4), Ok((8, 4)));
        // One chunk, empty or not.
        assert_eq!(place(0, 1, None, 0, 0), Ok((0, 0)));
        assert_eq!(place(7, 1, None, 0, 7), Ok((0, 7)));
        assert_eq!(range(10, 4, 2), (8, 10));
    }

    #[test]
    fn layout_rejects_what_does_not_tile() {
        // A middle chunk of 3 would leave 10 - 6 = 4 > 3 bytes for the last.
        assert!(matches!(
            place(10, 3, None, 0, 3),
            Err(ChunkError::BadLength { .. })
        ));
        // A middle chunk of 5 would leave nothing for the last.
        assert!(place(10, 3, None, 1, 5).is_err());
        // The last chunk of 3 bytes leaves 7, not a multiple of 2 chunks.
        assert!(place(10, 3, None, 2, 3).is_err());
        // Disagrees with the stride seen before.
        assert!(place(10, 3, Some(4), 1, 3).is_err());
        // Empty chunks only in an empty one-chunk frame.
        assert!(place(10, 3, None, 1, 0).is_err());
        assert!(place(7, 1, None, 0, 6).is_err());
        assert_eq!(
            place(7, 2, None, 0, 8),
            Err(ChunkError::DataBeyondTotal {
                index: 0,
                len: 8,
                total_size: 7
            })
        );
    }
}
