//! The replicator: reads results and frames from the local broker, sends results (all) and frames
//! (chosen by [`FrameRules`](super::rules::FrameRules)) to the cloud cluster, and commits the
//! local offsets only once the cloud acknowledged (or a rule skipped) every record before them.
//!
//! - **At least once**: the local consumer group's committed offsets are the checkpoint; after a
//!   crash replication resumes there, so at most the records in flight are sent again, with the
//!   same `fovea-record-id` (and a `fovea-edge-node` header) for the cloud to deduplicate.
//! - **Ordered per camera**: records keep their key (the camera id) and are produced in the order
//!   they were read, by an idempotent producer.
//! - **Results before images**: results are read first; frames only while the results are caught
//!   up (every results partition at its end), so after an outage the results arrive first.
//! - **Offline is normal**: the producer never times records out; librdkafka reconnects with
//!   exponential backoff and jitter; at most `uplink.max_in_flight` records wait, then reading
//!   pauses until the cloud is back.
//! - **Bandwidth cap**: every record waits for its bytes in a token bucket.

use super::bucket::TokenBucket;
use super::rules::{FrameSelector, Verdict};
use super::thumbnail::thumbnail;
use crate::config::{Config, UplinkConfig};
use crate::outbox::producer::enqueue;
use crate::records::{Record, RecordKind};
use crate::stats::{Stage, Stats};
use anyhow::Context;
use fovea_proto::chunks::{self, Aggregator, Limits, Outcome};
use fovea_proto::headers as h;
use fovea_proto::v1::{Frame, FrameChunk, InferenceResult};
use prost::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Headers, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::watch;

use super::offsets::OffsetTracker;

/// Header added to every replicated record: the edge node it came from.
pub const EDGE_NODE: &str = "fovea-edge-node";
/// Header on a replicated frame that was downscaled: its size, `WIDTHxHEIGHT`.
pub const THUMBNAIL: &str = "fovea-thumbnail";
/// How long a frame waits for its result (to decide by the rules) before it is skipped.
const RESULT_PATIENCE: Duration = Duration::from_secs(30);
/// Decisions remembered per record id (results are read ahead of frames).
const DECISIONS_KEPT: usize = 50_000;

/// A local offset: (topic, partition, offset).
type Pos = (String, i32, i64);

/// A record on its way to the cloud.
struct Out {
    topic: String,
    key: String,
    headers: Vec<(String, String)>,
    value: Vec<u8>,
}

/// A frame read before the result that decides it.
struct Waiting {
    record_id: String,
    frame: Frame,
    positions: Vec<Pos>,
    since: Instant,
}

pub struct Replicator {
    cfg: UplinkConfig,
    node_id: String,
    local_results: String,
    stats: Arc<Stats>,
    producer: FutureProducer,
    bucket: TokenBucket,
    selector: FrameSelector,
    decisions: HashMap<String, bool>,
    decision_order: VecDeque<String>,
    tracker: OffsetTracker,
    chunks: Aggregator,
    /// Local positions of the chunks of frames being reassembled, by frame id.
    chunk_positions: HashMap<String, Vec<Pos>>,
    waiting: Option<Waiting>,
    in_flight: Arc<std::sync::atomic::AtomicUsize>,
    acks: UnboundedSender<Vec<Pos>>,
}

/// Consumer context that keeps partition-end notices (asked for with `enable.partition.eof`, to
/// know when the results are caught up) out of the error log, and copies librdkafka's consumer
/// lag (records between the committed checkpoint, which follows cloud acks, and the end of the
/// local partition) to [`Stats::uplink_lag`]: the replication lag in records.
pub struct LocalContext {
    stats: Arc<Stats>,
}

impl rdkafka::ClientContext for LocalContext {
    fn stats(&self, statistics: rdkafka::Statistics) {
        for (name, topic) in &statistics.topics {
            let lag: i64 = topic
                .partitions
                .iter()
                .filter(|(p, part)| **p >= 0 && part.consumer_lag >= 0)
                .map(|(_, part)| part.consumer_lag)
                .sum();
            if let Ok(mut map) = self.stats.uplink_lag.lock() {
                map.insert(name.clone(), lag);
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        if !matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        ) {
            log::error!("uplink: local broker: {error}: {reason}");
        }
    }
}

impl rdkafka::consumer::ConsumerContext for LocalContext {}

type LocalConsumer = StreamConsumer<LocalContext>;

/// Creates the consumer of one local topic for `group`, assigned from its committed offsets
/// (the beginning when it has none). Waits for the topic to exist: the node creates it when it
/// first reaches the broker.
pub async fn local_consumer(
    cfg: &Config,
    group: &str,
    topic: &str,
    stats: Arc<Stats>,
) -> anyhow::Result<(LocalConsumer, usize)> {
    let consumer: LocalConsumer = ClientConfig::new()
        .set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        .set("fetch.message.max.bytes", "67108864")
        .set("log.connection.close", "false")
        .set("statistics.interval.ms", "5000")
        .create_with_context(LocalContext { stats })?;
    let partitions = loop {
        let md = consumer.fetch_metadata(Some(topic), Duration::from_secs(5));
        if let Ok(md) = md
            && let Some(t) = md.topics().first()
            && !t.partitions().is_empty()
        {
            break t.partitions().len();
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
    };
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions as i32 {
        tpl.add_partition(topic, p);
    }
    let committed = consumer
        .committed_offsets(tpl, Duration::from_secs(10))
        .with_context(|| format!("committed offsets of {group} on {topic}"))?;
    let mut assignment = TopicPartitionList::new();
    for e in committed.elements() {
        let start = match e.offset() {
            Offset::Offset(n) => Offset::Offset(n),
            _ => Offset::Beginning,
        };
        assignment.add_partition_offset(topic, e.partition(), start)?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, partitions))
}

fn cloud_producer(cfg: &UplinkConfig, node_id: &str) -> anyhow::Result<FutureProducer> {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("fovea-uplink-{node_id}"))
        .set("enable.idempotence", "true")
        .set("compression.type", &cfg.compression)
        // Hours offline are normal: never give up on a record.
        .set("message.timeout.ms", "0")
        .set(
            "message.max.bytes",
            (cfg.record_limit_bytes + 4096).to_string(),
        )
        .set("reconnect.backoff.ms", "500")
        .set("reconnect.backoff.max.ms", "30000")
        .set("log.connection.close", "false");
    let s = &cfg.security;
    c.set("security.protocol", &s.protocol);
    for (key, value) in [
        ("sasl.mechanism", &s.sasl_mechanism),
        ("sasl.username", &s.sasl_username),
        ("sasl.password", &s.sasl_password),
        ("ssl.ca.location", &s.ssl_ca_location),
        ("ssl.certificate.location", &s.ssl_certificate_location),
        ("ssl.key.location", &s.ssl_key_location),
        ("ssl.key.password", &s.ssl_key_password),
    ] {
        if !value.is_empty() {
            c.set(key, value);
        }
    }
    // The error names the setting, never its value (the password must not reach a log).
    c.create()
        .map_err(|e| anyhow::anyhow!("cloud producer for {}: {e}", cfg.brokers))
}

/// Runs the uplink until `shutdown` turns true.
pub async fn run(
    cfg: Config,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let group = cfg.uplink_group();
    let (results, results_partitions) =
        local_consumer(&cfg, &group, &cfg.kafka.topics.results, stats.clone()).await?;
    let (frames, _) = local_consumer(&cfg, &group, &cfg.kafka.topics.frames, stats.clone()).await?;
    let (acks_tx, mut acks) = unbounded_channel();
    let u = cfg.uplink.clone();
    let mut r = Replicator {
        producer: cloud_producer(&u, &cfg.node_id())?,
        bucket: TokenBucket::new(
            u.bandwidth_bytes_per_sec,
            (u.bandwidth_bytes_per_sec / 4).max(64 << 10),
        ),
        selector: FrameSelector::new(u.frames.clone()),
        node_id: cfg.node_id(),
        local_results: cfg.kafka.topics.results.clone(),
        stats,
        decisions: HashMap::new(),
        decision_order: VecDeque::new(),
        tracker: OffsetTracker::default(),
        chunks: Aggregator::new(Limits {
            max_frame_bytes: 256 << 20,
            max_frames_in_flight: 16,
            max_bytes_in_flight: 512 << 20,
            timeout: Duration::from_secs(120),
        }),
        chunk_positions: HashMap::new(),
        waiting: None,
        in_flight: Arc::new(std::sync::atomic::AtomicUsize::new(0)),
        acks: acks_tx,
        cfg: u,
    };
    log::info!(
        "uplink: replicating {} (and frames by rule) to {} as group {group}",
        r.local_results,
        r.cfg.brokers
    );
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_log = Instant::now();
    loop {
        let room = r.in_flight.load(Ordering::Relaxed) < r.cfg.max_in_flight;
        let results_caught_up = at_end.len() >= results_partitions;
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(done) = acks.recv() => done.into_iter().for_each(|(t, p, o)| r.tracker.done(&t, p, o)),
            msg = results.recv(), if room => match msg {
                Ok(m) => {
                    at_end.remove(&m.partition());
                    r.on_result(&m).await;
                }
                Err(KafkaError::PartitionEOF(p)) => {
                    at_end.insert(p);
                }
                Err(e) => log::warn!("uplink: reading results: {e}"),
            },
            msg = frames.recv(), if r.cfg.frames.enabled && room && results_caught_up && r.waiting.is_none() => match msg {
                Ok(m) => r.on_frame(&m).await,
                Err(KafkaError::PartitionEOF(_)) => {}
                Err(e) => log::warn!("uplink: reading frames: {e}"),
            },
            _ = tick.tick() => {
                r.housekeeping().await;
                commit(&r.tracker.committable(), &r.local_results, &results, &frames);
                if last_log.elapsed() > Duration::from_secs(60) {
                    r.log_progress();
                    last_log = Instant::now();
                }
            }
        }
    }
    // Give what is in flight a moment to reach the cloud, then checkpoint what did; the rest
    // is sent again after the restart.
    let producer = r.producer.clone();
    let _ = tokio::task::spawn_blocking(move || producer.flush(Duration::from_secs(5))).await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    while let Ok(done) = acks.try_recv() {
        done.into_iter()
            .for_each(|(t, p, o)| r.tracker.done(&t, p, o));
    }
    commit(
        &r.tracker.committable(),
        &r.local_results,
        &results,
        &frames,
    );
    r.log_progress();
    Ok(())
}

fn commit(positions: &[Pos], results_topic: &str, results: &LocalConsumer, frames: &LocalConsumer) {
    for (topic, partition, next) in positions {
        let mut tpl = TopicPartitionList::new();
        if tpl
            .add_partition_offset(topic, *partition, Offset::Offset(*next))
            .is_err()
        {
            continue;
        }
        let consumer = if topic == results_topic {
            results
        } else {
            frames
        };
        if let Err(e) = consumer.commit(&tpl, CommitMode::Async) {
            log::warn!("uplink: committing {topic}/{partition}@{next}: {e}");
        }
    }
}

fn headers_of(m: &BorrowedMessage<'_>) -> Vec<(String, String)> {
    m.headers()
        .map(|hs| {
            hs.iter()
                .map(|x| {
                    (
                        x.key.to_string(),
                        String::from_utf8_lossy(x.value.unwrap_or_default()).into_owned(),
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

fn header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.as_str())
}

impl Replicator {
    async fn on_result(&mut self, m: &BorrowedMessage<'_>) {
        let pos = (m.topic().to_string(), m.partition(), m.offset());
        self.tracker.started(&pos.0, pos.1, pos.2);
        let value = m.payload().unwrap_or_default().to_vec();
        if let Ok(result) = InferenceResult::decode(value.as_slice()) {
            let send = matches!(self.selector.decide(&result, Instant::now()), Verdict::Send);
            self.remember(result.record_id, send);
        }
        let out = Out {
            topic: self.cfg.results_topic.clone(),
            key: String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
            headers: self.with_edge(headers_of(m)),
            value,
        };
        Stats::incr(&self.stats.uplink_results);
        let stored_ms = m.timestamp().to_millis();
        self.send(vec![out], vec![pos], stored_ms).await;
    }

    async fn on_frame(&mut self, m: &BorrowedMessage<'_>) {
        let pos = (m.topic().to_string(), m.partition(), m.offset());
        self.tracker.started(&pos.0, pos.1, pos.2);
        let headers = headers_of(m);
        let value = m.payload().unwrap_or_default();
        match header(&headers, h::SCHEMA) {
            Some(h::SCHEMA_FRAME) => match Frame::decode(value) {
                Ok(frame) => self.decide_frame(frame, vec![pos]).await,
                Err(_) => self.skip(vec![pos], "undecodable"),
            },
            Some(h::SCHEMA_FRAME_CHUNK) => match FrameChunk::decode(value) {
                Ok(chunk) => {
                    self.chunk_positions
                        .entry(chunk.frame_id.clone())
                        .or_default()
                        .push(pos);
                    let outcomes = self.chunks.push(chunk, Instant::now());
                    self.on_chunk_outcomes(outcomes).await;
                }
                Err(_) => self.skip(vec![pos], "undecodable"),
            },
            _ => self.skip(vec![pos], "unknown-schema"),
        }
    }

    async fn on_chunk_outcomes(&mut self, outcomes: Vec<Outcome>) {
        for outcome in outcomes {
            match outcome {
                Outcome::Complete(done) => {
                    let positions = self
                        .chunk_positions
                        .remove(&done.frame_id)
                        .unwrap_or_default();
                    match Frame::decode(done.payload) {
                        Ok(frame) => self.decide_frame(frame, positions).await,
                        Err(_) => self.skip(positions, "undecodable"),
                    }
                }
                Outcome::Incomplete { frame_id, .. } | Outcome::Rejected { frame_id, .. } => {
                    let positions = self.chunk_positions.remove(&frame_id).unwrap_or_default();
                    log::warn!("uplink: frame {frame_id} could not be reassembled; not replicated");
                    self.skip(positions, "incomplete");
                }
            }
        }
    }

    /// Sends, skips, or (without its result yet) holds a frame.
    async fn decide_frame(&mut self, frame: Frame, positions: Vec<Pos>) {
        if !self.cfg.frames.enabled {
            return self.skip(positions, "disabled");
        }
        match self.decisions.get(&frame.record_id) {
            Some(true) => self.send_frame(frame, positions).await,
            Some(false) => self.skip(positions, "no-match"),
            None => {
                self.waiting = Some(Waiting {
                    record_id: frame.record_id.clone(),
                    frame,
                    positions,
                    since: Instant::now(),
                });
            }
        }
    }

    async fn send_frame(&mut self, mut frame: Frame, positions: Vec<Pos>) {
        let mut extra = Vec::new();
        let side = self.cfg.frames.thumbnail_max_side;
        if side > 0 && !frame.data.is_empty() {
            match thumbnail(&frame.data, side, 85) {
                Ok((jpeg, w, hgt)) => {
                    frame.data = jpeg.into();
                    frame.content_type = "image/jpeg".into();
                    frame.width = w;
                    frame.height = hgt;
                    extra.push((THUMBNAIL.to_string(), format!("{w}x{hgt}")));
                }
                Err(e) => {
                    log::warn!(
                        "uplink: no thumbnail of {}: {e}; not replicated",
                        frame.record_id
                    );
                    return self.skip(positions, "thumbnail-failed");
                }
            }
        }
        let mut headers = vec![
            (
                h::CONTENT_TYPE.to_string(),
                h::CONTENT_TYPE_PROTOBUF.to_string(),
            ),
            (h::SCHEMA.to_string(), h::SCHEMA_FRAME.to_string()),
            (h::RECORD_ID.to_string(), frame.record_id.clone()),
            (h::NODE.to_string(), frame.node_id.clone()),
            (h::CAMERA.to_string(), frame.camera_id.clone()),
            (h::IMAGE_TYPE.to_string(), frame.content_type.clone()),
        ];
        headers.extend(extra);
        let value = frame.encode_to_vec();
        let limit = self.cfg.record_limit_bytes.saturating_sub(4096);
        let outs = if value.len() <= limit {
            headers.push((
                h::SIZE_POLICY.to_string(),
                if frame.claim.is_some() {
                    "claim-check"
                } else {
                    "inline"
                }
                .into(),
            ));
            vec![Out {
                topic: self.cfg.frames_topic.clone(),
                key: frame.camera_id.clone(),
                headers: self.with_edge(headers),
                value,
            }]
        } else {
            match chunks::split(
                &frame.record_id,
                &frame.camera_id,
                h::SCHEMA_FRAME,
                &Default::default(),
                &value,
                limit,
            ) {
                Ok(pieces) => {
                    let count = pieces.len();
                    pieces
                        .into_iter()
                        .map(|c| {
                            let mut hs = headers.clone();
                            hs[1].1 = h::SCHEMA_FRAME_CHUNK.to_string();
                            hs.push((h::SIZE_POLICY.to_string(), "chunked".into()));
                            hs.push((chunks::HEADER_CHUNK_INDEX.to_string(), c.index.to_string()));
                            hs.push((chunks::HEADER_CHUNK_COUNT.to_string(), count.to_string()));
                            Out {
                                topic: self.cfg.frames_topic.clone(),
                                key: frame.camera_id.clone(),
                                headers: self.with_edge(hs),
                                value: c.encode_to_vec(),
                            }
                        })
                        .collect()
                }
                Err(e) => {
                    log::error!("uplink: cannot chunk {}: {e}", frame.record_id);
                    return self.skip(positions, "unsendable");
                }
            }
        };
        Stats::incr(&self.stats.uplink_frames);
        self.send(outs, positions, None).await;
    }

    fn with_edge(&self, mut headers: Vec<(String, String)>) -> Vec<(String, String)> {
        headers.push((EDGE_NODE.to_string(), self.node_id.clone()));
        headers
    }

    fn skip(&mut self, positions: Vec<Pos>, why: &str) {
        log::debug!("uplink: frame not replicated ({why})");
        Stats::incr(&self.stats.uplink_filtered);
        for (t, p, o) in positions {
            self.tracker.done(&t, p, o);
        }
    }

    fn remember(&mut self, record_id: String, send: bool) {
        if self.decisions.insert(record_id.clone(), send).is_none() {
            self.decision_order.push_back(record_id);
        }
        while self.decision_order.len() > DECISIONS_KEPT {
            if let Some(old) = self.decision_order.pop_front() {
                self.decisions.remove(&old);
            }
        }
    }

    /// Waits for bandwidth, hands the records to the cloud producer, and reports `positions`
    /// done once every one of them is acknowledged. `stored_ms` is when the record reached the
    /// local broker (its timestamp), for the replication latency.
    async fn send(&mut self, outs: Vec<Out>, positions: Vec<Pos>, stored_ms: Option<i64>) {
        let mut futures = Vec::with_capacity(outs.len());
        for out in &outs {
            let bytes = out.key.len()
                + out.value.len()
                + out
                    .headers
                    .iter()
                    .map(|(k, v)| k.len() + v.len())
                    .sum::<usize>();
            let wait = self.bucket.take(bytes as u64, Instant::now());
            if !wait.is_zero() {
                tokio::time::sleep(wait).await;
            }
            let record = Record {
                kind: RecordKind::Result,
                topic: out.topic.clone(),
                key: out.key.clone(),
                headers: out.headers.clone(),
                value: out.value.clone(),
            };
            match enqueue(&self.producer, &record).await {
                Ok(f) => {
                    self.stats
                        .uplink_bytes
                        .fetch_add(bytes as u64, Ordering::Relaxed);
                    futures.push(f);
                }
                Err(e) => log::error!(
                    "uplink: record for {} refused by the producer: {e}",
                    out.key
                ),
            }
        }
        self.in_flight.fetch_add(futures.len(), Ordering::Relaxed);
        let (in_flight, acks, stats) = (
            self.in_flight.clone(),
            self.acks.clone(),
            self.stats.clone(),
        );
        tokio::spawn(async move {
            let n = futures.len();
            for f in futures {
                match f.await {
                    Ok(Ok(_)) => {
                        Stats::incr(&stats.uplink_acked);
                    }
                    // Purged because the producer is closing: not in the cloud, so not done; it
                    // is sent again after the restart.
                    Ok(Err((
                        KafkaError::MessageProduction(
                            RDKafkaErrorCode::PurgeQueue | RDKafkaErrorCode::PurgeInflight,
                        ),
                        _,
                    ))) => {
                        in_flight.fetch_sub(n, Ordering::Relaxed);
                        return;
                    }
                    Ok(Err((e, _))) => {
                        Stats::incr(&stats.delivery_failures);
                        log::error!("uplink: the cloud refused a record: {e}");
                    }
                    // The producer is gone (shutting down): not done, sent again after restart.
                    Err(_) => {
                        in_flight.fetch_sub(n, Ordering::Relaxed);
                        return;
                    }
                }
            }
            in_flight.fetch_sub(n, Ordering::Relaxed);
            if let Some(ms) = stored_ms {
                let waited = crate::job::now_ms().saturating_sub(ms).max(0);
                stats.record(Stage::Replication, Duration::from_millis(waited as u64));
            }
            let _ = acks.send(positions);
        });
    }

    async fn housekeeping(&mut self) {
        let outcomes = self.chunks.expire(Instant::now());
        self.on_chunk_outcomes(outcomes).await;
        if let Some(w) = self.waiting.take() {
            match self.decisions.get(&w.record_id) {
                Some(true) => self.send_frame(w.frame, w.positions).await,
                Some(false) => self.skip(w.positions, "no-match"),
                None if w.since.elapsed() > RESULT_PATIENCE => self.skip(w.positions, "no-result"),
                None => self.waiting = Some(w),
            }
        }
    }

    fn log_progress(&self) {
        log::info!(
            "uplink: {} results and {} frames sent ({} bytes), {} frames filtered, {} records in flight",
            Stats::get(&self.stats.uplink_results),
            Stats::get(&self.stats.uplink_frames),
            Stats::get(&self.stats.uplink_bytes),
            Stats::get(&self.stats.uplink_filtered),
            self.in_flight.load(Ordering::Relaxed)
        );
    }
}
