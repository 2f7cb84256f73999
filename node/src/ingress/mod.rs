//! MQTT ingress: receives camera frames and hands them to the workers.
//!
//! - `mqtt`: the connection (QoS 1, persistent session, manual acks, reconnect with backoff).
//! - `payload`: what a payload is (bare JPEG/PNG or a `Frame` envelope) and why one is refused.
//! - `topic`: the camera id from the topic.
//! - `ack`: the PUBACK that travels with a frame until its records are durable.
//! - `backoff`: exponential reconnect delays with jitter.
//! - `chunked`: reassembly of frames uploaded in `FrameChunk` pieces.

pub mod backoff;
pub mod chunked;
pub mod mqtt;
pub mod payload;
pub mod topic;
