//! Building records: the headers every record carries, frame records under a limit (inline, claim
//! check, or chunked), and results and dead letters made to fit.
//!
//! Every builder checks its record against a [`RecordLimit`] before anyone produces it. A frame
//! that does not fit is chunked (or refused, for the caller to dead-letter); a result that does
//! not fit first loses its bulky optional parts (camera metadata, a long status detail), and only
//! if it still does not fit becomes a dead letter; a dead letter always fits (payload dropped,
//! then texts truncated with [`TRUNCATION_MARKER`]).

use super::policy::SizePolicy;
use super::record::{Record, RecordKind, headers_size};
use fovea_proto::chunks;
use fovea_proto::headers as h;
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult};
use prost::Message;

/// Appended to a text that was cut short, followed by the original length.
pub const TRUNCATION_MARKER: &str = "... [truncated from ";

/// Room left under the limit for the record batch framing a broker counts too.
pub const FRAMING_ALLOWANCE: usize = 512;
/// Room for the chunk headers' index and count, whatever their number of digits.
const CHUNK_HEADER_ROOM: usize = 64;
/// A result's status detail longer than this is cut when the result does not fit.
const MAX_DETAIL: usize = 4096;
/// Dead-letter texts (reason, source) are cut to this when the letter does not fit.
const MAX_LETTER_TEXT: usize = 2048;
/// On a result whose camera metadata was dropped to make it fit: how much there was.
pub const METADATA_DROPPED: &str = "fovea-metadata-dropped";

/// The largest record a cluster takes: `kafka.record_limit_bytes` (or the uplink's), counting
/// key, value and headers, less an allowance for the batch framing around them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordLimit {
    bytes: usize,
}

impl RecordLimit {
    pub fn new(bytes: usize) -> RecordLimit {
        RecordLimit { bytes }
    }

    /// The configured limit.
    pub fn bytes(self) -> usize {
        self.bytes
    }

    /// Whether `record` may be produced under this limit.
    pub fn fits(self, record: &Record) -> bool {
        record.size() + FRAMING_ALLOWANCE <= self.bytes
    }

    /// Bytes of key + value + headers a record may have.
    fn room(self) -> usize {
        self.bytes.saturating_sub(FRAMING_ALLOWANCE)
    }

    /// What to tell librdkafka (`message.max.bytes`): a little above the limit, so that a
    /// record fovea checked is never refused for its size by the client itself.
    pub fn producer_max_bytes(self) -> usize {
        self.bytes + 4096
    }
}

/// A frame's records, and how the frame travels.
#[derive(Debug, Clone)]
pub struct FrameRecords {
    pub policy: SizePolicy,
    pub records: Vec<Record>,
}

/// Why a frame could not be made into records under the limit.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "frame record of {size} bytes exceeds the record limit ({limit} bytes, less {FRAMING_ALLOWANCE} for framing){detail}"
)]
pub struct FrameTooLarge {
    pub size: usize,
    pub limit: usize,
    /// Why chunking did not help (empty when chunking was not allowed).
    pub detail: String,
}

/// The headers every fovea record carries, then its own.
fn headers(
    kind: RecordKind,
    record_id: &str,
    node: &str,
    camera: &str,
    own: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut all: Vec<(String, String)> = [
        (h::CONTENT_TYPE, h::CONTENT_TYPE_PROTOBUF),
        (h::SCHEMA, kind.schema()),
        (h::RECORD_ID, record_id),
        (h::NODE, node),
        (h::CAMERA, camera),
    ]
    .iter()
    .chain(own)
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect();
    all.shrink_to_fit();
    all
}

/// The records for `frame` on `topic`, each under `limit`: one inline (or claim-check) record,
/// or, when that does not fit and `allow_chunks`, ordered `FrameChunk` records under the
/// camera's key (so they share a partition). `extra` headers go on every record (the uplink's
/// `fovea-edge-node`, a thumbnail's size).
pub fn frame_records(
    frame: &Frame,
    topic: &str,
    extra: &[(String, String)],
    limit: RecordLimit,
    allow_chunks: bool,
) -> Result<FrameRecords, FrameTooLarge> {
    let policy = if frame.claim.is_some() {
        SizePolicy::ClaimCheck
    } else {
        SizePolicy::Inline
    };
    let mut whole = Record {
        kind: RecordKind::Frame,
        topic: topic.to_string(),
        key: frame.camera_id.clone(),
        headers: headers(
            RecordKind::Frame,
            &frame.record_id,
            &frame.node_id,
            &frame.camera_id,
            &[
                (h::IMAGE_TYPE, &frame.content_type),
                (h::SIZE_POLICY, policy.as_str()),
            ],
        ),
        value: frame.encode_to_vec(),
    };
    whole.headers.extend_from_slice(extra);
    if limit.fits(&whole) {
        return Ok(FrameRecords {
            policy,
            records: vec![whole],
        });
    }
    let too_large = |detail: String| FrameTooLarge {
        size: whole.size(),
        limit: limit.bytes(),
        detail,
    };
    if !allow_chunks {
        return Err(too_large(String::new()));
    }
    let chunk_headers = |index: &str, count: &str| {
        let mut hs = headers(
            RecordKind::FrameChunk,
            &frame.record_id,
            &frame.node_id,
            &frame.camera_id,
            &[
                (h::IMAGE_TYPE, &frame.content_type),
                (h::SIZE_POLICY, SizePolicy::Chunked.as_str()),
                (chunks::HEADER_CHUNK_INDEX, index),
                (chunks::HEADER_CHUNK_COUNT, count),
            ],
        );
        hs.extend_from_slice(extra);
        hs
    };
    let header_room = headers_size(&chunk_headers("", "")) + CHUNK_HEADER_ROOM;
    let max_chunk = limit
        .room()
        .saturating_sub(header_room + frame.camera_id.len());
    let pieces = chunks::split(
        &frame.record_id,
        &frame.camera_id,
        h::SCHEMA_FRAME,
        &Default::default(),
        &whole.value,
        max_chunk,
    )
    .map_err(|e| too_large(format!("; it cannot be chunked: {e}")))?;
    let count = pieces.len().to_string();
    let records = pieces
        .into_iter()
        .map(|chunk| Record {
            kind: RecordKind::FrameChunk,
            topic: topic.to_string(),
            key: frame.camera_id.clone(),
            headers: chunk_headers(&chunk.index.to_string(), &count),
            value: chunk.encode_to_vec(),
        })
        .collect();
    Ok(FrameRecords {
        policy: SizePolicy::Chunked,
        records,
    })
}

fn result_record(result: &InferenceResult, topic: &str) -> Record {
    let models = result
        .outputs
        .iter()
        .map(|o| format!("{}@{}", o.model, o.model_version))
        .collect::<Vec<_>>()
        .join(",");
    Record {
        kind: RecordKind::Result,
        topic: topic.to_string(),
        key: result.camera_id.clone(),
        headers: headers(
            RecordKind::Result,
            &result.record_id,
            &result.node_id,
            &result.camera_id,
            &[(h::MODEL, &models)],
        ),
        value: result.encode_to_vec(),
    }
}

/// The result's record under `limit`. A result that does not fit loses its camera metadata
/// (replaced by one [`METADATA_DROPPED`] entry saying how much there was) and has a long status
/// detail cut; if it still does not fit, the dead letter to write instead (`record-too-large`,
/// nothing of the result but its ids and the reason).
pub fn fit_result(
    result: &InferenceResult,
    topic: &str,
    limit: RecordLimit,
) -> Result<Record, Box<DeadLetter>> {
    let record = result_record(result, topic);
    if limit.fits(&record) {
        return Ok(record);
    }
    let full_size = record.size();
    let mut slim = result.clone();
    if !slim.metadata.is_empty() {
        let bytes: usize = slim.metadata.iter().map(|(k, v)| k.len() + v.len()).sum();
        let entries = slim.metadata.len();
        slim.metadata.clear();
        slim.metadata.insert(
            METADATA_DROPPED.into(),
            format!("{entries} entries, {bytes} bytes: over the record limit"),
        );
    }
    slim.status_detail = truncate_text(&slim.status_detail, MAX_DETAIL);
    let record = result_record(&slim, topic);
    if limit.fits(&record) {
        return Ok(record);
    }
    Err(Box::new(DeadLetter {
        record_id: result.record_id.clone(),
        node_id: result.node_id.clone(),
        camera_id: result.camera_id.clone(),
        source: String::new(),
        kind: "record-too-large".into(),
        reason: format!(
            "result record of {full_size} bytes ({} without camera metadata) exceeds the record \
             limit ({} bytes, less {FRAMING_ALLOWANCE} for framing)",
            record.size(),
            limit.bytes()
        ),
        payload_size: record.value.len() as u64,
        payload_sha256: String::new(),
        payload: Default::default(),
        payload_truncated: true,
        received_at_ms: result.received_at_ms,
    }))
}

/// A dead letter's record, as it is (see [`fit_dead_letter`] for one under a limit).
pub fn dead_letter_record(letter: &DeadLetter, topic: &str) -> Record {
    Record {
        kind: RecordKind::DeadLetter,
        topic: topic.to_string(),
        key: letter.camera_id.clone(),
        headers: headers(
            RecordKind::DeadLetter,
            &letter.record_id,
            &letter.node_id,
            &letter.camera_id,
            &[
                (h::ERROR_KIND, &letter.kind),
                (h::SIZE_POLICY, SizePolicy::DeadLetter.as_str()),
            ],
        ),
        value: letter.encode_to_vec(),
    }
}

/// A dead letter's record under `limit`, always: the payload is kept when it fits, else dropped
/// (`payload_truncated`, its size and checksum stay); then the reason and source are cut with
/// [`TRUNCATION_MARKER`]. The evidence (ids, kind, size, checksum) always travels.
pub fn fit_dead_letter(letter: &DeadLetter, topic: &str, limit: RecordLimit) -> Record {
    let record = dead_letter_record(letter, topic);
    if limit.fits(&record) {
        return record;
    }
    let mut letter = letter.clone();
    letter.payload = Default::default();
    letter.payload_truncated = true;
    let record = dead_letter_record(&letter, topic);
    if limit.fits(&record) {
        return record;
    }
    letter.reason = truncate_text(&letter.reason, MAX_LETTER_TEXT);
    letter.source = truncate_text(&letter.source, MAX_LETTER_TEXT);
    letter.record_id = truncate_text(&letter.record_id, MAX_LETTER_TEXT);
    letter.camera_id = truncate_text(&letter.camera_id, MAX_LETTER_TEXT);
    dead_letter_record(&letter, topic)
}

/// `text` cut to at most `max` bytes (on a character boundary), ending in
/// [`TRUNCATION_MARKER`] and the original length, when it is longer.
pub fn truncate_text(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    let tail = format!("{TRUNCATION_MARKER}{} bytes]", text.len());
    let mut cut = max.saturating_sub(tail.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}{tail}", &text[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;
    use fovea_proto::v1::{ClaimCheck, FrameChunk};
    use std::time::Instant;

    const LIMIT: RecordLimit = RecordLimit { bytes: 65_536 };

    fn frame(size: usize) -> Frame {
        Frame {
            camera_id: "cam".into(),
            record_id: "n1/cam/s1".into(),
            node_id: "n1".into(),
            content_type: "image/png".into(),
            data: vec![7u8; size].into(),
            ..Frame::default()
        }
    }

    #[test]
    fn a_small_frame_is_one_inline_record() {
        let out = frame_records(&frame(1000), "f", &[], LIMIT, true).unwrap();
        assert_eq!(out.policy, SizePolicy::Inline);
        assert_eq!(out.records.len(), 1);
        let r = &out.records[0];
        assert_eq!(r.kind, RecordKind::Frame);
        assert_eq!(r.size_policy(), Some(SizePolicy::Inline));
        assert_eq!(r.header(h::SCHEMA), Some(h::SCHEMA_FRAME));
        assert_eq!(r.header(h::IMAGE_TYPE), Some("image/png"));
        assert_eq!((r.key.as_str(), r.record_id()), ("cam", Some("n1/cam/s1")));
    }

    #[test]
    fn a_claimed_frame_says_so() {
        let mut f = frame(0);
        f.claim = Some(ClaimCheck {
            url: "http://x/blobs/ab".into(),
            sha256: "ab".into(),
            size: 5_000_000,
        });
        let out = frame_records(&f, "f", &[], LIMIT, true).unwrap();
        assert_eq!(out.policy, SizePolicy::ClaimCheck);
        assert_eq!(out.records[0].size_policy(), Some(SizePolicy::ClaimCheck));
    }

    #[test]
    fn a_large_frame_is_chunked_into_records_that_fit_and_reassemble() {
        let extra = vec![("fovea-edge-node".to_string(), "n1".repeat(200))];
        let out = frame_records(&frame(300_000), "f", &extra, LIMIT, true).unwrap();
        assert_eq!(out.policy, SizePolicy::Chunked);
        assert!(out.records.len() >= 5, "{} chunks", out.records.len());
        let mut aggregator = chunks::Aggregator::new(chunks::Limits::default());
        let mut outcomes = Vec::new();
        for (i, c) in out.records.iter().enumerate() {
            assert!(LIMIT.fits(c), "chunk {i} is {} bytes", c.size());
            assert_eq!(c.kind, RecordKind::FrameChunk);
            assert_eq!(c.size_policy(), Some(SizePolicy::Chunked));
            assert_eq!(
                c.header(chunks::HEADER_CHUNK_INDEX),
                Some(i.to_string().as_str())
            );
            assert_eq!(c.header("fovea-edge-node"), Some(extra[0].1.as_str()));
            assert_eq!(c.key, "cam");
            let chunk = FrameChunk::decode(c.value.as_slice()).unwrap();
            outcomes.extend(aggregator.push(chunk, Instant::now()));
        }
        let [chunks::Outcome::Complete(done)] = outcomes.as_slice() else {
            panic!(
                "expected one complete frame, got {} outcomes",
                outcomes.len()
            );
        };
        let back = Frame::decode(done.payload.clone()).unwrap();
        assert_eq!(back, frame(300_000));
    }

    #[test]
    fn a_large_frame_without_chunking_is_refused_with_its_size() {
        let err = frame_records(&frame(70_000), "f", &[], LIMIT, false).unwrap_err();
        assert!(err.size > 70_000 && err.limit == 65_536, "{err}");
        assert!(err.to_string().contains("exceeds the record limit"));
    }

    fn result(metadata_bytes: usize, detail: usize) -> InferenceResult {
        InferenceResult {
            record_id: "n1/cam/s1".into(),
            node_id: "n1".into(),
            camera_id: "cam".into(),
            status_detail: "d".repeat(detail),
            metadata: (0..metadata_bytes / 1000)
                .map(|i| (format!("k{i}"), "v".repeat(1000)))
                .collect(),
            ..InferenceResult::default()
        }
    }

    #[test]
    fn a_result_that_fits_is_kept_whole() {
        let r = result(10_000, 10);
        let rec = fit_result(&r, "res", LIMIT).unwrap();
        assert_eq!(InferenceResult::decode(rec.value.as_slice()).unwrap(), r);
        assert_eq!(rec.kind, RecordKind::Result);
    }

    #[test]
    fn a_result_over_the_limit_drops_its_metadata_and_says_so() {
        let rec = fit_result(&result(2 << 20, 100_000), "res", LIMIT).unwrap();
        assert!(LIMIT.fits(&rec));
        let back = InferenceResult::decode(rec.value.as_slice()).unwrap();
        assert_eq!(back.metadata.len(), 1);
        assert!(back.metadata[METADATA_DROPPED].starts_with("2097 entries"));
        assert!(back.status_detail.len() <= MAX_DETAIL);
        assert!(back.status_detail.contains(TRUNCATION_MARKER));
    }

    #[test]
    fn a_result_that_cannot_fit_becomes_a_dead_letter_that_does() {
        let mut r = result(0, 0);
        r.outputs = (0..5000)
            .map(|i| fovea_proto::v1::ModelOutput {
                model: format!("model-{i}"),
                ..Default::default()
            })
            .collect();
        let letter = fit_result(&r, "res", LIMIT).unwrap_err();
        assert_eq!(letter.kind, "record-too-large");
        assert_eq!(letter.record_id, "n1/cam/s1");
        assert!(letter.reason.starts_with("result record of"));
        assert!(LIMIT.fits(&fit_dead_letter(&letter, "dl", LIMIT)));
    }

    #[test]
    fn a_dead_letter_always_fits() {
        let letter = DeadLetter {
            record_id: "n1/cam/h1".into(),
            camera_id: "cam".into(),
            kind: "decode-failed".into(),
            reason: "r".repeat(1 << 20),
            payload: vec![1u8; 100_000].into(),
            payload_size: 100_000,
            ..DeadLetter::default()
        };
        let rec = fit_dead_letter(&letter, "dl", LIMIT);
        assert!(LIMIT.fits(&rec));
        let back = DeadLetter::decode(rec.value.as_slice()).unwrap();
        assert!(back.payload_truncated && back.payload.is_empty());
        assert_eq!(back.payload_size, 100_000);
        assert!(
            back.reason
                .ends_with(&format!("{TRUNCATION_MARKER}{} bytes]", 1 << 20))
        );
        assert_eq!(rec.header(h::ERROR_KIND), Some("decode-failed"));
        assert_eq!(rec.size_policy(), Some(SizePolicy::DeadLetter));
        // A small one keeps its payload.
        let small = DeadLetter {
            payload: vec![1u8; 10].into(),
            ..letter.clone()
        };
        let small = DeadLetter {
            reason: "short".into(),
            ..small
        };
        let back =
            DeadLetter::decode(fit_dead_letter(&small, "dl", LIMIT).value.as_slice()).unwrap();
        assert_eq!(back.payload.len(), 10);
    }

    #[test]
    fn truncation_keeps_character_boundaries_and_says_how_long_it_was() {
        let text = "é".repeat(1000); // 2000 bytes
        let cut = truncate_text(&text, 100);
        assert!(cut.len() <= 100, "{}", cut.len());
        assert!(cut.ends_with("2000 bytes]"));
        assert_eq!(truncate_text("short", 100), "short");
    }
}
