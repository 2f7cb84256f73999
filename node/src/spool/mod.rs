//! The spool: the durable on-disk buffer for records the local Kafka broker cannot take right now.
//!
//! While the broker is away, slow or refusing, the outbox appends every record bound for Kafka
//! here, calls [`Spool::flush`], and only then acknowledges the camera's MQTT frame. When the
//! broker is back it drains the spool oldest-first ([`Spool::oldest`]) and removes each record
//! once Kafka acknowledged it ([`Spool::remove`]).
//!
//! Files: [`record`] (the on-disk format), [`sled_spool`] (the engine's policy: appends, drops,
//! quarantine), `store` (the sled database: opening, locks, the start-up scan), `large` (record
//! files), [`report`] (what `fovea spool stats` and `fovea spool verify` print), [`bench`]
//! (`fovea spool bench`).
//!
//! # Engine
//!
//! [`SledSpool`] stores records in sled 0.34.7. sled's 0.34 line is no longer developed: the
//! outbox only sees the [`Spool`] trait so the engine can be replaced without touching it.
//! One sled database per spool folder, with five trees:
//!
//! | tree | key | value |
//! |---|---|---|
//! | `records` | seq, u64 big-endian (sled's key order is append order) | the record, or a file stub (format below) |
//! | `index` | seq of every record | class (u8), [`SpoolRecord::size`] (u64 BE), `created_ms` (i64 BE): counters, drops and removals never read or decode a record |
//! | `frames` | seq of every frame record | its size, u64 BE: finds the oldest frame to drop without walking past results |
//! | `meta` | `next_seq`; `drop/<class>/<reason>` | u64 big-endian |
//! | `quarantine` | seq (as found in `records`) | the raw bytes of a record that failed its checks |
//!
//! **Large records live in files.** A record whose encoding exceeds 64 KiB is written to
//! `large/<seq as 16 hex digits>.rec` (the same bytes as an inline value), and `records` holds an
//! 11-byte *stub*: the file's header with magic `b"FL"` instead of `b"FS"`. sled 0.34 writes
//! pages over 128 KiB as separate blob files and does not reliably delete them (sled issue
//! #786): measured here, every write-and-drain cycle of 200 one-MiB frames left ~650 MiB of dead
//! blobs for good, also across restarts. A record file is deleted when its record goes.
//!
//! Beside them: `fovea-next-seq` (see the durability rules) and sled's own files (`conf`, `db`,
//! `blobs/`, `snap.*`).
//!
//! # Record format (version 1)
//!
//! ```text
//! offset  size  field
//! 0       2     magic b"FS" (a file stub: b"FL", and nothing after the header)
//! 2       1     format version = 1
//! 3       4     CRC-32C (Castagnoli) of the body, u32 little-endian
//! 7       4     body length in bytes, u32 little-endian
//! 11      n     body: protobuf (prost) message: class (1 frame, 2 result, 3 dead letter),
//!               topic, key, headers (name, value), value, created_ms
//! ```
//!
//! A value whose magic, version, length, checksum, protobuf or class does not check out (or
//! whose record file is missing or disagrees with its stub) is *corrupt*: it is moved, byte for
//! byte, to the `quarantine` tree (a record file is kept beside as `<seq>.quarantined`), counted,
//! logged at error, and skipped, both when the spool is opened and when [`Spool::oldest`] meets
//! it. Nothing panics on stored bytes, and a corrupt record is looked at once, never in an
//! endless error loop. `fovea spool verify` checks every record without changing anything.
//!
//! # Durability rules
//!
//! - **append** puts the record in sled's memory and log buffer (a large one also in its file,
//!   not synced). It is *not* durable: a crash (SIGKILL, power loss) before the next flush may
//!   lose it. (sled also flushes on its own every 500 ms; that only makes loss less likely,
//!   nothing relies on it.) Sequence numbers strictly increase and are never reused: the next
//!   one is stored with every append.
//! - **flush** fsyncs the record files written since the last flush and their folder, *then*
//!   calls sled's `flush()` (which fsyncs its log), so a durable stub never points at a file that
//!   is not. The outbox acknowledges an MQTT frame only after the flush that follows its records
//!   returned `Ok`. A crash after that flush cannot lose those records.
//! - **remove** happens after Kafka acknowledged the record. It is made durable by the next flush
//!   (or sled's periodic one). A crash before that re-sends the record on restart: a duplicate
//!   carrying the same `fovea-record-id` header, never a loss. A record file is deleted only
//!   after the flush that made its removal durable (`remove` flushes itself when it removed a
//!   large record, to give the space back at once); a crash in between leaves an orphaned file,
//!   which the next open deletes.
//! - **drops** (a full spool, [`WhenFull::DropOldestFrames`]): the counter in `meta` is written
//!   before the dropped record is removed and both become durable at the next flush: after a
//!   crash a drop is either undone (the frame is still there) or counted, never silently lost.
//! - **the seq file** `fovea-next-seq` holds the next seq as of the last open, clean close, or
//!   flush at least 10 s after its previous update (always after a successful sled flush: write,
//!   fsync, rename, fsync the folder). sled 0.34 may open a database whose log is garbage as an
//!   *empty* one, without an error; sled's next seq below the file's shows that it lost records.
//!   It also keeps seqs increasing across a spool moved aside.
//! - **open** scans every record once: it verifies checksums, quarantines corrupt records,
//!   rebuilds the counters, repairs `index` and `frames` (the trees are written one after the
//!   other, so a crash may leave them one step behind) and deletes orphaned record files. If
//!   sled refuses to open the folder, or lost records, the folder is renamed to
//!   `<dir>.corrupt-<unix-ms>` and a fresh spool is created: the node starts instead of
//!   crash-looping, and the old files are kept for inspection.
//!
//! What a crash can lose, in short: records appended since the last successful flush, which
//! the outbox has not acknowledged to anyone. Nothing that was acknowledged.
//!
//! # Size
//!
//! `max_bytes` bounds the *record* bytes ([`SpoolRecord::size`]: topic, key, headers and value).
//! Results and dead letters are always stored, even above it (they are small and are what the
//! node exists to produce); frames follow [`WhenFull`]. The disk holds more: sled's log of small
//! records is about twice their size and is reused rather than returned; record files take their
//! size. Quarantined records are not counted.

pub mod bench;
mod large;
pub mod record;
pub mod report;
pub mod sled_spool;
mod store;

#[cfg(test)]
mod tests;

pub use record::{Class, SpoolRecord};
pub use report::{CorruptRecord, OpenReport, SpoolStats, VerifyReport};
pub use sled_spool::{SledSpool, inject_raw_for_tests, verify};

use std::path::PathBuf;

/// What the spool does with a new *frame* when it is full. Results and dead letters are always
/// stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the oldest spooled frames until the new record fits (every drop counted as
    /// `frame/spool-full-oldest`). Keeps the newest pictures.
    DropOldestFrames,
    /// Refuse the new frame ([`Appended::Refused`]): the caller keeps it un-acked at the MQTT
    /// broker until the spool drained. Nothing is dropped.
    Backpressure,
}

/// How to open a spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolOptions {
    /// The spool's folder (created if missing). One process at a time.
    pub dir: PathBuf,
    /// Record bytes the spool holds at most (see the module doc, "Size").
    pub max_bytes: u64,
    /// What happens to a new frame when the spool is full.
    pub when_full: WhenFull,
}

/// The outcome of [`Spool::append`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// The record is stored under `seq` (durable after the next flush). `dropped` lists the
    /// older frames dropped to make room (already counted).
    Stored { seq: u64, dropped: Vec<Dropped> },
    /// The frame was not stored. Under [`WhenFull::Backpressure`]: nothing was dropped, hold the
    /// frame un-acked and retry later. Under [`WhenFull::DropOldestFrames`]: the frame does not fit
    /// even without any older frame, so it was dropped itself (counted as
    /// `frame/spool-full-no-room`). Only ever returned for [`Class::Frame`].
    Refused,
}

/// A record dropped to make room for a new one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Its seq (it will not come out of [`Spool::oldest`] any more).
    pub seq: u64,
    /// Always [`Class::Frame`] today; there to keep the log line and counters honest.
    pub class: Class,
    /// Its [`SpoolRecord::size`].
    pub bytes: u64,
    /// When it was spooled: how much history was lost.
    pub created_ms: i64,
}

/// A durable, bounded, ordered buffer of [`SpoolRecord`]s. See the module doc for the rules.
pub trait Spool: Send {
    /// Appends in order (seq strictly increasing, never reused, also across restarts). Not
    /// durable until [`Spool::flush`].
    ///
    /// When stored bytes plus the new record exceed `max_bytes`: a frame under
    /// [`WhenFull::DropOldestFrames`] drops the oldest frames until it fits (returned in
    /// `dropped`, counted); if it cannot fit even with every older frame gone, nothing is dropped
    /// and the new frame is refused and counted. A frame under [`WhenFull::Backpressure`] is
    /// refused, nothing dropped. Results and dead letters are always stored (even above
    /// `max_bytes`), under `DropOldestFrames` after dropping oldest frames to make room.
    fn append(&mut self, rec: &SpoolRecord) -> Result<Appended, SpoolError>;

    /// Appends the records of one frame (its chunks, result, dead letters) as one unit.
    fn append_frame(&mut self, records: &[SpoolRecord]) -> Result<Appended, SpoolError> {
        let mut last = Appended::Refused;
        for rec in records {
            last = self.append(rec)?;
        }
        Ok(last)
    }

    /// Makes every record appended (and removed, and every drop counted) so far durable: sled's
    /// flush, which fsyncs. Acknowledge frames only after this returned `Ok`.
    fn flush(&mut self) -> Result<(), SpoolError>;

    /// Up to `max` oldest records with seq > `after` (`None` = from the start), in seq order. A
    /// record failing its checksum or decode is quarantined, logged and skipped.
    fn oldest(
        &mut self,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, SpoolRecord)>, SpoolError>;

    /// Removes records (after Kafka acknowledged them). An unknown seq is not an error.
    fn remove(&mut self, seqs: &[u64]) -> Result<(), SpoolError>;

    /// Would a record of `class` and `bytes` be stored without dropping anything? (A result
    /// under [`WhenFull::Backpressure`] always is, even above `max_bytes`.)
    fn has_room(&self, class: Class, bytes: u64) -> bool;

    /// No records (quarantined ones do not count).
    fn is_empty(&self) -> bool;

    /// Counters for `fovea spool stats` and metrics.
    fn stats(&self) -> SpoolStats;
}

/// Everything that can go wrong in the spool. Each variant says what the caller should do.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file-system operation failed (disk full, permissions, I/O error). Log it and retry
    /// later; keep the affected frames un-acked meanwhile.
    #[error("spool {context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },

    /// sled failed a read or write (disk trouble underneath, usually). Log it and retry later;
    /// keep the affected frames un-acked. If it persists, stop the node and run
    /// `fovea spool verify`.
    #[error("spool storage ({context}): {source}")]
    Sled {
        context: String,
        #[source]
        source: sled::Error,
    },

    /// Another process (a running node?) holds the spool folder: sled allows one at a time.
    /// Stop that process first, or use another folder.
    #[error(
        "spool {dir} is locked by another process (is the node running? stop it first): {detail}"
    )]
    Locked { dir: PathBuf, detail: String },

    /// There is no spool in that folder (for `verify` and the test aid, which never create
    /// one). Check the path (`spool.dir`, default `<node.state_dir>/spool`).
    #[error("no spool at {dir} (no sled database there)")]
    NotFound { dir: PathBuf },

    /// A record too large for the format (its body length field is 32 bits). Never happens with
    /// the outbox's record limits; dead-letter the record.
    #[error("a record of {bytes} bytes cannot be spooled: {detail}")]
    TooLarge { bytes: u64, detail: String },

    /// sled refuses to open the folder: its own files are damaged. [`SledSpool::open`] handles
    /// this itself (moves the folder aside); `verify` reports it. Start the node to move it aside
    /// and start fresh, or inspect the files.
    #[error("spool {dir} cannot be opened, its files are damaged: {detail}")]
    Damaged { dir: PathBuf, detail: String },
}

impl SpoolError {
    /// An [`SpoolError::Io`] with what was being done.
    pub(crate) fn io(context: impl Into<String>, source: std::io::Error) -> Self {
        SpoolError::Io {
            context: context.into(),
            source,
        }
    }

    /// An [`SpoolError::Sled`] with what was being done.
    pub(crate) fn sled(context: impl Into<String>, source: sled::Error) -> Self {
        SpoolError::Sled {
            context: context.into(),
            source,
        }
    }
}
