//! fovea's protobuf records and the Kafka header conventions that go with them.
//!
//! Every record fovea writes to Kafka has a protobuf value (one of [`v1::Frame`],
//! [`v1::InferenceResult`], [`v1::DeadLetter`], or [`v1::FrameChunk`]) and a fixed set of headers
//! (see [`headers`]) so that a consumer can route, decode and deduplicate a record without
//! parsing its value.

pub mod chunks;

/// Generated types of package `fovea.v1`.
pub mod v1 {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/fovea.v1.rs"));
}

/// Names and values of the headers on every fovea record.
pub mod headers {
    /// MIME type of the record value: always [`CONTENT_TYPE_PROTOBUF`] for fovea's records.
    pub const CONTENT_TYPE: &str = "content-type";
    /// Fully qualified protobuf message name of the value, e.g. `fovea.v1.InferenceResult`.
    pub const SCHEMA: &str = "fovea-schema";
    /// Stable id of the record, `node/camera/frame-id`: equal for every redelivery of the same
    /// frame, so consumers deduplicate on it.
    pub const RECORD_ID: &str = "fovea-record-id";
    /// The node that wrote the record.
    pub const NODE: &str = "fovea-node";
    /// The camera the record is about (also the record key).
    pub const CAMERA: &str = "fovea-camera";
    /// On results: the models that ran, `name@version` comma-separated.
    pub const MODEL: &str = "fovea-model";
    /// On frames: MIME type of the image inside the value (`image/jpeg`, `image/png`).
    pub const IMAGE_TYPE: &str = "fovea-image-type";
    /// On frames and dead letters: how the payload was stored: `inline`, `chunked`,
    /// `claim-check`, or `dead-letter`.
    pub const SIZE_POLICY: &str = "fovea-size-policy";
    /// On dead letters: the machine-readable error class.
    pub const ERROR_KIND: &str = "fovea-error-kind";

    /// Value of [`CONTENT_TYPE`] on every fovea record.
    pub const CONTENT_TYPE_PROTOBUF: &str = "application/x-protobuf";

    /// Schema names, values of [`SCHEMA`].
    pub const SCHEMA_FRAME: &str = "fovea.v1.Frame";
    pub const SCHEMA_FRAME_CHUNK: &str = "fovea.v1.FrameChunk";
    pub const SCHEMA_RESULT: &str = "fovea.v1.InferenceResult";
    pub const SCHEMA_DEAD_LETTER: &str = "fovea.v1.DeadLetter";
}

pub use prost::Message;
