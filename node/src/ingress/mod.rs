//! MQTT ingress: receives camera frames and hands them to the workers.
//!
//! - `mqtt`: the connection (QoS 1, persistent session, manual acks, reconnect with backoff),
//!   polled without pause so that keep-alive never waits for the pipeline.
//! - `dispatch`: what each delivery becomes (a job, a chunk, a refusal); it may wait, the
//!   connection does not.
//! - `payload`: what a payload is (bare JPEG/PNG or a `Frame` envelope) and why one is refused.
//! - `topic`: the camera id from the topic.
//! - `backoff`: exponential reconnect delays with jitter.
//! - `chunked`: reassembly of frames uploaded in `FrameChunk` pieces; `chunk_store`: the chunks
//!   on disk, so that each is acked once stored.
//! - `spill`: payloads of deliveries beyond the memory budget, waiting in files for the
//!   dispatcher (mosquitto 2.0.11 sends past its window).

pub mod backoff;
pub mod chunk_store;
pub mod chunked;
pub mod dispatch;
pub mod mqtt;
pub mod payload;
pub mod spill;
pub mod topic;
