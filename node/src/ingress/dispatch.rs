//! What to do with each MQTT delivery: a frame for the workers, a chunk for reassembly, or a
//! refusal (a dead letter straight to the outbox). It runs as its own task, fed by the connection
//! ([`super::mqtt`]) through a channel, so that it may wait (for a place in the inference queue,
//! a large-frame permit, a chunk's write) while the connection goes on being polled: keep-alive
//! never depends on how busy the node is. Back-pressure is the deliveries it holds un-acked:
//! the broker sends no more than its in-flight window of those.
//!
//! QoS 0 deliveries have no ack to hold: they are taken at most once, and dropped (counted in
//! `fovea_mqtt_qos0_dropped_total`) when the inference queue has no room for them.

use super::chunk_store::ChunkStore;
use super::chunked::{ChunkedUploads, Pushed, Upload};
use super::payload::Rejection;
use super::spill::Spilled;
use super::topic::{self, TopicMatch};
use crate::config::{LargeFramesConfig, MqttConfig};
use crate::job::{Ack, Cameras, Done, Job, JobMeta, UNKNOWN_CAMERA, Verdict};
use crate::stats::{IngressWait, Stats};
use bytes::Bytes;
use rumqttc::{Publish, QoS};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::{Semaphore, watch};

/// One delivery from the broker, with its ack (counted as held from the moment it arrived).
pub struct Delivery {
    pub publish: Publish,
    pub ack: Ack,
    /// The payload, when it waits on disk ([`super::spill`]) instead of in `publish`.
    pub spilled: Option<Spilled>,
}

/// QoS 0 deliveries queued between the connection and the dispatcher; the connection drops more
/// than the inference queue's capacity of them rather than let a flood of them grow memory.
#[derive(Debug, Default)]
pub struct BestEffort {
    pub queued: AtomicUsize,
    pub limit: usize,
}

/// What the dispatcher needs to know about large frames.
pub struct LargeFrameLimits<'a> {
    pub config: &'a LargeFramesConfig,
    pub record_limit: usize,
}

pub struct Dispatcher {
    cfg: MqttConfig,
    jobs: async_channel::Sender<Job>,
    done: UnboundedSender<Done>,
    stats: Arc<Stats>,
    cameras: Arc<Cameras>,
    best_effort: Arc<BestEffort>,
    chunks: ChunkedUploads,
    store: Option<ChunkStore>,
    /// Permits for frames over the record limit (`large_frames.max_in_flight`).
    large: Arc<Semaphore>,
    record_limit: usize,
    /// Uploads the chunk store completed at start, handed on when `run` begins.
    pending_replay: Vec<Upload>,
}

/// Where the parts of the dispatcher come from.
pub struct DispatcherParts<'a> {
    pub cfg: &'a MqttConfig,
    pub jobs: async_channel::Sender<Job>,
    pub done: UnboundedSender<Done>,
    pub stats: Arc<Stats>,
    pub cameras: Arc<Cameras>,
    pub best_effort: Arc<BestEffort>,
    pub large: LargeFrameLimits<'a>,
    /// The chunk store and what a previous run left in it.
    pub store: Option<(ChunkStore, Vec<super::chunk_store::Stored>)>,
}

impl Dispatcher {
    pub fn new(parts: DispatcherParts<'_>) -> Self {
        let lf = parts.large.config;
        let (store, stored) = match parts.store {
            Some((store, stored)) => (Some(store), stored),
            None => (None, Vec::new()),
        };
        let mut chunks = ChunkedUploads::new(
            parts.cfg.max_frame_bytes,
            lf.max_chunked_uploads,
            Duration::from_millis(lf.chunk_timeout_ms),
            store.clone(),
        );
        if !stored.is_empty() {
            log::info!(
                "chunk store: {} chunk(s) of uploads in progress left by the last run",
                stored.len()
            );
        }
        let pending_replay = chunks.replay(stored, Instant::now());
        Dispatcher {
            cfg: parts.cfg.clone(),
            jobs: parts.jobs,
            done: parts.done,
            stats: parts.stats,
            cameras: parts.cameras,
            best_effort: parts.best_effort,
            chunks,
            store,
            large: Arc::new(Semaphore::new(lf.max_in_flight)),
            record_limit: parts.large.record_limit,
            pending_replay,
        }
    }

    /// Takes deliveries until `shutdown` turns true or the connection goes away; then closes
    /// the workers' queue, so that the workers and then the outbox finish what they hold.
    /// Deliveries still queued are dropped un-acked: the broker redelivers them next session.
    pub async fn run(
        mut self,
        mut deliveries: UnboundedReceiver<Delivery>,
        mut shutdown: watch::Receiver<bool>,
    ) {
        let replayed = std::mem::take(&mut self.pending_replay);
        self.finish_uploads(replayed, "chunk-store").await;
        let mut expiry = tokio::time::interval(Duration::from_millis(500));
        let mut eviction = tokio::time::interval(Duration::from_secs(10));
        loop {
            tokio::select! {
                delivery = deliveries.recv() => match delivery {
                    Some(d) => self.accept(d).await,
                    None => break,
                },
                _ = expiry.tick() => {
                    let uploads = self.chunks.expire(Instant::now());
                    self.finish_uploads(uploads, "mqtt:chunks").await;
                }
                _ = eviction.tick() => {
                    let evicted = self.cameras.evict_idle(Instant::now());
                    self.stats.cameras_evicted.fetch_add(evicted as u64, Ordering::Relaxed);
                    self.stats.cameras_known.store(self.cameras.len() as u64, Ordering::Relaxed);
                }
                _ = shutdown.changed() => break,
            }
        }
        self.jobs.close();
        log::info!("ingress: no longer taking frames; waiting for frames in flight");
    }

    async fn accept(
        &mut self,
        Delivery {
            mut publish,
            ack,
            spilled,
        }: Delivery,
    ) {
        if let Some(spilled) = spilled {
            match spilled.take() {
                Ok(payload) => publish.payload = payload,
                Err(e) => {
                    // Dropped un-acked; the connection renews its session for it.
                    log::error!(
                        "ingress: a spilled payload of {} is lost: {e}",
                        publish.topic
                    );
                    return;
                }
            }
        }
        let best_effort = publish.qos == QoS::AtMostOnce;
        if best_effort {
            self.best_effort.queued.fetch_sub(1, Ordering::Relaxed);
        }
        let source = format!("mqtt:{}", publish.topic);
        let chunk = topic::classify(&self.cfg.chunk_topics, &publish.topic);
        let camera = match (chunk, topic::classify(&self.cfg.topics, &publish.topic)) {
            (TopicMatch::Camera(camera), _) => {
                let camera = camera.to_string();
                return self.chunk(&camera, source, ack, publish.payload).await;
            }
            (TopicMatch::BadCamera(id), _) | (_, TopicMatch::BadCamera(id)) => {
                let rejection = Rejection::BadCameraId {
                    topic: publish.topic.clone(),
                    why: topic::why_invalid(id),
                };
                return self.refuse(UNKNOWN_CAMERA, source, ack, rejection, publish.payload);
            }
            (TopicMatch::NoMatch, TopicMatch::NoMatch) => {
                let rejection = Rejection::BadTopic(publish.topic.clone());
                return self.refuse(UNKNOWN_CAMERA, source, ack, rejection, publish.payload);
            }
            (TopicMatch::NoMatch, TopicMatch::Camera(camera)) => camera.to_string(),
        };
        let size = publish.payload.len();
        if size > self.cfg.max_frame_bytes {
            let limit = self.cfg.max_frame_bytes;
            let rejection = Rejection::TooLarge { size, limit };
            return self.refuse(&camera, source, ack, rejection, publish.payload);
        }
        self.enqueue(&camera, source, ack, publish.payload, best_effort)
            .await;
    }

    /// One chunk: stored and acked, acked at once, or ending its upload.
    async fn chunk(&mut self, camera: &str, source: String, ack: Ack, payload: Bytes) {
        if let Err(too_many) = self.cameras.admits(camera, Instant::now()) {
            let rejection = Rejection::TooManyCameras {
                camera: camera.to_string(),
                max: too_many.max,
            };
            return self.refuse(UNKNOWN_CAMERA, source, ack, rejection, payload);
        }
        let Pushed {
            store,
            ack_now,
            uploads,
        } = self.chunks.push(camera, &payload, ack, Instant::now());
        if let Some(ack) = ack_now {
            ack.send().await;
        }
        if let (Some(op), Some(store)) = (store, self.store.clone()) {
            self.stats.set_ingress_wait(IngressWait::ChunkStore);
            let (upload, index, bytes) = (op.upload.clone(), op.index, op.bytes);
            let written =
                tokio::task::spawn_blocking(move || store.write(&upload, index, &bytes)).await;
            self.stats.set_ingress_wait(IngressWait::Nothing);
            match written {
                Ok(Ok(())) => {
                    Stats::incr(&self.stats.chunks_stored);
                    op.ack.send().await;
                }
                Ok(Err(e)) => {
                    log::warn!(
                        "chunk store: cannot store chunk {index} of {:?} from {camera}: {e}; its ack waits for the whole frame",
                        op.frame_id
                    );
                    if let Some(ack) = self.chunks.hold(&op.camera, &op.frame_id, op.ack) {
                        ack.send().await;
                    }
                }
                Err(e) => log::error!("chunk store: write task failed: {e}"),
            }
        }
        self.finish_uploads(uploads, &source).await;
    }

    /// Frames (or failures) of chunked uploads that completed or ended.
    async fn finish_uploads(&mut self, uploads: Vec<Upload>, source: &str) {
        for upload in uploads {
            match upload.result {
                Ok(payload) => {
                    self.enqueue(
                        &upload.camera,
                        source.to_string(),
                        upload.ack,
                        payload,
                        false,
                    )
                    .await
                }
                Err(rejection) => self.refuse(
                    &upload.camera,
                    source.to_string(),
                    upload.ack,
                    rejection,
                    Bytes::new(),
                ),
            }
        }
    }

    /// The journey of a frame of `camera`, numbered in its camera's order; a camera one too many
    /// gets its frame back as a refusal of the reserved camera instead.
    fn meta(&mut self, camera: &str, source: &str, ack: Ack) -> Result<JobMeta, (Ack, Rejection)> {
        match self.cameras.arrive(camera, Instant::now()) {
            Ok(seq) => {
                Stats::incr(&self.stats.frames_in);
                Ok(JobMeta::arrived(camera, source.to_string(), seq, ack))
            }
            Err(too_many) => Err((
                ack,
                Rejection::TooManyCameras {
                    camera: camera.to_string(),
                    max: too_many.max,
                },
            )),
        }
    }

    /// A payload refused at the door: straight to the outbox as a dead letter.
    fn refuse(
        &mut self,
        camera: &str,
        source: String,
        ack: Ack,
        rejection: Rejection,
        payload: Bytes,
    ) {
        let (meta, rejection) = match self.meta(camera, &source, ack) {
            Ok(meta) => (meta, rejection),
            Err((ack, too_many)) => match self.meta(UNKNOWN_CAMERA, &source, ack) {
                Ok(meta) => (meta, too_many),
                Err(_) => unreachable!("the reserved camera is always admitted"),
            },
        };
        log::warn!("refused frame from {source}: {rejection}");
        let _ = self.done.send(Done {
            meta,
            verdict: Verdict::Rejected { rejection, payload },
        });
    }

    /// Hands a frame to the workers. A frame over the record limit first takes one of the
    /// `large_frames.max_in_flight` permits (held until its records are durable): that bounds
    /// the memory large frames can take, and makes the rest wait at the MQTT broker.
    async fn enqueue(
        &mut self,
        camera: &str,
        source: String,
        ack: Ack,
        payload: Bytes,
        best_effort: bool,
    ) {
        if best_effort && self.jobs.is_full() {
            Stats::incr(&self.stats.qos0_dropped);
            return;
        }
        let permit = if payload.len() > self.record_limit {
            self.stats.set_ingress_wait(IngressWait::LargeFrame);
            let permit = self.large.clone().acquire_owned().await;
            self.stats.set_ingress_wait(IngressWait::Nothing);
            match permit {
                Ok(p) => Some(p),
                Err(_) => return, // closed: shutting down; the frame stays un-acked
            }
        } else {
            None
        };
        let mut meta = match self.meta(camera, &source, ack) {
            Ok(meta) => meta,
            Err((ack, rejection)) => {
                return self.refuse(UNKNOWN_CAMERA, source, ack, rejection, payload);
            }
        };
        meta.large_permit = permit;
        self.stats.set_ingress_wait(IngressWait::Workers);
        let sent = self.jobs.send(Job { meta, payload }).await;
        self.stats.set_ingress_wait(IngressWait::Nothing);
        if sent.is_err() {
            log::warn!("workers are gone; frame left un-acked for redelivery");
        }
    }
}
