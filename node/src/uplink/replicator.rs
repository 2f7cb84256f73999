//! The replicator: reads results and frames from the local broker, sends results (all) and frames
//! (chosen by [`FrameRules`](super::rules::FrameRules)) to the cloud cluster, and commits the
//! local offsets only once every record before them is done: acknowledged by the cloud, skipped
//! by a rule, or refused for good and recorded in the local uplink dead-letter topic.
//!
//! - **At least once**: the local consumer group's committed offsets are the checkpoint; after a
//!   crash replication resumes there, so at most the records in flight are sent again, with the
//!   same `fovea-record-id` (and a `fovea-edge-node` header) for the cloud to deduplicate.
//! - **Records through [`crate::records`]**: a result is forwarded as read (checked against
//!   `uplink.record_limit_bytes`), a frame is made into records by
//!   [`records::frame_records`] (inline, claim check, or chunked under the cloud's limit).
//! - **The checkpoint never passes an unacknowledged record**: every failure is classified
//!   ([`records::classify`]): *retriable* keeps the record's positions open and sends the
//!   unacknowledged records again after an exponential backoff with jitter, reading nothing new
//!   meanwhile (so a camera's later records do not overtake it); *fatal* (the idempotent
//!   producer lost its guarantees) rebuilds the cloud producer, then retries; *permanent* (too
//!   large for the cloud, not authorized, invalid) writes an `uplink-refused` dead letter (the
//!   cloud's error, the local topic/partition/offset, record id, size and SHA-256; no payload) to
//!   `uplink.deadletter_topic` on the LOCAL broker, and only its acknowledgement lets the
//!   checkpoint pass the record.
//! - **Ordered per camera**: records keep their key (the camera id) and are produced in the order
//!   they were read, by an idempotent producer. Records already in flight when one fails are not
//!   called back: they may land before its retry (the record ids and sequences tell).
//! - **Results before images**: results are read first; frames only while the results are caught
//!   up (every results partition at its end), so after an outage the results arrive first.
//! - **Offline is normal**: the producer never times records out; librdkafka reconnects with
//!   exponential backoff and jitter; at most `uplink.max_in_flight` records wait, then reading
//!   pauses until the cloud is back.
//! - **Bandwidth cap**: every record waits for its bytes in a token bucket.
//! - **No silent loss to retention**: the local broker deletes records by `retention.ms` and
//!   `retention.bytes` whether or not the cloud has them. A checkpoint below the log start resumes
//!   at the log start (`auto.offset.reset = earliest`; librdkafka's default would jump to the END
//!   and skip everything still retained); the records lost are counted per partition
//!   (`fovea_uplink_expired_records_total`), logged once per gap with the offsets and times
//!   ([`GapDetector`]), and the checkpoint moves past them. The age of the oldest unreplicated
//!   record against the topic's `retention.ms` ([`Backlog`]) warns before that happens.

use super::backlog::Backlog;
use super::bucket::TokenBucket;
use super::gaps::{Gap, GapDetector};
use super::offsets::OffsetTracker;
use super::reassembly::{Event, Pos, Reassembly};
use super::rules::{FrameSelector, Verdict};
use super::thumbnail::thumbnail;
use crate::config::{Config, TopicClass, UplinkConfig};
use crate::ingress::backoff::Backoff;
use crate::outbox::producer::{self, enqueue};
use crate::records::{self, FRAMING_ALLOWANCE, Record, RecordKind, RecordLimit, Refusal};
use crate::stats::{Stage, Stats};
use anyhow::Context;
use fovea_proto::chunks::Limits;
use fovea_proto::v1::{DeadLetter, Frame, FrameChunk, InferenceResult};
use prost::Message as _;
use rdkafka::consumer::{CommitMode, Consumer, StreamConsumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::producer::FutureProducer;
use rdkafka::producer::Producer;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedSender, unbounded_channel};
use tokio::sync::watch;

/// Header added to every replicated record: the edge node it came from.
pub const EDGE_NODE: &str = "fovea-edge-node";
/// Header on a replicated frame that was downscaled: its size, `WIDTHxHEIGHT`.
pub const THUMBNAIL: &str = "fovea-thumbnail";
/// The `kind` of the uplink's dead letters.
pub const REFUSED_KIND: &str = "uplink-refused";
/// How long a frame waits for its result (to decide by the rules) before it is skipped.
const RESULT_PATIENCE: Duration = Duration::from_secs(30);
/// Decisions remembered per record id (results are read ahead of frames).
const DECISIONS_KEPT: usize = 50_000;
/// Delays between tries of records that failed with a retriable error.
const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

/// One local record on its way to the cloud: a result, or a frame (one record, or its chunks).
struct Batch {
    /// Order of first sending: retries go in this order.
    seq: u64,
    records: Vec<Record>,
    /// Per record, whether the cloud acknowledged it; a retry sends only the others.
    acked: Vec<bool>,
    /// The local positions that are done once the batch is.
    positions: Vec<Pos>,
    /// When the local broker stored it (a result's timestamp), for the replication latency.
    stored_ms: Option<i64>,
    /// Tries so far after the first.
    retries: u32,
    /// Once refused for good: the dead letter for the local broker, sent instead of `records`.
    letter: Option<Letter>,
}

struct Letter {
    record: Record,
    /// The metric label (`too-large`, `not-authorized`, `invalid`).
    reason: &'static str,
}

/// What a delivery task reports back to the loop.
struct Report {
    batch: Batch,
    /// The cloud producer the records went through (see [`Replicator::rebuild`]).
    generation: u64,
    /// Records handed to a producer (counted in flight until this report).
    handed: usize,
    /// The first record not acknowledged, by index, and why.
    error: Option<(usize, KafkaError)>,
    /// The error came from handing a record over (reading was held until this report).
    enqueue_failed: bool,
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
    /// Bumped by every rebuild of `producer`.
    generation: u64,
    /// The local broker's producer, for the uplink dead letters.
    local: FutureProducer,
    /// The cloud's record limit (`uplink.record_limit_bytes`) and the local one.
    limit: RecordLimit,
    /// The node's pixel limits (`[inference]`), for decoding frames into thumbnails.
    image_limits: image::Limits,
    local_limit: RecordLimit,
    deadletter_topic: String,
    bucket: TokenBucket,
    selector: FrameSelector,
    decisions: HashMap<String, bool>,
    decision_order: VecDeque<String>,
    tracker: OffsetTracker,
    /// Expected next offset per partition, to notice records that expired unreplicated.
    gaps: GapDetector,
    /// Timestamps of the records read and not yet done, for their age against the retention.
    backlog: Backlog,
    /// Each local topic read and its `retention.ms`.
    retention: Vec<(String, i64)>,
    reassembly: Reassembly,
    waiting: Option<Waiting>,
    next_seq: u64,
    /// Records handed to a producer and not yet reported on.
    in_flight: usize,
    /// Batches waiting for their next try, by `seq`; nothing new is read while there are any.
    retries: BTreeMap<u64, Batch>,
    retry_at: Option<tokio::time::Instant>,
    backoff: Backoff,
    /// Batches whose hand-over failed and whose report has not come back yet.
    unreported_failures: usize,
    reports: UnboundedSender<Report>,
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

/// The local consumers' settings.
fn local_consumer_config(cfg: &Config, group: &str) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.kafka.brokers)
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "true")
        // A checkpoint below the log start (records expired before they were replicated) must
        // resume at the log start: librdkafka's default (`largest`) jumps to the END on
        // OFFSET_OUT_OF_RANGE and skips every record still retained. The GapDetector counts
        // what was lost. (nisshi serves a fetch below the log start from the log start without
        // that error; Kafka answers OFFSET_OUT_OF_RANGE, so this setting is what saves the
        // records there.)
        .set("auto.offset.reset", "earliest")
        .set("fetch.message.max.bytes", "67108864")
        .set("log.connection.close", "false")
        .set("statistics.interval.ms", "5000");
    c
}

/// Creates the consumer of one local topic for `group`, assigned from its committed offsets
/// (the beginning when it has none). Waits for the topic to exist: the node creates it when it
/// first reaches the broker. Returns the consumer, the number of partitions, and where each
/// partition starts (the checkpoint, or the log start without one) for the [`GapDetector`].
pub async fn local_consumer(
    cfg: &Config,
    group: &str,
    topic: &str,
    stats: Arc<Stats>,
) -> anyhow::Result<(LocalConsumer, usize, Vec<(i32, i64)>)> {
    let consumer: LocalConsumer =
        local_consumer_config(cfg, group).create_with_context(LocalContext { stats })?;
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
    let mut starts = Vec::new();
    for e in committed.elements() {
        let start = match e.offset() {
            Offset::Offset(n) => {
                starts.push((e.partition(), n));
                Offset::Offset(n)
            }
            _ => {
                // No checkpoint: replication starts at the log start; records that expire
                // from here on before they are read are a gap like any.
                if let Ok((low, _)) =
                    consumer.fetch_watermarks(topic, e.partition(), Duration::from_secs(5))
                {
                    starts.push((e.partition(), low));
                }
                Offset::Beginning
            }
        };
        assignment.add_partition_offset(topic, e.partition(), start)?;
    }
    consumer.assign(&assignment)?;
    Ok((consumer, partitions, starts))
}

fn cloud_producer(cfg: &UplinkConfig, node_id: &str) -> anyhow::Result<FutureProducer> {
    let limit = RecordLimit::new(cfg.record_limit_bytes);
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &cfg.brokers)
        .set("client.id", format!("fovea-uplink-{node_id}"))
        .set("enable.idempotence", "true")
        .set("compression.type", &cfg.compression)
        // Hours offline are normal: never give up on a record.
        .set("message.timeout.ms", "0")
        .set("message.max.bytes", limit.producer_max_bytes().to_string())
        // A batch of records each under the cloud's limit must not exceed it together (the
        // broker checks the batch): librdkafka's default is 1 MB.
        .set("batch.size", limit.bytes().min(1_000_000).to_string())
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

/// The uplink's reading of a producer error: [`records::classify`], except that a cloud topic
/// that does not exist (yet) is retried. fovea does not create the cloud's topics; the cloud's
/// operator may, and waiting for them loses nothing.
fn refusal(error: &KafkaError) -> Refusal {
    match error {
        KafkaError::MessageProduction(
            RDKafkaErrorCode::UnknownTopicOrPartition
            | RDKafkaErrorCode::UnknownTopic
            | RDKafkaErrorCode::UnknownPartition,
        ) => Refusal::Retriable,
        other => records::classify(other),
    }
}

/// The `reason` label of a permanent refusal.
fn refusal_reason(error: &KafkaError) -> &'static str {
    use RDKafkaErrorCode::*;
    match error {
        KafkaError::MessageProduction(
            MessageSizeTooLarge | InvalidMessageSize | MessageBatchTooLarge,
        ) => "too-large",
        KafkaError::MessageProduction(TopicAuthorizationFailed | ClusterAuthorizationFailed) => {
            "not-authorized"
        }
        _ => "invalid",
    }
}

/// `kafka:topic/partition@offset[,offset...]` of the local records a dead letter is about.
fn source_of(positions: &[Pos]) -> String {
    let Some((topic, partition, _)) = positions.first() else {
        return String::new();
    };
    let offsets: Vec<String> = positions.iter().map(|(_, _, o)| o.to_string()).collect();
    format!("kafka:{topic}/{partition}@{}", offsets.join(","))
}

/// Runs the uplink until `shutdown` turns true.
pub async fn run(
    cfg: Config,
    stats: Arc<Stats>,
    mut shutdown: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let group = cfg.uplink_group();
    // Waits for the local broker (and its topics); a shutdown meanwhile ends the uplink.
    let connect = async {
        let results =
            local_consumer(&cfg, &group, &cfg.kafka.topics.results, stats.clone()).await?;
        let frames = local_consumer(&cfg, &group, &cfg.kafka.topics.frames, stats.clone()).await?;
        crate::outbox::topics::ensure(
            &cfg.kafka,
            &[crate::outbox::topics::TopicSpec::new(
                &cfg,
                &cfg.uplink.deadletter_topic,
                crate::config::TopicClass::DeadLetters,
            )],
            Duration::from_secs(24 * 3600),
        )
        .await
        .context("creating the uplink dead-letter topic")?;
        anyhow::Ok((results, frames))
    };
    let ((results, results_partitions, results_starts), (frames, _, frames_starts)) = tokio::select! {
        connected = connect => connected?,
        _ = shutdown.changed() => return Ok(()),
    };
    let u = cfg.uplink.clone();
    // No time-out: a dead letter waits for the local broker like the checkpoint does.
    let local = producer::client_config(
        &cfg.kafka,
        &format!("fovea-uplink-deadletter-{}", cfg.node_id()),
        0,
    )
    .create()
    .context("local producer for uplink dead letters")?;
    let (reports_tx, mut reports) = unbounded_channel();
    let mut r = Replicator {
        producer: cloud_producer(&u, &cfg.node_id())?,
        generation: 0,
        local,
        limit: RecordLimit::new(u.record_limit_bytes),
        image_limits: crate::inference::decode::ImageLimits::from_config(&cfg.inference)
            .decoder_limits(),
        local_limit: RecordLimit::new(cfg.kafka.record_limit_bytes),
        deadletter_topic: u.deadletter_topic.clone(),
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
        gaps: GapDetector::new(),
        backlog: Backlog::new(),
        retention: [
            (&cfg.kafka.topics.results, TopicClass::Results, true),
            (
                &cfg.kafka.topics.frames,
                TopicClass::Frames,
                u.frames.enabled,
            ),
        ]
        .into_iter()
        .filter(|(_, _, read)| *read)
        .map(|(topic, class, _)| (topic.clone(), cfg.kafka.retention.of(class).retention_ms))
        .collect(),
        reassembly: Reassembly::new(Limits {
            max_frame_bytes: 256 << 20,
            max_frames_in_flight: 16,
            max_bytes_in_flight: 512 << 20,
            timeout: Duration::from_secs(120),
        }),
        waiting: None,
        next_seq: 0,
        in_flight: 0,
        retries: BTreeMap::new(),
        retry_at: None,
        backoff: Backoff::new(RETRY_MIN, RETRY_MAX),
        unreported_failures: 0,
        reports: reports_tx,
        cfg: u,
    };
    for (topic, starts) in [
        (&cfg.kafka.topics.results, &results_starts),
        (&cfg.kafka.topics.frames, &frames_starts),
    ] {
        for &(partition, next) in starts {
            r.gaps.assigned(topic, partition, next);
        }
    }
    log::info!(
        "uplink: replicating {} (and frames by rule) to {} as group {group}; refusals to {}",
        r.local_results,
        r.cfg.brokers,
        r.deadletter_topic
    );
    let mut at_end: HashSet<i32> = HashSet::new();
    let mut tick = tokio::time::interval(Duration::from_millis(200));
    let mut last_log = Instant::now();
    loop {
        let room = r.in_flight < r.cfg.max_in_flight && r.may_read();
        let results_caught_up = at_end.len() >= results_partitions;
        let retry_at = r.retry_at;
        tokio::select! {
            biased;
            _ = shutdown.changed() => break,
            Some(report) = reports.recv() => r.on_report(report).await,
            _ = tokio::time::sleep_until(retry_at.unwrap_or_else(tokio::time::Instant::now)),
                if retry_at.is_some() => r.retry().await,
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
                r.publish_retention();
                commit(&r.tracker.committable(), &r.local_results, &results, &frames);
                if last_log.elapsed() > Duration::from_secs(60) {
                    r.log_progress();
                    last_log = Instant::now();
                }
            }
        }
    }
    // Give what is in flight a moment to reach the cloud (and the dead letters the local
    // broker), then checkpoint what did; the rest is sent again after the restart.
    let (cloud, local) = (r.producer.clone(), r.local.clone());
    let _ = tokio::task::spawn_blocking(move || {
        let _ = cloud.flush(Duration::from_secs(5));
        let _ = local.flush(Duration::from_secs(2));
    })
    .await;
    tokio::time::sleep(Duration::from_millis(50)).await;
    while let Ok(report) = reports.try_recv() {
        if report.error.is_none() {
            r.delivered(report.batch);
        }
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

fn position(m: &BorrowedMessage<'_>) -> Pos {
    (m.topic().to_string(), m.partition(), m.offset())
}

impl Replicator {
    /// Nothing new is read while a failed batch waits for its retry (or its report): a camera's
    /// later records must not overtake it.
    fn may_read(&self) -> bool {
        self.retries.is_empty() && self.unreported_failures == 0
    }

    /// Takes a record read from the local broker into the tracker, the backlog and the gap
    /// detector (which may find that records before it expired).
    fn read(&mut self, m: &BorrowedMessage<'_>) -> Pos {
        let pos = position(m);
        let stored_ms = m.timestamp().to_millis();
        if let Some(gap) = self.gaps.read(&pos.0, pos.1, pos.2, stored_ms) {
            self.expired(&gap);
        }
        self.tracker.started(&pos.0, pos.1, pos.2);
        self.backlog.started(
            &pos.0,
            pos.1,
            pos.2,
            stored_ms.unwrap_or_else(crate::job::now_ms),
        );
        pos
    }

    /// Records that expired locally before they were replicated: counted, logged once, and
    /// passed by the checkpoint (they will never be read).
    fn expired(&mut self, gap: &Gap) {
        log::warn!("uplink: {gap}; they are lost to the cloud, replication goes on");
        self.stats
            .uplink_expire(&gap.topic, gap.partition, gap.records());
        self.tracker.passed(&gap.topic, gap.partition, gap.to);
    }

    /// A record is done: in the cloud, skipped by a rule, or dead-lettered.
    fn finish(&mut self, topic: &str, partition: i32, offset: i64) {
        self.tracker.done(topic, partition, offset);
        self.backlog.done(topic, partition, offset);
    }

    /// The age of each topic's oldest unreplicated record against its retention, for `/metrics`
    /// and `/readyz`.
    fn publish_retention(&self) {
        let now = crate::job::now_ms();
        let usage: BTreeMap<_, _> = self
            .retention
            .iter()
            .map(|(topic, ms)| (topic.clone(), self.backlog.usage(topic, *ms, now)))
            .collect();
        if let Ok(mut map) = self.stats.uplink_retention.lock() {
            *map = usage;
        }
    }

    async fn on_result(&mut self, m: &BorrowedMessage<'_>) {
        let pos = self.read(m);
        let mut record = Record::from_message(m);
        if let Ok(result) = InferenceResult::decode(record.value.as_slice()) {
            let send = matches!(self.selector.decide(&result, Instant::now()), Verdict::Send);
            self.remember(result.record_id, send);
        }
        record.topic = self.cfg.results_topic.clone();
        record.set_header(EDGE_NODE, self.node_id.clone());
        let size = record.size();
        let over = !self.limit.fits(&record);
        let batch = self.batch(vec![record], vec![pos], m.timestamp().to_millis());
        if over {
            let detail = format!(
                "result record of {size} bytes exceeds uplink.record_limit_bytes ({} bytes, less \
                 {FRAMING_ALLOWANCE} for framing); not sent",
                self.limit.bytes()
            );
            let rec = &batch.records[0];
            let letter = self.letter(
                rec.record_id().unwrap_or_default(),
                &rec.key,
                &rec.value,
                &batch.positions,
                "too-large",
                &detail,
            );
            return self.refuse(batch, letter).await;
        }
        Stats::incr(&self.stats.uplink_results);
        self.send(batch).await;
    }

    async fn on_frame(&mut self, m: &BorrowedMessage<'_>) {
        let pos = self.read(m);
        let record = Record::from_message(m);
        match record.kind {
            RecordKind::Frame => match Frame::decode(record.value.as_slice()) {
                Ok(frame) => self.decide_frame(frame, vec![pos]).await,
                Err(_) => self.skip(vec![pos], "undecodable"),
            },
            RecordKind::FrameChunk => match FrameChunk::decode(record.value.as_slice()) {
                Ok(chunk) => {
                    let events = self.reassembly.push(chunk, pos, Instant::now());
                    self.on_chunk_events(events).await;
                }
                Err(_) => self.skip(vec![pos], "undecodable"),
            },
            _ => self.skip(vec![pos], "unknown-schema"),
        }
    }

    async fn on_chunk_events(&mut self, events: Vec<Event>) {
        for event in events {
            match event {
                Event::Complete { payload, positions } => match Frame::decode(payload) {
                    Ok(frame) => self.decide_frame(frame, positions).await,
                    Err(_) => self.skip(positions, "undecodable"),
                },
                Event::Dropped { positions, why } => {
                    log::warn!("uplink: {why}; not replicated");
                    self.skip(positions, "incomplete");
                }
                Event::Late {
                    position: (t, p, o),
                } => {
                    log::debug!("uplink: {t}/{p}@{o} is a chunk of a finished frame; skipped");
                    self.finish(&t, p, o);
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
        let mut extra = vec![(EDGE_NODE.to_string(), self.node_id.clone())];
        let side = self.cfg.frames.thumbnail_max_side;
        if side > 0 && !frame.data.is_empty() {
            match thumbnail(&frame.data, side, 85, self.image_limits.clone()) {
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
        match records::frame_records(&frame, &self.cfg.frames_topic, &extra, self.limit, true) {
            Ok(out) => {
                Stats::incr(&self.stats.uplink_frames);
                let batch = self.batch(out.records, positions, None);
                self.send(batch).await;
            }
            Err(e) => {
                let letter = self.letter(
                    &frame.record_id,
                    &frame.camera_id,
                    &frame.encode_to_vec(),
                    &positions,
                    "too-large",
                    &format!("{e} (uplink.record_limit_bytes); not sent"),
                );
                let batch = self.batch(Vec::new(), positions, None);
                self.refuse(batch, letter).await;
            }
        }
    }

    fn skip(&mut self, positions: Vec<Pos>, why: &str) {
        log::debug!("uplink: frame not replicated ({why})");
        Stats::incr(&self.stats.uplink_filtered);
        for (t, p, o) in positions {
            self.finish(&t, p, o);
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

    fn batch(
        &mut self,
        records: Vec<Record>,
        positions: Vec<Pos>,
        stored_ms: Option<i64>,
    ) -> Batch {
        self.next_seq += 1;
        Batch {
            seq: self.next_seq,
            acked: vec![false; records.len()],
            records,
            positions,
            stored_ms,
            retries: 0,
            letter: None,
        }
    }

    /// The uplink dead letter for a record refused for good: its evidence, not its payload.
    fn letter(
        &self,
        record_id: &str,
        camera: &str,
        value: &[u8],
        positions: &[Pos],
        reason: &'static str,
        detail: &str,
    ) -> Letter {
        let letter = DeadLetter {
            record_id: record_id.to_string(),
            node_id: self.node_id.clone(),
            camera_id: camera.to_string(),
            source: source_of(positions),
            kind: REFUSED_KIND.into(),
            reason: format!("{reason}: {detail}"),
            payload_size: value.len() as u64,
            payload_sha256: crate::job::sha256_hex(value),
            payload: Default::default(),
            payload_truncated: true,
            received_at_ms: crate::job::now_ms(),
        };
        Letter {
            record: records::fit_dead_letter(&letter, &self.deadletter_topic, self.local_limit),
            reason,
        }
    }

    /// Gives up on `batch` for good: its dead letter goes to the local broker, and its positions
    /// are done once that is acknowledged.
    async fn refuse(&mut self, mut batch: Batch, letter: Letter) {
        log::error!(
            "uplink: {} refused for good; recorded in {} ({})",
            batch
                .records
                .first()
                .and_then(Record::record_id)
                .unwrap_or("a frame"),
            self.deadletter_topic,
            DeadLetter::decode(letter.record.value.as_slice())
                .map(|l| l.reason)
                .unwrap_or_default()
        );
        batch.letter = Some(letter);
        self.send(batch).await;
    }

    /// Waits for bandwidth and hands the batch's unacknowledged records to the cloud producer (or
    /// its dead letter to the local one); a task reports back when each was acknowledged or one
    /// failed.
    async fn send(&mut self, batch: Batch) {
        let mut handed = Vec::with_capacity(batch.records.len());
        let mut error = None;
        if let Some(letter) = &batch.letter {
            match enqueue(&self.local, &letter.record).await {
                Ok(f) => handed.push((0, f)),
                Err(e) => error = Some((0, e)),
            }
        } else {
            for (i, record) in batch.records.iter().enumerate() {
                if batch.acked[i] {
                    continue;
                }
                let bytes = record.size() as u64;
                let wait = self.bucket.take(bytes, Instant::now());
                if !wait.is_zero() {
                    tokio::time::sleep(wait).await;
                }
                match enqueue(&self.producer, record).await {
                    Ok(f) => {
                        self.stats.uplink_bytes.fetch_add(bytes, Ordering::Relaxed);
                        handed.push((i, f));
                    }
                    Err(e) => {
                        error = Some((i, e));
                        break;
                    }
                }
            }
        }
        let enqueue_failed = error.is_some();
        if enqueue_failed {
            self.unreported_failures += 1;
        }
        self.in_flight += handed.len();
        let (reports, stats, generation) =
            (self.reports.clone(), self.stats.clone(), self.generation);
        tokio::spawn(async move {
            let mut batch = batch;
            let n = handed.len();
            let mut failed = None;
            for (i, delivery) in handed {
                let outcome = match delivery.await {
                    Ok(Ok(_)) => Ok(()),
                    Ok(Err((e, _))) => Err(e),
                    // The producer is gone (rebuilt, or shutting down): not delivered.
                    Err(_) => Err(KafkaError::Canceled),
                };
                match outcome {
                    Ok(()) if batch.letter.is_none() => {
                        batch.acked[i] = true;
                        Stats::incr(&stats.uplink_acked);
                    }
                    Ok(()) => {}
                    Err(e) => {
                        failed.get_or_insert((i, e));
                    }
                }
            }
            let _ = reports.send(Report {
                batch,
                generation,
                handed: n,
                error: failed.or(error),
                enqueue_failed,
            });
        });
    }

    async fn on_report(&mut self, report: Report) {
        let Report {
            batch,
            generation,
            handed,
            error,
            enqueue_failed,
        } = report;
        self.in_flight -= handed;
        if enqueue_failed {
            self.unreported_failures -= 1;
        }
        let Some((index, error)) = error else {
            return self.delivered(batch);
        };
        Stats::incr(&self.stats.delivery_failures);
        if batch.letter.is_some() {
            log::error!(
                "uplink: the local broker did not take an uplink dead letter ({error}); retrying"
            );
            return self.hold(batch);
        }
        match refusal(&error) {
            Refusal::Retriable => {
                log::warn!("uplink: the cloud did not take a record ({error}); retrying");
                self.hold(batch);
            }
            Refusal::Fatal => {
                if generation == self.generation {
                    self.rebuild(&error);
                }
                self.hold(batch);
            }
            Refusal::Permanent => {
                let rec = &batch.records[index];
                let count = batch.records.len();
                let which = if count > 1 {
                    format!("record {} of {count}", index + 1)
                } else {
                    "record".to_string()
                };
                let detail = format!(
                    "the cloud refused the {which} ({} bytes) for {}: {error}",
                    rec.size(),
                    rec.topic
                );
                let letter = self.letter(
                    rec.record_id().unwrap_or_default(),
                    &rec.key,
                    &rec.value,
                    &batch.positions,
                    refusal_reason(&error),
                    &detail,
                );
                self.refuse(batch, letter).await;
            }
        }
    }

    /// Every record of `batch` acknowledged (or its dead letter): its positions are done.
    fn delivered(&mut self, batch: Batch) {
        if let Some(letter) = &batch.letter {
            self.stats.uplink_refuse(letter.reason);
        } else if let Some(ms) = batch.stored_ms {
            let waited = crate::job::now_ms().saturating_sub(ms).max(0);
            self.stats
                .record(Stage::Replication, Duration::from_millis(waited as u64));
        }
        if batch.retries > 0 {
            self.backoff.reset();
        }
        for (t, p, o) in batch.positions {
            self.finish(&t, p, o);
        }
    }

    /// Keeps `batch` for the next try, after the backoff.
    fn hold(&mut self, batch: Batch) {
        self.retries.insert(batch.seq, batch);
        if self.retry_at.is_none() {
            let delay = self.backoff.next_delay();
            log::info!(
                "uplink: {} record batches wait {} ms for their next try",
                self.retries.len(),
                delay.as_millis()
            );
            self.retry_at = Some(tokio::time::Instant::now() + delay);
        }
    }

    /// Sends the held batches again, oldest first.
    async fn retry(&mut self) {
        self.retry_at = None;
        for (_, mut batch) in std::mem::take(&mut self.retries) {
            batch.retries += 1;
            self.send(batch).await;
        }
    }

    /// Replaces the cloud producer after a fatal error (the idempotent producer refuses
    /// everything from then on). Records still in the old one come back as failed and are sent
    /// again through the new one.
    fn rebuild(&mut self, error: &KafkaError) {
        match cloud_producer(&self.cfg, &self.node_id) {
            Ok(fresh) => {
                log::error!(
                    "uplink: the cloud producer failed fatally ({error}); rebuilt it, and \
                     unacknowledged records are sent again"
                );
                let old = std::mem::replace(&mut self.producer, fresh);
                self.generation += 1;
                // Dropping purges and flushes for up to 500 ms: not on the async threads.
                tokio::task::spawn_blocking(move || drop(old));
            }
            Err(e) => log::error!(
                "uplink: the cloud producer failed fatally ({error}) and cannot be rebuilt: {e}"
            ),
        }
    }

    async fn housekeeping(&mut self) {
        let events = self.reassembly.expire(Instant::now());
        self.on_chunk_events(events).await;
        // A frame that waited for its result goes only when it cannot overtake a retry.
        if !self.may_read() {
            return;
        }
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
        let refused: u64 = self
            .stats
            .uplink_refused
            .lock()
            .map(|m| m.values().sum())
            .unwrap_or(0);
        log::info!(
            "uplink: {} results and {} frames sent ({} bytes), {} frames filtered, {} refused, \
             {} records in flight, {} batches waiting to be retried",
            Stats::get(&self.stats.uplink_results),
            Stats::get(&self.stats.uplink_frames),
            Stats::get(&self.stats.uplink_bytes),
            Stats::get(&self.stats.uplink_filtered),
            refused,
            self.in_flight,
            self.retries.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use RDKafkaErrorCode::*;

    fn produce(code: RDKafkaErrorCode) -> KafkaError {
        KafkaError::MessageProduction(code)
    }

    #[test]
    fn refusals_are_classified_for_the_uplink() {
        for code in [QueueFull, BrokerTransportFailure, PurgeQueue, PurgeInflight] {
            assert_eq!(refusal(&produce(code)), Refusal::Retriable, "{code:?}");
        }
        assert_eq!(refusal(&KafkaError::Canceled), Refusal::Retriable);
        // The cloud's topics are not ours to create: a missing one is waited for.
        for code in [UnknownTopicOrPartition, UnknownTopic, UnknownPartition] {
            assert_eq!(refusal(&produce(code)), Refusal::Retriable, "{code:?}");
        }
        for code in [Fatal, OutOfOrderSequenceNumber, InvalidProducerEpoch] {
            assert_eq!(refusal(&produce(code)), Refusal::Fatal, "{code:?}");
        }
        for (code, reason) in [
            (MessageSizeTooLarge, "too-large"),
            (InvalidMessageSize, "too-large"),
            (TopicAuthorizationFailed, "not-authorized"),
            (ClusterAuthorizationFailed, "not-authorized"),
            (InvalidRecord, "invalid"),
            (PolicyViolation, "invalid"),
        ] {
            assert_eq!(refusal(&produce(code)), Refusal::Permanent, "{code:?}");
            assert_eq!(refusal_reason(&produce(code)), reason, "{code:?}");
        }
    }

    #[test]
    fn a_checkpoint_below_the_log_start_resumes_at_the_log_start() {
        let c = local_consumer_config(&Config::default(), "g");
        assert_eq!(c.get("auto.offset.reset"), Some("earliest"));
        assert_eq!(c.get("enable.auto.commit"), Some("false"));
    }

    #[test]
    fn a_dead_letter_names_the_local_records() {
        assert_eq!(source_of(&[]), "");
        assert_eq!(
            source_of(&[("fovea.results".into(), 0, 12)]),
            "kafka:fovea.results/0@12"
        );
        assert_eq!(
            source_of(&[("fovea.frames".into(), 2, 7), ("fovea.frames".into(), 2, 9)]),
            "kafka:fovea.frames/2@7,9"
        );
    }
}
