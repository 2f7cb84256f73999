//! The MQTT connection. QoS 1, `clean_session = false` and manual acks: the broker keeps a frame
//! (and redelivers it after a reconnect or a restart of fovea) until we PUBACK it, and we PUBACK
//! only once the frame's records are durable. The broker's in-flight window for our client
//! (mosquitto's `max_inflight_messages`) bounds how many frames are in the pipeline at once: that
//! is the back-pressure to the cameras when inference or Kafka fall behind.

use super::backoff::Backoff;
use super::chunked::{ChunkedUploads, Upload};
use super::payload::Rejection;
use super::topic::{self, TopicMatch};
use crate::config::{LargeFramesConfig, MqttConfig};
use crate::job::Ack;
use crate::job::{Done, Job, JobMeta, Verdict};
use crate::stats::Stats;
use bytes::Bytes;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, Publish, QoS};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::Semaphore;
use tokio::sync::{mpsc::UnboundedSender, watch};

/// rumqttc refuses (and drops the connection on) a packet above its limit, and the broker would
/// redeliver it forever; so the client accepts anything MQTT can carry and fovea refuses
/// oversized frames itself, with a dead letter.
const MQTT_MAX_PACKET: usize = 268_435_455;

/// The camera of a dead letter whose topic names no (safe) camera: the id the topic held is in
/// the reason, never in a record id or key.
const UNKNOWN_CAMERA: &str = "_unknown";

pub struct Ingress {
    cfg: MqttConfig,
    client: AsyncClient,
    events: EventLoop,
    jobs: async_channel::Sender<Job>,
    done: UnboundedSender<Done>,
    stats: Arc<Stats>,
    /// Per-camera arrival counter (see `JobMeta::node_seq`).
    sequences: HashMap<String, u64>,
    /// Frames being reassembled from chunked uploads.
    chunks: ChunkedUploads,
    /// Permits for frames over the record limit (`large_frames.max_in_flight`).
    large: Arc<Semaphore>,
    record_limit: usize,
}

/// What the ingress needs to know about large frames.
pub struct LargeFrameLimits<'a> {
    pub config: &'a LargeFramesConfig,
    pub record_limit: usize,
}

impl Ingress {
    pub fn new(
        cfg: &MqttConfig,
        client_id: &str,
        jobs: async_channel::Sender<Job>,
        done: UnboundedSender<Done>,
        stats: Arc<Stats>,
        large: LargeFrameLimits<'_>,
    ) -> Self {
        let mut opts = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
        opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MQTT_MAX_PACKET, 1 << 20);
        if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
            opts.set_credentials(user.clone(), pass.clone());
        }
        let (client, events) = AsyncClient::new(opts, 256);
        Ingress {
            cfg: cfg.clone(),
            client,
            events,
            jobs,
            done,
            stats,
            sequences: HashMap::new(),
            chunks: ChunkedUploads::new(
                cfg.max_frame_bytes,
                large.config.max_chunked_uploads,
                Duration::from_millis(large.config.chunk_timeout_ms),
            ),
            large: Arc::new(Semaphore::new(large.config.max_in_flight)),
            record_limit: large.record_limit,
        }
    }

    /// Receives frames until `shutdown` turns true; then stops taking frames (they stay un-acked
    /// at the broker), keeps the connection up so that the acks of frames in flight still go out,
    /// until `drained` turns true, and disconnects.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut drained: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.reconnect_min_ms),
            Duration::from_millis(self.cfg.reconnect_max_ms),
        );
        let mut taking = true;
        let mut expiry = tokio::time::interval(Duration::from_millis(500));
        loop {
            let event = tokio::select! {
                ev = self.events.poll() => ev,
                _ = expiry.tick() => {
                    let uploads = self.chunks.expire(Instant::now());
                    self.finish_uploads(uploads, "mqtt:chunks").await;
                    continue;
                }
                _ = shutdown.changed(), if taking => {
                    taking = false;
                    // Closing our senders lets the workers and then the outbox finish.
                    self.jobs.close();
                    let (closed, _) = tokio::sync::mpsc::unbounded_channel();
                    self.done = closed;
                    log::info!("ingress: no longer taking frames; waiting for frames in flight");
                    continue;
                }
                _ = drained.changed(), if !taking => {
                    let _ = self.client.try_disconnect();
                    // Let the eventloop write out pending acks and the DISCONNECT.
                    let _ = tokio::time::timeout(Duration::from_secs(2), async {
                        while self.events.poll().await.is_ok() {}
                    }).await;
                    log::info!("ingress: disconnected");
                    return;
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    self.stats.mqtt_connected.store(true, Ordering::Relaxed);
                    log::info!(
                        "mqtt connected to {}:{} (session present: {})",
                        self.cfg.host,
                        self.cfg.port,
                        ack.session_present
                    );
                    let filters = self
                        .cfg
                        .topics
                        .iter()
                        .chain(&self.cfg.chunk_topics)
                        .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
                    if let Err(e) = self.client.try_subscribe_many(filters) {
                        log::error!("mqtt subscribe failed: {e}");
                    }
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        log::error!(
                            "mqtt broker refused a subscription to {:?}",
                            self.cfg.topics
                        );
                    } else {
                        log::info!("mqtt subscribed to {}", self.cfg.topics.join(", "));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => {
                    if taking {
                        self.accept(publish).await;
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    self.stats.mqtt_connected.store(false, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    log::warn!(
                        "mqtt connection to {}:{} failed (attempt {}): {e}; retrying in {} ms",
                        self.cfg.host,
                        self.cfg.port,
                        backoff.attempts(),
                        delay.as_millis()
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = drained.changed(), if !taking => return,
                    }
                }
            }
        }
    }

    async fn accept(&mut self, publish: Publish) {
        let source = format!("mqtt:{}", publish.topic);
        let ack = Ack::new(self.client.clone(), &publish);
        let chunk = topic::classify(&self.cfg.chunk_topics, &publish.topic);
        let camera = match (chunk, topic::classify(&self.cfg.topics, &publish.topic)) {
            (TopicMatch::Camera(camera), _) => {
                let camera = camera.to_string();
                let uploads = self
                    .chunks
                    .push(&camera, &publish.payload, ack, Instant::now());
                self.finish_uploads(uploads, &source).await;
                return;
            }
            (TopicMatch::BadCamera(id), _) | (_, TopicMatch::BadCamera(id)) => {
                let rejection = Rejection::BadCameraId {
                    topic: publish.topic.clone(),
                    why: topic::why_invalid(id),
                };
                self.refuse(UNKNOWN_CAMERA, source, ack, rejection, publish.payload);
                return;
            }
            (TopicMatch::NoMatch, TopicMatch::NoMatch) => {
                let rejection = Rejection::BadTopic(publish.topic.clone());
                self.refuse(UNKNOWN_CAMERA, source, ack, rejection, publish.payload);
                return;
            }
            (TopicMatch::NoMatch, TopicMatch::Camera(camera)) => camera.to_string(),
        };
        let size = publish.payload.len();
        if size > self.cfg.max_frame_bytes {
            let limit = self.cfg.max_frame_bytes;
            let rejection = Rejection::TooLarge { size, limit };
            self.refuse(&camera, source, ack, rejection, publish.payload);
            return;
        }
        self.enqueue(&camera, source, ack, publish.payload).await;
    }

    /// Frames (or failures) of chunked uploads that completed or timed out.
    async fn finish_uploads(&mut self, uploads: Vec<Upload>, source: &str) {
        for upload in uploads {
            match upload.result {
                Ok(payload) => {
                    self.enqueue(&upload.camera, source.to_string(), upload.ack, payload)
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

    fn meta(&mut self, camera: &str, source: String, ack: Ack) -> JobMeta {
        Stats::incr(&self.stats.frames_in);
        let seq = self.sequences.entry(camera.to_string()).or_insert(0);
        *seq += 1;
        JobMeta::arrived(camera, source, *seq, ack)
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
        log::warn!("refused frame from {source}: {rejection}");
        let meta = self.meta(camera, source, ack);
        let _ = self.done.send(Done {
            meta,
            verdict: Verdict::Rejected { rejection, payload },
        });
    }

    /// Hands a frame to the workers. A frame over the record limit first takes one of the
    /// `large_frames.max_in_flight` permits (held until its records are durable): that bounds
    /// the memory large frames can take, and makes the rest wait at the MQTT broker.
    async fn enqueue(&mut self, camera: &str, source: String, ack: Ack, payload: Bytes) {
        let permit = if payload.len() > self.record_limit {
            match self.large.clone().acquire_owned().await {
                Ok(p) => Some(p),
                Err(_) => return, // closed: shutting down; the frame stays un-acked
            }
        } else {
            None
        };
        let mut meta = self.meta(camera, source, ack);
        meta.large_permit = permit;
        if self.jobs.send(Job { meta, payload }).await.is_err() {
            log::warn!("workers are gone; frame left un-acked for redelivery");
        }
    }
}
