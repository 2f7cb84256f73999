//! What travels between the stages: a [`Job`] from ingress to the workers, a [`Done`] from the
//! workers (or straight from ingress, for payloads refused at the door) to the outbox, with the
//! acknowledgement ([`Ack`]) it carries, the cameras and their frames' order ([`Cameras`]), the reasons a payload is refused ([`Rejection`]),
//! the guard that turns a panic on one frame into such a reason ([`contain`]) and the record ids
//! every stage names frames by. A leaf: it depends on no other stage, so ingress,
//! pipeline and outbox depend on it and not on each other.

mod ack;
mod cameras;
mod panic;
mod rejection;

pub use ack::{Ack, HeldAcks, Release};
use bytes::Bytes;
pub use cameras::{Cameras, TooManyCameras, UNKNOWN_CAMERA};
use fovea_proto::v1::{Frame, InferenceResult};
pub use panic::contain;
pub use rejection::Rejection;
use sha2::{Digest, Sha256};
use std::time::Instant;

/// A frame as it arrived, before anything was decoded.
#[derive(Debug)]
pub struct Job {
    pub meta: JobMeta,
    pub payload: Bytes,
}

/// Everything about a frame's journey that every stage needs, whatever became of the frame.
#[derive(Debug)]
pub struct JobMeta {
    /// Camera id from the topic (`_unknown` when the topic named none).
    pub camera: String,
    /// Where the payload came from, e.g. `mqtt:cameras/cam-1/frames`.
    pub source: String,
    /// Per-camera arrival order in this process: the outbox writes records in this order so that
    /// a camera's records stay ordered in Kafka even when several workers infer in parallel.
    pub node_seq: u64,
    /// Monotonic arrival time, for stage latencies and the staleness policy.
    pub received: Instant,
    /// Wall-clock arrival time for the records, milliseconds since the Unix epoch.
    pub received_at_ms: i64,
    /// Acknowledges the MQTT publish once every record about the frame is durable.
    pub ack: Ack,
    /// When a worker picked the job up (None for jobs that never reached one).
    pub started: Option<Instant>,
    /// When inference (or rejection) finished.
    pub finished: Option<Instant>,
    /// For a frame over the record limit: its place among `large_frames.max_in_flight`, given
    /// back when this is dropped (after the frame's records are durable).
    pub large_permit: Option<tokio::sync::OwnedSemaphorePermit>,
}

impl JobMeta {
    /// A frame of `camera` arriving now from `source`, `node_seq`-th of its camera in this
    /// process, acknowledged by `ack` once durable.
    pub fn arrived(camera: &str, source: String, node_seq: u64, ack: Ack) -> JobMeta {
        JobMeta {
            camera: camera.to_string(),
            source,
            node_seq,
            received: Instant::now(),
            received_at_ms: now_ms(),
            ack,
            started: None,
            finished: None,
            large_permit: None,
        }
    }
}

/// What became of a job.
#[derive(Debug)]
pub enum Verdict {
    /// A decodable frame: the frame to store and its inference result (OK, skipped or failed).
    Frame {
        frame: Box<Frame>,
        result: Box<InferenceResult>,
    },
    /// A payload that is not a usable frame: dead-lettered with the reason.
    Rejected {
        rejection: Rejection,
        payload: Bytes,
    },
}

#[derive(Debug)]
pub struct Done {
    pub meta: JobMeta,
    pub verdict: Verdict,
}

/// Milliseconds since the Unix epoch, now.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// `node/camera/frame-id`: the record id on every record about this frame.
pub fn record_id(node: &str, camera: &str, frame_id: &str) -> String {
    format!("{node}/{camera}/{frame_id}")
}

pub fn sha256_hex(data: &[u8]) -> String {
    hex::encode(Sha256::digest(data))
}
