//! Turns a finished job into the Kafka records to write: the frame, its result, or a dead letter.
//!
//! This is where the size policy lives (`large_frames.policy`), recorded on every frame record in
//! the `fovea-size-policy` header and in its result's `frame` disposition:
//! - `inline`: the frame record fits under `kafka.record_limit_bytes`.
//! - `claim-check`: a worker already put the image in the blob store; the record holds the
//!   reference (see `pipeline::workers`).
//! - `chunked`: the encoded `Frame` is split into ordered `FrameChunk` records under the camera's
//!   key, each under the limit (`fovea_proto::chunks` is the Splitter and the consumers' Aggregator).
//! - `dead-letter`: policy `dead_letter` (or a frame that cannot be chunked): a dead letter with
//!   the reason, size and checksum, not the bytes.
//!
//! Whatever became of the frame, its result is written. Nothing here talks to Kafka, so it is
//! tested without a broker.

use crate::config::{LargeFramePolicy, TopicsConfig};
use crate::ingress::payload::{self, Rejection};
use crate::pipeline::job::{Done, JobMeta, Verdict};
use bytes::Bytes;
use fovea_proto::chunks;
use fovea_proto::headers as h;
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult};
use prost::Message;

/// Room left under the record limit for the record batch framing a broker counts too.
pub const FRAMING_ALLOWANCE: usize = 512;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordKind {
    Frame,
    Result,
    DeadLetter,
}

#[derive(Debug, Clone)]
pub struct Record {
    pub kind: RecordKind,
    pub topic: String,
    pub key: String,
    pub value: Vec<u8>,
    pub headers: Vec<(&'static str, String)>,
}

impl Record {
    /// Bytes the producer and broker count against `message.max.bytes`.
    pub fn size(&self) -> usize {
        self.key.len()
            + self.value.len()
            + self
                .headers
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>()
    }
}

/// What the outbox needs to name and size records.
#[derive(Debug, Clone)]
pub struct Naming {
    pub node_id: String,
    pub topics: TopicsConfig,
    /// Largest record, key + value + headers (`kafka.record_limit_bytes`).
    pub record_limit: usize,
    /// What to do with a frame whose record would not fit.
    pub large_policy: LargeFramePolicy,
}

impl Naming {
    fn fits(&self, record: &Record) -> bool {
        record.size() + FRAMING_ALLOWANCE <= self.record_limit
    }
}

/// The records for one finished job, in the order they must be written.
pub fn plan(done: &Done, naming: &Naming) -> Vec<Record> {
    match &done.verdict {
        Verdict::Frame { frame, result } => plan_frame(frame, result, naming),
        Verdict::Rejected { rejection, payload } => {
            vec![dead_letter(&done.meta, rejection, payload, naming)]
        }
    }
}

fn plan_frame(frame: &Frame, result: &InferenceResult, naming: &Naming) -> Vec<Record> {
    let mut result = result.clone();
    let mut records = Vec::with_capacity(2);
    let frame_record = Record {
        kind: RecordKind::Frame,
        topic: naming.topics.frames.clone(),
        key: frame.camera_id.clone(),
        value: frame.encode_to_vec(),
        headers: headers(
            h::SCHEMA_FRAME,
            &frame.record_id,
            &frame.node_id,
            &frame.camera_id,
            [
                (h::IMAGE_TYPE, frame.content_type.clone()),
                (
                    h::SIZE_POLICY,
                    if frame.claim.is_some() {
                        "claim-check"
                    } else {
                        "inline"
                    }
                    .into(),
                ),
            ],
        ),
    };
    let disposition = result.frame.get_or_insert_default();
    let claimed = frame.claim.is_some();
    if naming.fits(&frame_record) {
        disposition.topic = frame_record.topic.clone();
        disposition.size_policy = if claimed { "claim-check" } else { "inline" }.into();
        records.push(frame_record);
    } else if naming.large_policy != LargeFramePolicy::DeadLetter
        && let Ok(chunks) = chunk_records(frame, &frame_record, naming)
    {
        disposition.topic = frame_record.topic.clone();
        disposition.size_policy = "chunked".into();
        records.extend(chunks);
    } else {
        let reason = format!(
            "frame record of {} bytes exceeds kafka.record_limit_bytes ({} bytes, less {} for \
             framing) and large_frames.policy is dead_letter",
            frame_record.size(),
            naming.record_limit,
            FRAMING_ALLOWANCE
        );
        disposition.topic = naming.topics.deadletter.clone();
        disposition.size_policy = "dead-letter".into();
        disposition.reason = reason.clone();
        let letter = DeadLetter {
            record_id: frame.record_id.clone(),
            node_id: frame.node_id.clone(),
            camera_id: frame.camera_id.clone(),
            source: String::new(),
            kind: "record-too-large".into(),
            reason,
            payload_size: frame.data.len() as u64,
            payload_sha256: payload::sha256_hex(&frame.data),
            payload: Bytes::new(),
            payload_truncated: true,
            received_at_ms: frame.received_at_ms,
        };
        records.push(dead_letter_record(letter, naming));
    }
    let models = result
        .outputs
        .iter()
        .map(|o| format!("{}@{}", o.model, o.model_version))
        .collect::<Vec<_>>()
        .join(",");
    records.push(Record {
        kind: RecordKind::Result,
        topic: naming.topics.results.clone(),
        key: result.camera_id.clone(),
        headers: headers(
            h::SCHEMA_RESULT,
            &result.record_id,
            &result.node_id,
            &result.camera_id,
            [(h::MODEL, models)],
        ),
        value: result.encode_to_vec(),
    });
    records
}

/// The frame record's value split into `FrameChunk` records, each (with its headers) under the
/// record limit. The chunks share the frame's record id and key, so they land in one partition,
/// in order.
fn chunk_records(frame: &Frame, whole: &Record, naming: &Naming) -> Result<Vec<Record>, String> {
    // Room for the headers of a chunk record (the frame's, plus index and count) and its key.
    let header_room: usize = whole
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len())
        .sum::<usize>()
        + 128;
    let max_chunk = naming
        .record_limit
        .saturating_sub(FRAMING_ALLOWANCE + header_room + whole.key.len());
    let chunks = chunks::split(
        &frame.record_id,
        &frame.camera_id,
        h::SCHEMA_FRAME,
        &Default::default(),
        &whole.value,
        max_chunk,
    )
    .map_err(|e| e.to_string())?;
    let count = chunks.len();
    Ok(chunks
        .into_iter()
        .map(|chunk| Record {
            kind: RecordKind::Frame,
            topic: whole.topic.clone(),
            key: whole.key.clone(),
            headers: headers(
                h::SCHEMA_FRAME_CHUNK,
                &frame.record_id,
                &frame.node_id,
                &frame.camera_id,
                [
                    (h::IMAGE_TYPE, frame.content_type.clone()),
                    (h::SIZE_POLICY, "chunked".into()),
                    (chunks::HEADER_CHUNK_INDEX, chunk.index.to_string()),
                    (chunks::HEADER_CHUNK_COUNT, count.to_string()),
                ],
            ),
            value: chunk.encode_to_vec(),
        })
        .collect())
}

fn dead_letter(meta: &JobMeta, rejection: &Rejection, payload: &Bytes, naming: &Naming) -> Record {
    let sha = payload::sha256_hex(payload);
    let mut letter = DeadLetter {
        record_id: payload::record_id(&naming.node_id, &meta.camera, &format!("h{}", &sha[..16])),
        node_id: naming.node_id.clone(),
        camera_id: meta.camera.clone(),
        source: meta.source.clone(),
        kind: rejection.kind().into(),
        reason: rejection.to_string(),
        payload_size: payload.len() as u64,
        payload_sha256: sha,
        payload: payload.clone(),
        payload_truncated: false,
        received_at_ms: meta.received_at_ms,
    };
    let record = dead_letter_record(letter.clone(), naming);
    if naming.fits(&record) {
        return record;
    }
    // Keep the evidence (size, checksum, reason) even when the bytes themselves cannot travel.
    letter.payload = Bytes::new();
    letter.payload_truncated = true;
    dead_letter_record(letter, naming)
}

fn dead_letter_record(letter: DeadLetter, naming: &Naming) -> Record {
    Record {
        kind: RecordKind::DeadLetter,
        topic: naming.topics.deadletter.clone(),
        key: letter.camera_id.clone(),
        headers: headers(
            h::SCHEMA_DEAD_LETTER,
            &letter.record_id,
            &letter.node_id,
            &letter.camera_id,
            [
                (h::ERROR_KIND, letter.kind.clone()),
                (h::SIZE_POLICY, "dead-letter".into()),
            ],
        ),
        value: letter.encode_to_vec(),
    }
}

/// The headers every fovea record carries, then the record kind's own.
fn headers<const N: usize>(
    schema: &str,
    record_id: &str,
    node: &str,
    camera: &str,
    own: [(&'static str, String); N],
) -> Vec<(&'static str, String)> {
    let mut all = vec![
        (h::CONTENT_TYPE, h::CONTENT_TYPE_PROTOBUF.to_string()),
        (h::SCHEMA, schema.to_string()),
        (h::RECORD_ID, record_id.to_string()),
        (h::NODE, node.to_string()),
        (h::CAMERA, camera.to_string()),
    ];
    all.extend(own);
    all
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ingress::ack::Ack;
    use std::time::Instant;

    fn naming(limit: usize) -> Naming {
        Naming {
            node_id: "n1".into(),
            topics: crate::config::Config::default().kafka.topics,
            record_limit: limit,
            large_policy: LargeFramePolicy::DeadLetter,
        }
    }

    fn header<'r>(record: &'r Record, name: &str) -> Option<&'r str> {
        record
            .headers
            .iter()
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn oversized_frame_is_chunked_into_records_that_fit_and_reassemble() {
        let mut naming = naming(65_536);
        naming.large_policy = LargeFramePolicy::Chunk;
        let done = frame_done(300_000);
        let records = plan(&done, &naming);
        let (chunks, rest): (Vec<_>, Vec<_>) =
            records.iter().partition(|r| r.kind == RecordKind::Frame);
        assert!(chunks.len() >= 5, "{} chunks", chunks.len());
        assert_eq!(rest.len(), 1, "and one result");
        let mut aggregator = chunks::Aggregator::new(chunks::Limits::default());
        let mut outcomes = Vec::new();
        for (i, c) in chunks.iter().enumerate() {
            assert!(
                c.size() + FRAMING_ALLOWANCE <= 65_536,
                "chunk {i} is {} bytes",
                c.size()
            );
            assert_eq!(header(c, h::SCHEMA), Some(h::SCHEMA_FRAME_CHUNK));
            assert_eq!(header(c, h::SIZE_POLICY), Some("chunked"));
            assert_eq!(header(c, h::RECORD_ID), Some("n1/cam/s1"));
            assert_eq!(
                header(c, chunks::HEADER_CHUNK_INDEX),
                Some(i.to_string().as_str())
            );
            assert_eq!(c.key, "cam");
            let chunk = fovea_proto::v1::FrameChunk::decode(c.value.as_slice()).unwrap();
            outcomes.extend(aggregator.push(chunk, std::time::Instant::now()));
        }
        let [chunks::Outcome::Complete(done_frame)] = outcomes.as_slice() else {
            panic!(
                "expected one complete frame, got {} outcomes",
                outcomes.len()
            );
        };
        let frame = Frame::decode(done_frame.payload.clone()).unwrap();
        assert_eq!(frame.data.len(), 300_000);
        assert_eq!(frame.record_id, "n1/cam/s1");
        assert_eq!(result_of(&records).frame.unwrap().size_policy, "chunked");
    }

    #[test]
    fn claimed_frame_says_so_in_its_header_and_result() {
        let mut done = frame_done(0);
        if let Verdict::Frame { frame, .. } = &mut done.verdict {
            frame.claim = Some(fovea_proto::v1::ClaimCheck {
                url: "http://x/blobs/ab".into(),
                sha256: "ab".into(),
                size: 5_000_000,
            });
        }
        let records = plan(&done, &naming(1 << 20));
        assert_eq!(header(&records[0], h::SIZE_POLICY), Some("claim-check"));
        assert_eq!(
            result_of(&records).frame.unwrap().size_policy,
            "claim-check"
        );
    }

    fn meta() -> JobMeta {
        JobMeta {
            camera: "cam".into(),
            source: "mqtt:cameras/cam/frames".into(),
            node_seq: 1,
            received: Instant::now(),
            received_at_ms: 1,
            ack: Ack::none(),
            started: None,
            finished: None,
            large_permit: None,
        }
    }

    fn frame_done(size: usize) -> Done {
        let frame = Frame {
            camera_id: "cam".into(),
            record_id: "n1/cam/s1".into(),
            node_id: "n1".into(),
            data: vec![7u8; size].into(),
            ..Frame::default()
        };
        let result = InferenceResult {
            record_id: "n1/cam/s1".into(),
            camera_id: "cam".into(),
            ..InferenceResult::default()
        };
        Done {
            meta: meta(),
            verdict: Verdict::Frame {
                frame: Box::new(frame),
                result: Box::new(result),
            },
        }
    }

    fn result_of(records: &[Record]) -> InferenceResult {
        let r = records
            .iter()
            .find(|r| r.kind == RecordKind::Result)
            .unwrap();
        InferenceResult::decode(r.value.as_slice()).unwrap()
    }

    #[test]
    fn small_frame_goes_inline_with_its_result() {
        let records = plan(&frame_done(1000), &naming(1 << 20));
        let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RecordKind::Frame, RecordKind::Result]);
        assert!(records.iter().all(|r| r.key == "cam"));
        let disposition = result_of(&records).frame.unwrap();
        assert_eq!(disposition.size_policy, "inline");
        assert_eq!(disposition.topic, "fovea.frames");
    }

    #[test]
    fn oversized_frame_is_dead_lettered_and_its_result_kept() {
        let records = plan(&frame_done(70_000), &naming(65_536));
        let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RecordKind::DeadLetter, RecordKind::Result]);
        let letter = DeadLetter::decode(records[0].value.as_slice()).unwrap();
        assert_eq!(letter.kind, "record-too-large");
        assert!(letter.payload_truncated && letter.payload.is_empty());
        assert_eq!(letter.payload_size, 70_000);
        assert!(letter.reason.contains("exceeds kafka.record_limit_bytes"));
        assert!(records.iter().all(|r| r.size() <= 65_536));
        let disposition = result_of(&records).frame.unwrap();
        assert_eq!(disposition.size_policy, "dead-letter");
        assert_eq!(disposition.topic, "fovea.deadletter");
    }

    #[test]
    fn rejected_payload_is_kept_when_it_fits() {
        let done = Done {
            meta: meta(),
            verdict: Verdict::Rejected {
                rejection: Rejection::Empty,
                payload: Bytes::from_static(b"abc"),
            },
        };
        let records = plan(&done, &naming(1 << 20));
        assert_eq!(records.len(), 1);
        let letter = DeadLetter::decode(records[0].value.as_slice()).unwrap();
        assert_eq!(&letter.payload[..], b"abc");
        assert_eq!(letter.reason, "empty payload");
        assert_eq!(letter.source, "mqtt:cameras/cam/frames");
        let big = Done {
            meta: meta(),
            verdict: Verdict::Rejected {
                rejection: Rejection::Decode("bad".into()),
                payload: vec![1u8; 100_000].into(),
            },
        };
        let records = plan(&big, &naming(65_536));
        let letter = DeadLetter::decode(records[0].value.as_slice()).unwrap();
        assert!(letter.payload_truncated);
        assert_eq!(letter.payload_size, 100_000);
    }
}
