//! For the fuzz targets in `fuzz/` (run by `scripts/fuzz.sh`), not an API: the decoders of
//! outside bytes that are not public elsewhere, the layout of the inputs that drive a sequence
//! of calls, and (in its tests) the generator of the seed corpora in `fuzz/corpus/`.
//!
//! The other decoders the targets call are public already: `ingress::payload`,
//! `ingress::topic`, `spool::record`, `inference::decode`, and `fovea_proto::chunks`.

use std::time::Duration;

use fovea_proto::chunks::Limits;

pub use crate::blobstore::http::{MAX_REQUEST_HEAD, ParsedRequest, Route, parse_request, route};

/// First byte of a `frame_chunk` input that asks for a round trip instead of a sequence: then a
/// little-endian `u16` `max_chunk_bytes`, then the payload to split and put back together.
pub const ROUND_TRIP: u8 = 0xFF;

/// `frame_chunk` sequence inputs are four bytes of [`aggregator_limits`], then [`pieces`]: a
/// piece tagged at or above `EXPIRE` advances the clock by `tag - EXPIRE` tenths of a second
/// and expires; any other pushes the piece, decoded as a `FrameChunk`.
pub const EXPIRE: u8 = 0x80;

/// The aggregator limits of a `frame_chunk` sequence, from its first four bytes: small, so that
/// no input makes it allocate much (frames of 256 B to 64 KiB, 0 (taken as 1) to 7 frames and
/// 512 B to 128 KiB in flight, a timeout of 0 to 25.5 s).
pub fn aggregator_limits(b: [u8; 4]) -> Limits {
    Limits {
        max_frame_bytes: (u64::from(b[0]) + 1) << 8,
        max_frames_in_flight: usize::from(b[1] % 8),
        max_bytes_in_flight: (u64::from(b[2]) + 1) << 9,
        timeout: Duration::from_millis(u64::from(b[3]) * 100),
    }
}

/// Splits an input into pieces: each a tag byte, a little-endian `u16` length and that many
/// bytes (the last one cut short by the end of the input). The `frame_chunk` target reads one
/// step of its sequence from each.
pub fn pieces(mut data: &[u8]) -> impl Iterator<Item = (u8, &[u8])> {
    std::iter::from_fn(move || {
        let (&tag, rest) = data.split_first()?;
        let (len, rest) = match rest {
            [a, b, rest @ ..] => (usize::from(u16::from_le_bytes([*a, *b])), rest),
            _ => (0, &[][..]),
        };
        let (piece, rest) = rest.split_at(len.min(rest.len()));
        data = rest;
        Some((tag, piece))
    })
}

/// Appends a piece that [`pieces`] reads back as `(tag, bytes)`.
///
/// # Panics
/// If `bytes` is over 64 KiB (a seed generator's mistake).
pub fn push_piece(out: &mut Vec<u8>, tag: u8, bytes: &[u8]) {
    let len = u16::try_from(bytes.len()).expect("a piece is at most 64 KiB");
    out.push(tag);
    out.extend_from_slice(&len.to_le_bytes());
    out.extend_from_slice(bytes);
}

#[cfg(test)]
mod seeds;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_read_back_what_was_pushed() {
        let mut input = Vec::new();
        push_piece(&mut input, 1, b"abc");
        push_piece(&mut input, 2, b"");
        push_piece(&mut input, 3, &[7; 300]);
        let read: Vec<_> = pieces(&input).collect();
        assert_eq!(read, [(1, &b"abc"[..]), (2, &b""[..]), (3, &[7; 300][..])]);
        // Cut short: what is there.
        assert_eq!(pieces(&[9, 5, 0, 1]).collect::<Vec<_>>(), [(9, &[1][..])]);
        assert_eq!(pieces(&[9, 5]).collect::<Vec<_>>(), [(9, &[][..])]);
        assert_eq!(pieces(&[]).count(), 0);
    }

    #[test]
    fn requests_parse_as_the_servers_read_them() {
        let get = parse_request(b"GET /blobs/ab?x=1 HTTP/1.1\r\nHost: h\r\n\r\n");
        let ParsedRequest::Request { method, target } = &get else {
            panic!("{get:?}")
        };
        assert_eq!((method.as_str(), target.as_str()), ("GET", "/blobs/ab?x=1"));
        assert_eq!(route(method, target), Route::Blob("ab"));
        assert_eq!(route("HEAD", "/healthz"), Route::Health);
        assert_eq!(route("POST", "/healthz"), Route::MethodNotAllowed);
        assert_eq!(route("POST", "/other"), Route::NotFound);
        // A stray line end before the request line is allowed.
        assert!(matches!(
            parse_request(b"\r\nHEAD / HTTP/1.0\n\n"),
            ParsedRequest::Request { .. }
        ));
        assert!(matches!(
            parse_request(b"get / HTTP/1.1\r\n\r\n"),
            ParsedRequest::Refused { status: 400, .. }
        ));
        assert_eq!(
            parse_request(b"GET / HTTP/1.1\r\nHost: h\r\n"),
            ParsedRequest::Incomplete
        );
        let long = [b'a'; MAX_REQUEST_HEAD as usize];
        assert!(matches!(
            parse_request(&long),
            ParsedRequest::Refused { status: 431, .. }
        ));
    }
}
