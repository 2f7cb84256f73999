//! Turns a finished job into the records to write: the frame (inline, claim check, chunked, or a
//! dead letter), its result, or the dead letter of a refused payload; and the dead letter that
//! replaces a record the broker refused for good.
//!
//! The size policy (`large_frames.policy`) is applied here and recorded on every frame record
//! (`fovea-size-policy`) and in its result's `frame` disposition; the records themselves are
//! built, sized and chunked by [`crate::records`]. Whatever became of the frame, its result (or a
//! dead letter standing in for it) is written. Nothing here talks to Kafka.

use crate::config::{LargeFramePolicy, TopicsConfig};
use crate::job::Rejection;
use crate::job::{Done, JobMeta, Verdict};
use crate::records::{
    self, Record, RecordKind, RecordLimit, SizePolicy, fit_dead_letter, fit_result,
};
use bytes::Bytes;
use fovea_proto::headers as h;
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult};

/// What the outbox needs to name and size records.
#[derive(Debug, Clone)]
pub struct RecordPlanner {
    pub node_id: String,
    pub topics: TopicsConfig,
    /// `kafka.record_limit_bytes`.
    pub limit: RecordLimit,
    /// What to do with a frame whose record would not fit.
    pub large_policy: LargeFramePolicy,
}

impl RecordPlanner {
    /// The records for one finished job, in the order they must be written. A panic while
    /// building them (encoding, sizing, chunking) is this frame's problem only: its records are
    /// replaced by one `internal-error` dead letter, so that the frame is still acked.
    pub fn plan(&self, done: &Done) -> Vec<Record> {
        crate::job::contain(|| match &done.verdict {
            Verdict::Frame { frame, result } => self.plan_frame(frame, result),
            Verdict::Rejected { rejection, payload } => {
                vec![self.rejected(&done.meta, rejection, payload)]
            }
        })
        .unwrap_or_else(|rejection| {
            log::error!(
                "building the records of a frame from {} panicked: {rejection}",
                done.meta.source
            );
            let payload = match &done.verdict {
                Verdict::Frame { frame, .. } => &frame.data,
                Verdict::Rejected { payload, .. } => payload,
            };
            vec![self.rejected(&done.meta, &rejection, payload)]
        })
    }

    fn plan_frame(&self, frame: &Frame, result: &InferenceResult) -> Vec<Record> {
        panic_if_marked(frame);
        let mut result = result.clone();
        let disposition = result.frame.get_or_insert_default();
        let allow_chunks = self.large_policy != LargeFramePolicy::DeadLetter;
        let mut records = match records::frame_records(
            frame,
            &self.topics.frames,
            &[],
            self.limit,
            allow_chunks,
        ) {
            Ok(out) => {
                disposition.topic = self.topics.frames.clone();
                disposition.size_policy = out.policy.as_str().into();
                out.records
            }
            Err(too_large) => {
                let reason = format!(
                    "frame record of {} bytes exceeds kafka.record_limit_bytes ({} bytes, less {} for framing){}",
                    too_large.size,
                    too_large.limit,
                    records::FRAMING_ALLOWANCE,
                    if allow_chunks {
                        too_large.detail
                    } else {
                        ", and large_frames.policy is dead_letter".into()
                    }
                );
                disposition.topic = self.topics.deadletter.clone();
                disposition.size_policy = SizePolicy::DeadLetter.as_str().into();
                disposition.reason = reason.clone();
                let letter = DeadLetter {
                    record_id: frame.record_id.clone(),
                    node_id: frame.node_id.clone(),
                    camera_id: frame.camera_id.clone(),
                    source: String::new(),
                    kind: "record-too-large".into(),
                    reason,
                    payload_size: frame.data.len() as u64,
                    payload_sha256: crate::job::sha256_hex(&frame.data),
                    payload: Bytes::new(),
                    payload_truncated: true,
                    received_at_ms: frame.received_at_ms,
                };
                vec![fit_dead_letter(
                    &letter,
                    &self.topics.deadletter,
                    self.limit,
                )]
            }
        };
        records.push(
            match fit_result(&result, &self.topics.results, self.limit) {
                Ok(record) => record,
                Err(letter) => fit_dead_letter(&letter, &self.topics.deadletter, self.limit),
            },
        );
        records
    }

    fn rejected(&self, meta: &JobMeta, rejection: &Rejection, payload: &Bytes) -> Record {
        let sha = crate::job::sha256_hex(payload);
        let letter = DeadLetter {
            record_id: crate::job::record_id(
                &self.node_id,
                &meta.camera,
                &format!("h{}", &sha[..16]),
            ),
            node_id: self.node_id.clone(),
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
        fit_dead_letter(&letter, &self.topics.deadletter, self.limit)
    }

    /// The dead letter (`record-refused`) that stands in for `refused`, a record the broker will
    /// never take, with the broker's error. It keeps the refused record's ids, size and checksum,
    /// not its bytes (which may be what was refused).
    pub fn refused(&self, refused: &Record, error: &str) -> Record {
        let camera = refused
            .header(h::CAMERA)
            .unwrap_or(&refused.key)
            .to_string();
        let letter = DeadLetter {
            record_id: refused.record_id().unwrap_or_default().to_string(),
            node_id: self.node_id.clone(),
            camera_id: camera,
            source: format!("kafka:{}", refused.topic),
            kind: "record-refused".into(),
            reason: format!(
                "the broker refused the {} record of {} bytes for {}: {error}",
                refused.kind.schema(),
                refused.size(),
                refused.topic
            ),
            payload_size: refused.value.len() as u64,
            payload_sha256: crate::job::sha256_hex(&refused.value),
            payload: Bytes::new(),
            payload_truncated: true,
            received_at_ms: crate::job::now_ms(),
        };
        fit_dead_letter(&letter, &self.topics.deadletter, self.limit)
    }

    /// Whether `record` is a dead letter (so that a refused dead letter is not replaced by
    /// another one forever).
    pub fn is_dead_letter(record: &Record) -> bool {
        record.kind == RecordKind::DeadLetter
    }
}

/// Test-only hook (unit tests of this module and of the outbox loop): a frame whose camera
/// metadata has this key makes [`RecordPlanner::plan`] panic while building its records, the
/// way a bug in encoding, sizing or chunking would. Not compiled outside `cfg(test)`; the
/// end-to-end tests' hook for the workers is `FOVEA_TEST_PANIC_ON_METADATA` (pipeline/workers.rs).
#[cfg(test)]
pub(crate) const TEST_PANIC_KEY: &str = "fovea-test-plan-panic";

#[cfg(test)]
fn panic_if_marked(frame: &Frame) {
    if frame.metadata.contains_key(TEST_PANIC_KEY) {
        panic!(
            "test-only panic while building the records of {}",
            frame.record_id
        );
    }
}

#[cfg(not(test))]
fn panic_if_marked(_: &Frame) {}

/// Marks a finished frame for [`TEST_PANIC_KEY`].
#[cfg(test)]
pub(crate) fn mark_for_panic(done: &mut Done) {
    if let Verdict::Frame { frame, .. } = &mut done.verdict {
        frame.metadata.insert(TEST_PANIC_KEY.into(), "1".into());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::job::Ack;
    use fovea_proto::Message;

    fn planner(limit: usize) -> RecordPlanner {
        RecordPlanner {
            node_id: "n1".into(),
            topics: crate::config::Config::default().kafka.topics,
            limit: RecordLimit::new(limit),
            large_policy: LargeFramePolicy::DeadLetter,
        }
    }

    fn meta() -> JobMeta {
        JobMeta::arrived("cam", "mqtt:cameras/cam/frames".into(), 1, Ack::none())
    }

    fn frame_done(size: usize, metadata_bytes: usize) -> Done {
        let metadata: std::collections::HashMap<String, String> = (0..metadata_bytes / 50_000)
            .map(|i| (format!("k{i}"), "v".repeat(50_000)))
            .collect();
        let frame = Frame {
            camera_id: "cam".into(),
            record_id: "n1/cam/s1".into(),
            node_id: "n1".into(),
            data: vec![7u8; size].into(),
            metadata: metadata.clone(),
            ..Frame::default()
        };
        let result = InferenceResult {
            record_id: "n1/cam/s1".into(),
            camera_id: "cam".into(),
            metadata,
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
            .expect("a result");
        InferenceResult::decode(r.value.as_slice()).expect("decodes")
    }

    #[test]
    fn small_frame_goes_inline_with_its_result() {
        let records = planner(1 << 20).plan(&frame_done(1000, 0));
        let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RecordKind::Frame, RecordKind::Result]);
        let disposition = result_of(&records).frame.unwrap();
        assert_eq!(disposition.size_policy, "inline");
        assert_eq!(disposition.topic, "fovea.frames");
    }

    #[test]
    fn oversized_frame_is_chunked_when_the_policy_allows() {
        let mut p = planner(65_536);
        p.large_policy = LargeFramePolicy::Chunk;
        let records = p.plan(&frame_done(300_000, 0));
        assert!(
            records
                .iter()
                .filter(|r| r.kind == RecordKind::FrameChunk)
                .count()
                >= 5
        );
        assert!(records.iter().all(|r| p.limit.fits(r)));
        assert_eq!(result_of(&records).frame.unwrap().size_policy, "chunked");
    }

    #[test]
    fn oversized_frame_is_dead_lettered_and_its_result_kept() {
        let records = planner(65_536).plan(&frame_done(70_000, 0));
        let kinds: Vec<_> = records.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RecordKind::DeadLetter, RecordKind::Result]);
        let letter = DeadLetter::decode(records[0].value.as_slice()).unwrap();
        assert_eq!(letter.kind, "record-too-large");
        assert!(letter.payload_truncated && letter.payload.is_empty());
        assert_eq!(letter.payload_size, 70_000);
        assert!(letter.reason.contains("large_frames.policy is dead_letter"));
        let disposition = result_of(&records).frame.unwrap();
        assert_eq!(disposition.size_policy, "dead-letter");
        assert_eq!(disposition.topic, "fovea.deadletter");
    }

    #[test]
    fn two_mib_of_metadata_still_gives_records_that_fit() {
        let mut p = planner(1 << 20);
        p.large_policy = LargeFramePolicy::Chunk;
        let records = p.plan(&frame_done(10_000, 2 << 20));
        assert!(records.iter().all(|r| p.limit.fits(r)), "every record fits");
        let result = result_of(&records);
        assert!(result.metadata.contains_key(records::METADATA_DROPPED));
    }

    #[test]
    fn a_panic_while_planning_a_frame_is_its_internal_error_and_the_next_frame_is_planned() {
        let p = planner(1 << 20);
        let mut marked = frame_done(1000, 0);
        mark_for_panic(&mut marked);
        let records = p.plan(&marked);
        assert_eq!(
            records.len(),
            1,
            "one dead letter instead of frame and result"
        );
        assert_eq!(records[0].kind, RecordKind::DeadLetter);
        assert_eq!(records[0].header(h::ERROR_KIND), Some("internal-error"));
        let letter = DeadLetter::decode(records[0].value.as_slice()).unwrap();
        assert_eq!(letter.kind, "internal-error");
        assert!(
            letter
                .reason
                .contains("panic: test-only panic while building the records of n1/cam/s1 (at "),
            "{}",
            letter.reason
        );
        assert!(letter.reason.contains("plan.rs:"), "{}", letter.reason);
        assert_eq!(letter.source, "mqtt:cameras/cam/frames");
        assert_eq!(letter.camera_id, "cam");
        // The image is the evidence, kept as for any refused payload.
        assert_eq!(letter.payload_size, 1000);
        assert_eq!(&letter.payload[..], &[7u8; 1000][..]);

        let next = p.plan(&frame_done(1000, 0));
        let kinds: Vec<_> = next.iter().map(|r| r.kind).collect();
        assert_eq!(kinds, [RecordKind::Frame, RecordKind::Result]);
        assert_eq!(result_of(&next).frame.unwrap().size_policy, "inline");
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
        let records = planner(1 << 20).plan(&done);
        let letter = DeadLetter::decode(records[0].value.as_slice()).unwrap();
        assert_eq!(&letter.payload[..], b"abc");
        assert_eq!(letter.reason, "empty payload");
        assert_eq!(letter.source, "mqtt:cameras/cam/frames");
    }

    #[test]
    fn a_refused_record_becomes_a_record_refused_dead_letter_that_fits() {
        let p = planner(65_536);
        let records = p.plan(&frame_done(1000, 0));
        let letter_record = p.refused(&records[0], &"Broker: Message size too large ".repeat(5000));
        assert!(p.limit.fits(&letter_record));
        assert_eq!(letter_record.header(h::ERROR_KIND), Some("record-refused"));
        assert_eq!(letter_record.record_id(), Some("n1/cam/s1"));
        let letter = DeadLetter::decode(letter_record.value.as_slice()).unwrap();
        assert_eq!(letter.payload_size, records[0].value.len() as u64);
        assert!(
            letter
                .reason
                .starts_with("the broker refused the fovea.v1.Frame record")
        );
        assert!(RecordPlanner::is_dead_letter(&letter_record));
    }
}
