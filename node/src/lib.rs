//! fovea: an edge machine-vision node. Cameras publish frames over MQTT; fovea runs ONNX models on
//! them and writes frames and results to the local Kafka broker.
//!
//! Layout (one module per stage):
//! - [`config`]: the TOML config: typed, every error at once, env overrides, default config.
//! - [`ingress`]: MQTT connection, payload parsing, camera ids, manual acks.
//! - [`inference`]: model manifests, preprocessing, ONNX Runtime sessions, postprocessing.
//! - [`job`]: what travels between the stages (jobs, finished jobs, MQTT acks, rejections, ids);
//!   a leaf that no stage reaches around.
//! - [`pipeline`]: the wiring: bounded queue, worker threads, per-camera ordering, shutdown.
//! - [`outbox`]: Kafka records (and the size policy), the producer, topic creation.
//! - [`records`]: Kafka records: one type, size policy, sizing, chunking, headers, refusals.
//! - [`stats`]: counters and stage latencies.
//! - [`metrics`]: the Prometheus exposition of those.
//! - [`service`]: systemd notifications and watchdog, health, the `/metrics` endpoint.
//! - [`spool`]: the durable buffer while the local broker is away.
//! - [`blobstore`]: claim checks for large frames.
//! - [`disk`]: the disk budget: parts, their sum per filesystem, current bytes.
//! - [`uplink`]: replication to the cloud cluster.
//! - [`tools`]: `fovea camera`, `fovea tail`, `fovea frames export`, `fovea bench`.
//! - [`cli`], [`logging`]: the binary's edges.
//!
//! `fuzzing` (hidden) is no API: it opens the decoders of outside bytes that are not public
//! elsewhere to the fuzz targets in `fuzz/`.

pub mod blobstore;
pub mod cli;
pub mod config;
pub mod disk;
#[doc(hidden)]
pub mod fuzzing;
pub mod inference;
pub mod ingress;
pub mod job;
pub mod logging;
pub mod metrics;
pub mod outbox;
pub mod pipeline;
pub mod records;
pub mod service;
pub mod spool;
pub mod stats;
pub mod tools;
pub mod uplink;
