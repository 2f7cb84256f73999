//! The claim-check blob store: frames too large for a Kafka record are kept on the node's disk,
//! and the record carries only a reference to them (URL, size, SHA-256).
//!
//! # Why claim checks
//!
//! A Kafka record is limited (`kafka.record_limit_bytes`, 1 MiB by default) and large records
//! are costly for every broker, replica and consumer, while a camera's PNG or 4K JPEG can be tens
//! of megabytes. Rather than dead-lettering such a frame, the outbox stores its bytes here
//! ([`BlobStore::put`]) and writes a frame record holding [`blob_url`], the size and the SHA-256:
//! the *claim check*. Consumers (and `fovea frames export`) follow the URL over HTTP ([`serve`],
//! [`fetch`]) and verify the bytes against the SHA-256 in the record.
//!
//! Files: `store` (the folder: put, get, prune, the pruner task), `http` (the server and a
//! minimal client), `error` ([`BlobError`]), `tests`.
//!
//! # Layout on disk
//!
//! One flat folder ([`BlobStoreOptions::dir`]):
//!
//! | name | what |
//! |---|---|
//! | `<sha256>` (64 lowercase hex digits) | one blob: exactly the bytes stored, named by their SHA-256 |
//! | `.tmp-<pid>-<n>` | a put in progress; deleted at open (what a crash left behind) |
//! | `.lock` | locked (flock) by the process that has the store open: one process per folder |
//!
//! Anything else in the folder is ignored. Content addressing makes a put idempotent: the same
//! bytes get the same name and are stored once (a redelivered frame reuses its blob).
//!
//! # Durability
//!
//! [`BlobStore::put`] writes a temp file in the folder, fsyncs it, renames it to its id, fsyncs
//! the folder, and only then returns the id. The outbox writes the Kafka record (the reference)
//! only after `put` returned, so **a blob is durable before its reference is written**: a crash
//! can leave a blob that no record points at (pruned in time), never a reference to a lost blob.
//! A put of content that is already there refreshes the file's mtime and fsyncs the folder too
//! (the file may be a concurrent put's, renamed but not yet synced).
//!
//! # Retention
//!
//! A blob's age is its file's mtime: set when stored, refreshed whenever the same content is put
//! again, so a blob lives `retention` past the latest record that references it unless
//! `max_bytes` forces it out. [`BlobStore::prune`], called every so often by [`run_pruner`],
//! deletes blobs older than `retention`, then the oldest until the store holds at most
//! `max_bytes`. Between two prunes the store can exceed `max_bytes` by what was put meanwhile:
//! size the interval to the frame rate. A reference can outlive its blob: a consumer that comes
//! later than the retention gets 404 (the claim check expired). Renames and deletions are ordered
//! by one lock, so a prune never deletes a blob between a put finding it present and refreshing
//! its age. Ages use the wall clock: on a box that boots with its clock in the past and syncs it
//! later, blobs written before the sync look old.
//!
//! # HTTP
//!
//! [`serve`] answers `GET`/`HEAD /blobs/<sha256>` and `/healthz`, one request per connection
//! (`Connection: close`), with the request head limited to 8 KiB and 10 s, at most 256
//! connections at once, and a response dropped when its client reads nothing for 30 s.

mod error;
pub(crate) mod http;
mod store;

#[cfg(test)]
mod tests;

pub use error::BlobError;
pub use http::{fetch, serve};
pub use store::{BlobStore, BlobStoreOptions, run_pruner};

/// The URL of blob `id` as a consumer should see it: `{base}/blobs/{id}`, where `base` is the
/// operator's address of this node's blob server, e.g. `http://10.0.0.5:8088` (a trailing `/`
/// is ignored).
pub fn blob_url(base: &str, id: &str) -> String {
    format!("{}/blobs/{id}", base.trim_end_matches('/'))
}

/// Resolves once `shutdown` is true or its sender is gone (nobody can stop us any more). Returns
/// nothing, so no watch guard (not `Send`) is held across the caller's later awaits.
async fn stopped(shutdown: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = shutdown.wait_for(|&stop| stop).await;
}
