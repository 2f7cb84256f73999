//! The blob store's one error type. Each variant's doc says what the caller should do.

use std::path::PathBuf;
use std::time::Duration;

/// Everything that can go wrong storing, serving or fetching a blob.
#[derive(Debug, thiserror::Error)]
pub enum BlobError {
    /// The store folder cannot be created, locked or listed. Fatal at start-up: fix the path or
    /// its permissions.
    #[error("blob store {dir}: {source}; check that the folder exists and is writable")]
    Open {
        dir: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// Another process has the store open. Fatal at start-up: stop the other fovea or give this
    /// one another blob folder.
    #[error("blob store {dir} is in use by another process; stop it or use another folder")]
    Locked { dir: PathBuf },

    /// Reading, writing, syncing or deleting a blob file failed (a full or failing disk). After a
    /// failed `put` nothing was stored: write no reference; keep the frame un-acked (or dead-letter
    /// it) and retry later.
    #[error("blob store: cannot {op} {path}: {source}")]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The id is not a SHA-256 in 64 lowercase hex digits. Do not retry: the caller (or the HTTP
    /// client) asked for something that cannot be a blob. `id` is shortened to 80 characters.
    #[error("malformed blob id {id:?}: expected 64 lowercase hex digits")]
    InvalidId { id: String },

    /// `fetch` was given something other than `http://host[:port]/path`. Fix the URL (https is
    /// not supported).
    #[error("unsupported URL {url:?}: {reason}")]
    BadUrl { url: String, reason: &'static str },

    /// Connecting to the server, sending the request or reading the response failed. Retry
    /// later: the node serving the blob may be down or unreachable.
    #[error("fetching {url}: {source}")]
    Transport {
        url: String,
        #[source]
        source: std::io::Error,
    },

    /// The server answered with a status other than 200. 404 means the blob is unknown there
    /// (pruned after its retention, or the wrong node): do not retry.
    #[error("fetching {url}: server answered {status} {reason}")]
    Status {
        url: String,
        status: u16,
        reason: String,
    },

    /// The body is larger than the caller's limit. Raise the limit if the blob is legitimate.
    #[error("fetching {url}: body exceeds the limit of {limit} bytes")]
    TooLarge { url: String, limit: u64 },

    /// The whole exchange took longer than the caller's timeout. Retry later or allow more time.
    #[error("fetching {url}: no complete response within {after:?}")]
    Timeout { url: String, after: Duration },

    /// The server's response is not HTTP/1.x as understood here, or the connection closed before
    /// the body was complete. Retry; if it persists, the URL points at something else.
    #[error("fetching {url}: bad response: {detail}")]
    BadResponse { url: String, detail: String },
}

impl BlobError {
    /// An [`BlobError::InvalidId`] for `id`, shortened so an untrusted id cannot flood a log.
    pub(super) fn invalid_id(id: &str) -> BlobError {
        BlobError::InvalidId {
            id: id.chars().take(80).collect(),
        }
    }
}
