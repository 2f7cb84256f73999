//! Kafka records: the one place that builds, sizes, chunks and parses them.
//!
//! Everything fovea writes to Kafka (frames, frame chunks, results, dead letters; locally and, by
//! the uplink, to the cloud) is a [`Record`]: topic, key, headers, value. This module owns
//!
//! - [`record`]: the record type, its size as a broker counts it, reading one back from an
//!   rdkafka message or the spool;
//! - [`policy`]: [`SizePolicy`], how a frame travels (the `fovea-size-policy` header);
//! - [`build`]: the headers every record carries, frame records (inline, claim check, or split
//!   into chunks), results and dead letters, each checked against a [`RecordLimit`] and made to
//!   fit (or turned into a dead letter that fits);
//! - [`refusal`]: what a producer's error means for the record: retry it, dead-letter it, or
//!   rebuild the producer.
//!
//! The outbox, the uplink, the spool conversion and the tools (`tail`, `frames export`) all go
//! through here; nothing else builds or parses fovea's headers. Nothing here talks to a broker,
//! so all of it is tested without one.

mod build;
mod policy;
mod record;
mod refusal;

pub use build::{
    FRAMING_ALLOWANCE, FrameRecords, FrameTooLarge, METADATA_DROPPED, RecordLimit,
    TRUNCATION_MARKER, dead_letter_record, fit_dead_letter, fit_result, frame_records,
    truncate_text,
};
pub use policy::SizePolicy;
pub use record::{Record, RecordKind, header_of, headers_of};
pub use refusal::{Refusal, classify, timed_out};
