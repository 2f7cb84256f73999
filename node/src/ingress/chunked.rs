//! Chunked uploads: cameras limited to small MQTT payloads (for example 128 KB) send a frame as
//! `FrameChunk` messages on a chunk topic; this reassembles them (with `fovea_proto::chunks`, the
//! same Aggregator consumers use) before the frame enters the pipeline like any other.
//!
//! Every chunk's PUBACK is held until the whole frame is durable, so a node that dies mid-upload
//! gets every chunk again. Memory is bounded by the Aggregator's limits (frames and bytes in
//! flight, `mqtt.max_frame_bytes` per frame); a frame whose chunks do not all arrive within
//! `large_frames.chunk_timeout_ms`, or that is inconsistent, becomes a dead letter (and its
//! chunks are acked: the dead letter is the durable record of what happened).

use super::payload::Rejection;
use crate::job::Ack;
use bytes::Bytes;
use fovea_proto::chunks::{Aggregator, Limits, Outcome};
use fovea_proto::v1::{Frame, FrameChunk};
use prost::Message;
use std::collections::HashMap;
use std::time::{Duration, Instant};

/// A finished upload: a whole frame to infer, or the reason there is none.
pub struct Upload {
    pub camera: String,
    pub ack: Ack,
    pub result: Result<Bytes, Rejection>,
}

pub struct ChunkedUploads {
    aggregator: Aggregator,
    /// PUBACKs held per (camera, frame id) until the frame is durable.
    acks: HashMap<(String, String), Vec<Ack>>,
}

impl ChunkedUploads {
    pub fn new(max_frame_bytes: usize, max_uploads: usize, timeout: Duration) -> Self {
        ChunkedUploads {
            aggregator: Aggregator::new(Limits {
                max_frame_bytes: max_frame_bytes as u64,
                max_frames_in_flight: max_uploads,
                max_bytes_in_flight: (max_frame_bytes as u64).saturating_mul(2),
                timeout,
            }),
            acks: HashMap::new(),
        }
    }

    /// Feeds one chunk publish from `camera`. Returns the uploads it finished, or the refusal of
    /// a payload that is no chunk at all.
    pub fn push(&mut self, camera: &str, payload: &[u8], ack: Ack, now: Instant) -> Vec<Upload> {
        let mut chunk = match FrameChunk::decode(payload) {
            Ok(chunk) if !chunk.frame_id.is_empty() => chunk,
            Ok(_) => return vec![refused(camera, ack, "chunk without a frame_id".into())],
            Err(e) => {
                return vec![refused(
                    camera,
                    ack,
                    format!("not a fovea.v1.FrameChunk: {e}"),
                )];
            }
        };
        // The topic names the camera; a chunk cannot speak for another one.
        chunk.camera_id = camera.to_string();
        self.acks
            .entry((camera.to_string(), chunk.frame_id.clone()))
            .or_default()
            .push(ack);
        let outcomes = self.aggregator.push(chunk, now);
        self.finish(outcomes)
    }

    /// Uploads that timed out by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Upload> {
        let outcomes = self.aggregator.expire(now);
        self.finish(outcomes)
    }

    fn finish(&mut self, outcomes: Vec<Outcome>) -> Vec<Upload> {
        outcomes
            .into_iter()
            .map(|outcome| {
                let (camera, frame_id, result) = match outcome {
                    Outcome::Complete(done) => {
                        let frame = Frame {
                            camera_id: done.camera_id.clone(),
                            // A numeric frame id is the camera's sequence number.
                            sequence: done.frame_id.parse().unwrap_or(0),
                            content_type: done.content_type.clone(),
                            metadata: done.metadata.clone(),
                            data: done.payload,
                            ..Frame::default()
                        };
                        (done.camera_id, done.frame_id, Ok(Bytes::from(frame.encode_to_vec())))
                    }
                    Outcome::Incomplete {
                        frame_id,
                        camera_id,
                        received,
                        count,
                        missing,
                        reason,
                    } => {
                        let why = Rejection::ChunksIncomplete(format!(
                            "frame {frame_id:?}: {received} of {count} chunks ({reason:?}); missing {missing:?}"
                        ));
                        (camera_id, frame_id, Err(why))
                    }
                    Outcome::Rejected {
                        frame_id,
                        camera_id,
                        reason,
                    } => {
                        let why = Rejection::ChunkRejected(format!("frame {frame_id:?}: {reason}"));
                        (camera_id, frame_id, Err(why))
                    }
                };
                let acks = self
                    .acks
                    .remove(&(camera.clone(), frame_id))
                    .unwrap_or_default();
                Upload {
                    camera,
                    ack: Ack::merge(acks),
                    result,
                }
            })
            .collect()
    }
}

fn refused(camera: &str, ack: Ack, why: String) -> Upload {
    Upload {
        camera: camera.to_string(),
        ack,
        result: Err(Rejection::BadChunk(why)),
    }
}
