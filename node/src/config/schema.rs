//! The typed configuration: one struct per TOML table. Every field has a default (see
//! `default.toml`, printed by `fovea default-config`), so an empty file is a valid config for a
//! node with local brokers on their standard ports.

use serde::{Deserialize, Serialize};
use std::path::PathBuf;

/// The whole config file.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct Config {
    pub node: NodeConfig,
    pub log: LogConfig,
    pub mqtt: MqttConfig,
    pub kafka: KafkaConfig,
    pub inference: InferenceConfig,
    pub spool: SpoolConfig,
    pub large_frames: LargeFramesConfig,
    pub uplink: UplinkConfig,
    pub metrics: MetricsConfig,
    pub health: HealthConfig,
    /// The models this node loads; each entry is a folder holding `manifest.toml`.
    pub models: Vec<ModelRef>,
    /// Which models run on which cameras; the first route whose pattern matches wins.
    pub routes: Vec<Route>,
}

/// The HTTP endpoint for Prometheus and health checks.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct MetricsConfig {
    /// `address:port` serving `/metrics`, `/healthz` and `/readyz`; empty = no endpoint.
    pub listen: String,
}

/// When the node counts as unhealthy (and stops feeding systemd's watchdog).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct HealthConfig {
    /// A stage stuck this long on one piece of work (a worker on one frame, the outbox loop not
    /// turning) makes the node unhealthy.
    pub stall_after_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct NodeConfig {
    /// Name of this node in record ids and headers. Empty = the machine's hostname.
    pub id: String,
    /// Where the node keeps its state (spool, checkpoints). Relative paths are resolved against
    /// the config file's folder, never the working directory (which is `/` under systemd).
    pub state_dir: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct LogConfig {
    /// Default level: error, warn, info, debug, trace.
    pub level: String,
    /// Per-module levels, e.g. `{ "fovea::ingress" = "debug", "rdkafka" = "warn" }`.
    pub modules: std::collections::BTreeMap<String, String>,
    /// What fovea's logs may take on disk, counted in the disk budget (`fovea validate`). fovea
    /// logs to the journal, so journald enforces it (`SystemMaxUse=`); this is the share the
    /// budget reserves for it.
    pub disk_budget_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct MqttConfig {
    pub host: String,
    pub port: u16,
    /// Client id; with `clean_session = false` the broker keeps our subscriptions and unacked
    /// frames under this id while we are away, so it must be stable. Empty = `fovea-<node id>`.
    pub client_id: String,
    pub username: Option<String>,
    pub password: Option<String>,
    /// Topic filters to subscribe to. Each must contain exactly one `+` level: that level is the
    /// camera id (`cameras/+/frames` -> camera `cam-1` from `cameras/cam-1/frames`).
    pub topics: Vec<String>,
    /// Topic filters for cameras that send frames in `FrameChunk` pieces (small MQTT payloads);
    /// same one-`+` rule. Empty = no chunked uploads.
    pub chunk_topics: Vec<String>,
    pub keep_alive_secs: u64,
    /// Largest frame accepted, in bytes. Larger payloads are dead-lettered, not inferred.
    pub max_frame_bytes: usize,
    /// Largest camera metadata (the `Frame` envelope's `metadata` map, keys plus values) taken
    /// along into the frame and result records. More is dead-lettered as `metadata-too-large`:
    /// it would crowd the result out of its record.
    pub max_metadata_bytes: usize,
    /// First and largest delay between reconnect attempts; the delay doubles with jitter.
    pub reconnect_min_ms: u64,
    pub reconnect_max_ms: u64,
    /// Cameras known at once; a frame from one more is dead-lettered (`too-many-cameras`)
    /// unless a camera idle for `camera_idle_secs`, with nothing in flight, can be forgotten.
    pub max_cameras: usize,
    pub camera_idle_secs: u64,
    /// Deliveries, and their payload bytes, held un-acked at most; beyond either, new ones are
    /// shed (left un-acked for the broker to send again on a renewed session). The broker's
    /// window (mosquitto's `max_inflight_messages`, 20) is no bound: mosquitto 2.0.11 sends up to
    /// a window's worth more on every ack while others are outstanding.
    pub max_in_flight: usize,
    pub max_in_flight_bytes: u64,
    /// Payload bytes of deliveries beyond that budget kept on disk until taken (0: none, shed
    /// at once).
    pub spill_max_bytes: u64,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct KafkaConfig {
    /// Bootstrap servers of the local broker, `host:port[,host:port]`.
    pub brokers: String,
    pub topics: TopicsConfig,
    /// Partitions and replication factor used when fovea creates its topics at start.
    pub partitions: i32,
    pub replication_factor: i32,
    /// Producer compression: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// Largest record (key + value + headers) fovea writes, in bytes. Kafka's default
    /// `message.max.bytes` is 1 MB and many managed clusters refuse more.
    pub record_limit_bytes: usize,
    pub linger_ms: u64,
    /// Extra librdkafka producer properties, passed through as they are.
    pub producer: std::collections::BTreeMap<String, String>,
    /// How long the local broker keeps each class of fovea's topics.
    pub retention: RetentionConfig,
    /// Folder of the local broker's data on this box, for the disk budget and `/metrics`
    /// (`/var/lib/fovea-kafka` for the packaged `fovea-kafka.service`). Empty = the broker is not
    /// on this box's disks.
    pub data_dir: PathBuf,
}

/// Retention of the topics fovea writes on the local broker, per class of topic. Set when fovea
/// creates a topic, and checked at every start on topics that exist (corrected when
/// `correct_existing` is on and the broker allows it). Frames are big and replaced by newer
/// ones; results are small and what the cloud must not miss, so they are kept longer.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct RetentionConfig {
    /// Whether fovea changes the retention of an existing topic that differs from this table
    /// (off: it only warns, for clusters whose topics another team manages).
    pub correct_existing: bool,
    /// `kafka.topics.frames` (images and their chunks).
    pub frames: FramesRetention,
    /// `kafka.topics.results`.
    pub results: ResultsRetention,
    /// `kafka.topics.deadletter` and `uplink.deadletter_topic`.
    pub dead_letters: DeadLettersRetention,
}

const HOUR_MS: i64 = 3_600_000;
const MIB: i64 = 1 << 20;

/// Sized for a 32 GB box at 25 frames/s of 60 KB (1.5 MB/s of frames): frames are capped by size
/// (1 GiB a partition: 12 to 35 min at that rate, as the cameras spread over the 3 partitions;
/// hours at a few frames/s); results (about 630 bytes each, 1.4 GB a day at that rate) keep
/// 1 GiB a partition, 19 to 57 hours, and 3 days at lower rates; dead letters are rare.
pub type FramesRetention = TopicRetention<FramesDefaults>;
pub type ResultsRetention = TopicRetention<ResultsDefaults>;
pub type DeadLettersRetention = TopicRetention<DeadLettersDefaults>;

/// A class's default retention: the type parameter of [`TopicRetention`].
pub trait ClassDefaults {
    const DEFAULT: Retention;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FramesDefaults;
impl ClassDefaults for FramesDefaults {
    const DEFAULT: Retention = Retention {
        retention_ms: 6 * HOUR_MS,
        retention_bytes: 1024 * MIB,
        segment_bytes: 64 * MIB,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ResultsDefaults;
impl ClassDefaults for ResultsDefaults {
    const DEFAULT: Retention = Retention {
        retention_ms: 72 * HOUR_MS,
        retention_bytes: 1024 * MIB,
        segment_bytes: 64 * MIB,
    };
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeadLettersDefaults;
impl ClassDefaults for DeadLettersDefaults {
    const DEFAULT: Retention = Retention {
        retention_ms: 7 * 24 * HOUR_MS,
        retention_bytes: 128 * MIB,
        segment_bytes: 16 * MIB,
    };
}

/// Kafka's topic settings of the same names (with `_` for `.`). The parameter gives the class's
/// defaults, so a table that sets one key keeps its class's defaults for the others.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(default, bound = "C: ClassDefaults")]
pub struct TopicRetention<C: ClassDefaults> {
    /// `retention.ms`: records older than this are deleted; -1 = no time limit.
    pub retention_ms: i64,
    /// `retention.bytes`: per partition, the oldest records are deleted above this; -1 = no
    /// size limit (the disk budget is then unbounded).
    pub retention_bytes: i64,
    /// `segment.bytes`: Kafka deletes whole segments, so a partition may hold up to one segment
    /// more than `retention_bytes`. (nisshi keeps no segments and ignores it.)
    pub segment_bytes: i64,
    #[serde(skip)]
    class: std::marker::PhantomData<C>,
}

impl<C: ClassDefaults> Default for TopicRetention<C> {
    fn default() -> Self {
        Self {
            retention_ms: C::DEFAULT.retention_ms,
            retention_bytes: C::DEFAULT.retention_bytes,
            segment_bytes: C::DEFAULT.segment_bytes,
            class: std::marker::PhantomData,
        }
    }
}

impl<C: ClassDefaults> TopicRetention<C> {
    pub fn settings(&self) -> Retention {
        Retention {
            retention_ms: self.retention_ms,
            retention_bytes: self.retention_bytes,
            segment_bytes: self.segment_bytes,
        }
    }
}

/// One topic's retention settings, whatever its class.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Retention {
    pub retention_ms: i64,
    pub retention_bytes: i64,
    pub segment_bytes: i64,
}

impl Retention {
    /// The settings as Kafka names them, in a fixed order.
    pub fn entries(&self) -> [(&'static str, String); 3] {
        [
            ("retention.ms", self.retention_ms.to_string()),
            ("retention.bytes", self.retention_bytes.to_string()),
            ("segment.bytes", self.segment_bytes.to_string()),
        ]
    }

    /// Bytes one partition may hold under these settings (records, without the broker's index
    /// and page overhead); `None` when `retention_bytes` sets no limit.
    pub fn partition_bytes(&self) -> Option<u64> {
        u64::try_from(self.retention_bytes)
            .ok()
            .map(|b| b + self.segment_bytes.max(0) as u64)
    }
}

/// The class of a topic fovea writes on the local broker, which picks its retention.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TopicClass {
    Frames,
    Results,
    DeadLetters,
}

impl TopicClass {
    pub fn name(self) -> &'static str {
        match self {
            TopicClass::Frames => "frames",
            TopicClass::Results => "results",
            TopicClass::DeadLetters => "dead_letters",
        }
    }
}

impl Config {
    /// Every topic fovea writes on the local broker with its class: the node's three, and the
    /// uplink's dead letters when the uplink is on.
    pub fn local_topics(&self) -> Vec<(String, TopicClass)> {
        let t = &self.kafka.topics;
        let mut topics = vec![
            (t.frames.clone(), TopicClass::Frames),
            (t.results.clone(), TopicClass::Results),
            (t.deadletter.clone(), TopicClass::DeadLetters),
        ];
        if self.uplink.enabled {
            topics.push((
                self.uplink.deadletter_topic.clone(),
                TopicClass::DeadLetters,
            ));
        }
        topics
    }
}

impl RetentionConfig {
    pub fn of(&self, class: TopicClass) -> Retention {
        match class {
            TopicClass::Frames => self.frames.settings(),
            TopicClass::Results => self.results.settings(),
            TopicClass::DeadLetters => self.dead_letters.settings(),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct TopicsConfig {
    pub frames: String,
    pub results: String,
    pub deadletter: String,
}

#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct InferenceConfig {
    /// Path of `libonnxruntime.so`. Empty = the `ORT_DYLIB_PATH` environment variable.
    pub onnxruntime_library: PathBuf,
    /// Inference worker threads (each holds its own session per model).
    pub workers: usize,
    /// ONNX Runtime intra-op threads per session.
    pub intra_threads: usize,
    /// Frames waiting for a worker, at most.
    pub queue_capacity: usize,
    /// What to do when inference falls behind.
    pub when_behind: WhenBehind,
    /// With `skip_stale`: a frame older than this when a worker picks it up is not inferred.
    pub max_frame_age_ms: u64,
    /// Images narrower or shorter than this are rejected as unusable.
    pub min_image_side: u32,
    /// Largest image accepted, checked from its header before it is decoded: pixels a side, and
    /// pixels in all (a decoded image costs 3 to 8 bytes a pixel). More is `too-many-pixels`.
    pub max_image_side: u32,
    pub max_image_pixels: u64,
    /// What to do with an image that is cut short (a JPEG without its end marker, a PNG without
    /// its IEND chunk).
    pub truncated: WhenTruncated,
}

/// What happens to a truncated image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenTruncated {
    /// A dead letter `truncated`: a half picture is not a picture.
    DeadLetter,
    /// Infer what decodes (a JPEG decodes grey below the cut), the result saying so in its
    /// `status_detail`; a PNG that does not decode is still a dead letter.
    Infer,
}

impl Config {
    /// The spool folder: `spool.dir`, or `spool` inside `node.state_dir` when that is empty.
    pub fn spool_dir(&self) -> PathBuf {
        if self.spool.dir.as_os_str().is_empty() {
            self.node.state_dir.join("spool")
        } else {
            self.spool.dir.clone()
        }
    }
}

/// Replication of results (and chosen frames) from the local broker to a cloud cluster.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UplinkConfig {
    pub enabled: bool,
    /// Bootstrap servers of the cloud cluster.
    pub brokers: String,
    /// Consumer group on the local broker whose committed offsets are the replication checkpoint.
    /// Empty = `fovea-uplink-<node id>`.
    pub group_id: String,
    /// Cloud topic names for results and frames.
    pub results_topic: String,
    pub frames_topic: String,
    /// Bytes per second sent to the cloud at most (record bytes); 0 = no cap. For metered links.
    pub bandwidth_bytes_per_sec: u64,
    /// The cloud cluster's record limit; larger frames are chunked again, and a result over it is
    /// refused (recorded in `deadletter_topic`).
    pub record_limit_bytes: usize,
    /// Topic on the LOCAL broker for uplink dead letters: the evidence of every record the uplink
    /// gave up on for good (refused by the cloud, or over `record_limit_bytes`), written before
    /// the checkpoint passes it. Created by the uplink at start.
    pub deadletter_topic: String,
    /// Compression towards the cloud: none, gzip, snappy, lz4, zstd.
    pub compression: String,
    /// Records sent to the cloud and not yet acknowledged, at most: beyond it replication waits.
    pub max_in_flight: usize,
    /// Share of a local topic's `retention.ms` that the age of its oldest unreplicated record may
    /// reach before `/readyz` warns (records older than the retention are deleted by the local
    /// broker before the cloud has them).
    pub retention_warn_share: f64,
    pub security: UplinkSecurity,
    /// Which frames are replicated (results always are).
    pub frames: crate::uplink::rules::FrameRules,
}

/// TLS and SASL towards the cloud cluster (librdkafka's settings of the same names).
#[derive(Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct UplinkSecurity {
    /// plaintext, ssl, sasl_plaintext or sasl_ssl.
    pub protocol: String,
    /// PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512 (with a sasl_* protocol).
    pub sasl_mechanism: String,
    pub sasl_username: String,
    /// Never logged or printed (Debug shows it redacted).
    pub sasl_password: String,
    pub ssl_ca_location: String,
    pub ssl_certificate_location: String,
    pub ssl_key_location: String,
    pub ssl_key_password: String,
}

impl std::fmt::Debug for UplinkSecurity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redact = |s: &String| if s.is_empty() { "" } else { "<redacted>" };
        f.debug_struct("UplinkSecurity")
            .field("protocol", &self.protocol)
            .field("sasl_mechanism", &self.sasl_mechanism)
            .field("sasl_username", &self.sasl_username)
            .field("sasl_password", &redact(&self.sasl_password))
            .field("ssl_ca_location", &self.ssl_ca_location)
            .field("ssl_certificate_location", &self.ssl_certificate_location)
            .field("ssl_key_location", &self.ssl_key_location)
            .field("ssl_key_password", &redact(&self.ssl_key_password))
            .finish()
    }
}

impl Config {
    /// The uplink's consumer group on the local broker.
    pub fn uplink_group(&self) -> String {
        if self.uplink.group_id.is_empty() {
            format!("fovea-uplink-{}", self.node_id())
        } else {
            self.uplink.group_id.clone()
        }
    }
}

/// Frames whose record would exceed `kafka.record_limit_bytes`.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct LargeFramesConfig {
    /// How such a frame is written to the frames topic.
    pub policy: LargeFramePolicy,
    /// Large frames (over the record limit) inside the pipeline at once; more wait at the broker.
    pub max_in_flight: usize,
    /// Chunked MQTT uploads: frames being reassembled at once, and how long a frame's chunks may
    /// take to arrive before the frame is reported incomplete.
    pub max_chunked_uploads: usize,
    pub chunk_timeout_ms: u64,
    /// Claim check: the blob store folder (empty = `<node.state_dir>/blobs`), its size bound and
    /// retention, where fovea serves it, and the base URL consumers use to reach it.
    pub store_dir: PathBuf,
    pub store_max_bytes: u64,
    pub retention_hours: u64,
    pub http_listen: String,
    pub public_url: String,
}

/// What happens to a frame too large for one record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LargeFramePolicy {
    /// Split into ordered `FrameChunk` records under the camera's key (Splitter/Aggregator).
    Chunk,
    /// Store the image in fovea's blob store and write a reference (claim check).
    ClaimCheck,
    /// Write a dead letter saying why (the result is still written).
    DeadLetter,
}

impl Config {
    /// The claim-check store folder: `large_frames.store_dir`, or `blobs` in `node.state_dir`.
    pub fn blob_dir(&self) -> PathBuf {
        if self.large_frames.store_dir.as_os_str().is_empty() {
            self.node.state_dir.join("blobs")
        } else {
            self.large_frames.store_dir.clone()
        }
    }

    /// The base URL of the blob store as consumers see it.
    pub fn blob_public_url(&self) -> String {
        let lf = &self.large_frames;
        if lf.public_url.is_empty() {
            format!("http://{}", lf.http_listen)
        } else {
            lf.public_url.trim_end_matches('/').to_string()
        }
    }
}

/// The on-disk buffer for records the local broker cannot take right now.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(default)]
pub struct SpoolConfig {
    /// Folder of the spool. Empty = `<node.state_dir>/spool`.
    pub dir: PathBuf,
    /// Bytes of records the spool holds at most (results and dead letters are kept even above).
    pub max_bytes: u64,
    /// What to do with a frame when the spool is full.
    pub when_full: crate::spool::WhenFull,
    /// A record the broker has not acknowledged after this long is spooled (and its frame acked).
    pub divert_after_ms: u64,
    /// Bytes handed to the producer and not yet acknowledged above which new records are spooled
    /// instead (the broker is slow): bounds the memory a slow broker can cost.
    pub slow_inflight_bytes: u64,
    /// How often to check whether an unreachable broker is back.
    pub probe_interval_ms: u64,
}

/// What happens when frames arrive faster than inference can take them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenBehind {
    /// Queue up to `queue_capacity` frames, then stop reading from MQTT: the broker holds the
    /// rest (unacked) until we catch up. Nothing is skipped.
    Backpressure,
    /// Frames older than `max_frame_age_ms` when a worker picks them up are stored but not
    /// inferred; their result has status SKIPPED_STALE. Keeps results fresh on a slow box.
    SkipStale,
}

/// A model to load: a folder with `manifest.toml` (relative to the config file's folder).
///
/// Unknown keys are rejected here as everywhere, but by the loader (which reports them all, with
/// their paths) rather than by `deny_unknown_fields` (which stops at the first).
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct ModelRef {
    pub path: PathBuf,
}

/// Runs `models` on cameras whose id matches `cameras`. Both keys are required: a route that
/// forgot its models would silently store frames without inferring.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
pub struct Route {
    /// Camera id pattern: exact, or with `*` wildcards (`dock-*`, `*`).
    pub cameras: String,
    /// Model names (from their manifests); empty = store frames, infer nothing.
    pub models: Vec<String>,
}

/// Where the kernel keeps the hostname; read directly so no libc call (or `unsafe`) is needed.
const HOSTNAME_FILE: &str = "/proc/sys/kernel/hostname";

impl Config {
    /// This node's name: `node.id`, else the hostname, else `fovea` (a node must always have a
    /// name, and a missing /proc is no reason not to start).
    pub fn node_id(&self) -> String {
        if !self.node.id.is_empty() {
            return self.node.id.clone();
        }
        std::fs::read_to_string(HOSTNAME_FILE)
            .ok()
            .map(|name| name.trim().to_owned())
            .filter(|name| !name.is_empty())
            .unwrap_or_else(|| "fovea".to_owned())
    }

    /// The MQTT client id: `mqtt.client_id`, else `fovea-<node id>` (stable across restarts, so
    /// the broker's persistent session finds us again).
    pub fn mqtt_client_id(&self) -> String {
        if self.mqtt.client_id.is_empty() {
            format!("fovea-{}", self.node_id())
        } else {
            self.mqtt.client_id.clone()
        }
    }
}
