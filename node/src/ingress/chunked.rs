//! Chunked uploads: cameras limited to small MQTT payloads (for example 128 KB) send a frame as
//! `FrameChunk` messages on a chunk topic; this reassembles them (with `fovea_proto::chunks`, the
//! same Aggregator consumers use) before the frame enters the pipeline like any other.
//!
//! Every chunk is acknowledged exactly once, whatever becomes of its upload:
//! - a chunk that adds to an upload still missing chunks is stored ([`super::chunk_store`]) and
//!   acked once stored, so an upload may be longer than the broker's in-flight window;
//! - the chunk that completes (or contradicts) its upload travels with the frame (or its dead
//!   letter) and is acked when that is durable, together with the release of the stored chunks;
//! - a chunk that changes nothing (a duplicate, a late chunk of a finished frame) is acked at
//!   once;
//! - a chunk that cannot be stored (disk full) keeps its ack with its upload instead, as every
//!   chunk's did before the store existed.
//!
//! Memory is bounded by the Aggregator's limits (frames and bytes in flight,
//! `mqtt.max_frame_bytes` per frame); a frame whose chunks do not all arrive within
//! `large_frames.chunk_timeout_ms`, that is evicted for room, or that is inconsistent becomes a
//! dead letter, and its stored chunks are released once the dead letter is durable. This is a
//! plain struct: the caller does the store's I/O ([`Pushed::store`]) and the acks.

use super::chunk_store::{ChunkStore, Stored};
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

/// A chunk to store before its ack is sent.
pub struct StoreChunk {
    pub camera: String,
    pub frame_id: String,
    pub upload: String,
    pub index: u32,
    pub bytes: Vec<u8>,
    pub ack: Ack,
}

/// What one chunk publish led to.
#[derive(Default)]
pub struct Pushed {
    /// The chunk adds to an upload in progress: store it, then send `ack` (or, if storing
    /// fails, give the ack back with [`ChunkedUploads::hold`]).
    pub store: Option<StoreChunk>,
    /// The chunk changed nothing: send this ack now.
    pub ack_now: Option<Ack>,
    /// Uploads that ended (this chunk's, or others evicted to make room for it).
    pub uploads: Vec<Upload>,
}

pub struct ChunkedUploads {
    aggregator: Aggregator,
    store: Option<ChunkStore>,
    /// Acks held per (camera, frame id) until the upload ends: only those of chunks that could
    /// not be stored.
    held: HashMap<(String, String), Vec<Ack>>,
}

impl ChunkedUploads {
    /// Uploads reassembled under these limits; chunks stored in `store` (None: every chunk's ack
    /// is held with its upload, as for a store that cannot be written).
    pub fn new(
        max_frame_bytes: usize,
        max_uploads: usize,
        timeout: Duration,
        store: Option<ChunkStore>,
    ) -> Self {
        ChunkedUploads {
            aggregator: Aggregator::new(Limits {
                max_frame_bytes: max_frame_bytes as u64,
                max_frames_in_flight: max_uploads,
                max_bytes_in_flight: (max_frame_bytes as u64).saturating_mul(2),
                timeout,
            }),
            store,
            held: HashMap::new(),
        }
    }

    /// Feeds back the chunks a previous run stored (and acked): returns the uploads they
    /// complete; the others wait for their missing chunks, their timeout counting from `now`.
    pub fn replay(&mut self, stored: Vec<Stored>, now: Instant) -> Vec<Upload> {
        let mut uploads = Vec::new();
        for Stored { upload, bytes } in stored {
            match FrameChunk::decode(bytes.as_slice()) {
                Ok(chunk) if !chunk.frame_id.is_empty() => {
                    let outcomes = self.aggregator.push(chunk, now);
                    uploads.extend(self.finish(outcomes, None));
                }
                _ => log::warn!("chunk store: a chunk of upload {upload} does not decode; skipped"),
            }
        }
        uploads
    }

    /// Feeds one chunk publish from `camera`.
    pub fn push(&mut self, camera: &str, payload: &[u8], ack: Ack, now: Instant) -> Pushed {
        let mut chunk = match FrameChunk::decode(payload) {
            Ok(chunk) if !chunk.frame_id.is_empty() => chunk,
            Ok(_) => return refused(camera, ack, "chunk without a frame_id".into()),
            Err(e) => return refused(camera, ack, format!("not a fovea.v1.FrameChunk: {e}")),
        };
        // The topic names the camera; a chunk cannot speak for another one.
        chunk.camera_id = camera.to_string();
        let key = (camera.to_string(), chunk.frame_id.clone());
        let index = chunk.index;
        let bytes = chunk.encode_to_vec();
        let before = self.aggregator.stats();
        let outcomes = self.aggregator.push(chunk, now);
        let after = self.aggregator.stats();
        let ends_own = outcomes
            .iter()
            .any(|o| o.key() == (key.0.as_str(), key.1.as_str()));
        let mut pushed = Pushed::default();
        let mut own = Some(ack);
        if ends_own {
            pushed.uploads = self.finish(outcomes, Some((&key, own.take().unwrap_or_default())));
        } else {
            pushed.uploads = self.finish(outcomes, None);
            let ack = own.take().unwrap_or_default();
            if after != before {
                pushed.ack_now = Some(ack);
            } else if self.store.is_some() {
                pushed.store = Some(StoreChunk {
                    upload: ChunkStore::upload_name(&key.0, &key.1),
                    camera: key.0,
                    frame_id: key.1,
                    index,
                    bytes,
                    ack,
                });
            } else {
                self.hold(&key.0, &key.1, ack);
            }
        }
        pushed
    }

    /// Keeps the ack of a chunk that could not be stored with its upload (sent when the upload
    /// ends). If the upload has ended meanwhile, the ack is returned to be sent now.
    pub fn hold(&mut self, camera: &str, frame_id: &str, ack: Ack) -> Option<Ack> {
        if !self.aggregator.is_pending(camera, frame_id) {
            return Some(ack);
        }
        self.held
            .entry((camera.to_string(), frame_id.to_string()))
            .or_default()
            .push(ack);
        None
    }

    /// Uploads that timed out by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Upload> {
        let outcomes = self.aggregator.expire(now);
        self.finish(outcomes, None)
    }

    /// Uploads in progress.
    pub fn in_flight(&self) -> usize {
        self.aggregator.in_flight().0
    }

    /// Each ended upload with its ack: held acks, the release of its stored chunks, and `own`,
    /// the ack of the chunk that ended it.
    fn finish(
        &mut self,
        outcomes: Vec<Outcome>,
        own: Option<(&(String, String), Ack)>,
    ) -> Vec<Upload> {
        let mut own = own.map(|(k, a)| (k.clone(), a));
        outcomes
            .into_iter()
            .map(|outcome| {
                let (camera, frame_id) = {
                    let (c, f) = outcome.key();
                    (c.to_string(), f.to_string())
                };
                let result = upload_result(outcome);
                let key = (camera.clone(), frame_id);
                let mut acks = self.held.remove(&key).unwrap_or_default();
                if own.as_ref().is_some_and(|(k, _)| *k == key)
                    && let Some((_, ack)) = own.take()
                {
                    acks.push(ack);
                }
                if let Some(store) = self.store.clone() {
                    let upload = ChunkStore::upload_name(&key.0, &key.1);
                    acks.push(Ack::release(Box::new(move || store.remove(&upload))));
                }
                Upload {
                    camera,
                    ack: Ack::merge(acks),
                    result,
                }
            })
            .collect()
    }
}

fn upload_result(outcome: Outcome) -> Result<Bytes, Rejection> {
    match outcome {
        Outcome::Complete(done) => {
            let frame = Frame {
                camera_id: done.camera_id,
                // A numeric frame id is the camera's sequence number.
                sequence: done.frame_id.parse().unwrap_or(0),
                content_type: done.content_type,
                metadata: done.metadata,
                data: done.payload,
                ..Frame::default()
            };
            Ok(Bytes::from(frame.encode_to_vec()))
        }
        Outcome::Incomplete {
            frame_id,
            received,
            count,
            missing,
            reason,
            ..
        } => Err(Rejection::ChunksIncomplete(format!(
            "frame {frame_id:?}: {received} of {count} chunks ({reason:?}); missing {missing:?}"
        ))),
        Outcome::Rejected {
            frame_id, reason, ..
        } => Err(Rejection::ChunkRejected(format!(
            "frame {frame_id:?}: {reason}"
        ))),
    }
}

fn refused(camera: &str, ack: Ack, why: String) -> Pushed {
    Pushed {
        uploads: vec![Upload {
            camera: camera.to_string(),
            ack,
            result: Err(Rejection::BadChunk(why)),
        }],
        ..Pushed::default()
    }
}

#[cfg(test)]
#[path = "chunked_tests.rs"]
mod tests;
