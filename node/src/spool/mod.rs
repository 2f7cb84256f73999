//! The spool: the durable on-disk buffer for records the local Kafka broker cannot take right now.
//!
//! While the broker is away, slow or refusing, the outbox appends every record bound for Kafka
//! here, one frame at a time ([`Spool::append_frame`]: its frame record or chunks, its result,
//! its dead letters, all or nothing), calls [`Spool::flush`], and only then acknowledges the
//! camera's MQTT frame. When the broker is back it drains the spool oldest-first
//! ([`Spool::oldest`]) and removes each record once Kafka acknowledged it ([`Spool::remove`]).
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
//! | `frames` | seq of the first frame record of every whole frame that may be dropped | its frame records' bytes and the seq of its last one, u64 BE each: finds the oldest frame to drop without walking past results |
//! | `meta` | `next_seq`; `drop/<class>/<reason>`; `unit_open`, `drop_open` while an append or a drop is under way | u64 big-endian; the markers: first seq and end seq (exclusive) |
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
//!               topic, key, headers (name, value), value, created_ms, and in frame records
//!               the frame they belong to: seq of its first frame record (7), how many (8)
//! ```
//!
//! Fields 7 and 8 came with whole-frame units and are optional: a record without them (written
//! by an earlier version, or a result) is a frame of one record, and an earlier version reads the
//! new records unchanged (protobuf skips unknown fields), so the format version stays 1.
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
//! - **append** ([`Spool::append_frame`]) puts one frame's records in sled's memory and log
//!   buffer (a large one also in its file, not synced), under consecutive seqs. It is *not*
//!   durable: a crash (SIGKILL, power loss) before the next flush may lose it. (sled also
//!   flushes on its own every 500 ms; that only makes loss less likely, nothing relies on it.)
//!   Sequence numbers strictly increase and are never reused: the next one is stored with every
//!   append. An append is all or nothing: the `unit_open` marker is written before its records
//!   and removed after its `frames` entry; an error half-way removes what it wrote (if even
//!   that fails, the spool retries it before any other operation, and the marker makes the next
//!   open do it); a crash half-way leaves the marker, and the next open removes the unit's
//!   records (never flushed as a whole, so never acknowledged). This relies on sled recovering
//!   a prefix of its log after a crash, which is how its log recovery works: it stops at the
//!   first torn or missing entry.
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
//! - **drops** (a full spool, [`WhenFull::DropOldestFrames`]) take whole frames: the frame's
//!   entry in `frames` names its first and last seq, and every frame record in between goes
//!   (results and dead letters between them stay). The counter in `meta` (one per frame) is
//!   written first, then the `drop_open` marker, the removals, and the marker's removal; all
//!   become durable at the next flush: after a crash a drop is either undone (the frame is still
//!   there, whole) or counted and finished by the next open (no part of the frame drains). A
//!   frame one of whose records was removed (delivered to Kafka, or quarantined) leaves
//!   `frames`: it is never dropped, so Kafka never gets part of a frame because of a drop.
//! - **the seq file** `fovea-next-seq` holds the next seq as of the last open, clean close, or
//!   flush at least 10 s after its previous update (always after a successful sled flush: write,
//!   fsync, rename, fsync the folder). sled 0.34 may open a database whose log is garbage as an
//!   *empty* one, without an error; sled's next seq below the file's shows that it lost records.
//!   It also keeps seqs increasing across a spool moved aside.
//! - **open** scans every record once: it verifies checksums, quarantines corrupt records,
//!   undoes an interrupted append and finishes an interrupted drop (the markers), rebuilds the
//!   counters, repairs `index` and `frames` (the trees are written one after the other, so a
//!   crash may leave them one step behind; `frames` is rebuilt from fields 7 and 8: a frame all
//!   of whose records are present) and deletes orphaned record files. If
//!   sled refuses to open the folder, or lost records, the folder is renamed to
//!   `<dir>.corrupt-<unix-ms>` and a fresh spool is created: the node starts instead of
//!   crash-looping, and the old files are kept for inspection.
//!
//! What a crash can lose, in short: records appended since the last successful flush, which
//! the outbox has not acknowledged to anyone. Nothing that was acknowledged.
//!
//! **A spool written by the previous version** (single-record `frames` entries of 8 bytes, no
//! fields 7 and 8) opens as it is, without migration: an 8-byte entry reads as a frame of one
//! record, which is what it was to that version. Chunks it spooled one by one stay separate
//! frames (they may still be dropped one by one, as before); everything appended from then on
//! is whole frames. The scan finds nothing to repair in such a spool.
//!
//! # Size
//!
//! `max_bytes` bounds the *record* bytes ([`SpoolRecord::size`]: topic, key, headers and value).
//! Results and dead letters are always stored, even above it (they are small and are what the
//! node exists to produce); frames follow [`WhenFull`], a whole frame (all its chunks) at a time.
//! The disk holds more: sled's log of small records is about twice their size and is reused
//! rather than returned; record files take their size. Quarantined records are not counted.
//!
//! # A full disk
//!
//! sled 0.34.7 must never meet a full file system. Measured on a 4 MiB tmpfs (a small program
//! writing 1 KB and 40 KB values, flushing every 16): with small values sled's `flush` fails with
//! ENOSPC (`Io(Custom { kind: StorageFull, .. })`) and from then on **every** operation of that
//! database fails the same way, removals included, also after space is freed; a reopen fails
//! until about 512 KiB are free, then finds every flushed record intact. With 40 KB values
//! `insert` fails with ENOSPC and the next `flush`, and dropping the database (which flushes),
//! **hang forever** in sled's `iobuf::make_stable`. No panic, no corruption seen.
//!
//! So [`SledSpool`] checks the file system's free space (`statvfs`) before every append: a unit
//! whose records (about 3 times their bytes for records kept in sled, their size for record
//! files) would leave less than `DISK_RESERVE_BYTES` (4 MiB) free is not written at all:
//! [`SpoolError::DiskFull`], which [`SpoolError::is_disk_full`] tells apart, for the outbox to
//! hold the frame un-acked at the MQTT broker and retry, as under backpressure, whatever
//! [`WhenFull`] says (a full disk never drops frames, results are held too). The reserve covers
//! sled's own writes: fill-and-drain cycles on a 12 MiB tmpfs never reached sled's ENOSPC, and a
//! restart on the full file system opened. Only another process filling the disk can still
//! bring sled to ENOSPC; the node then holds frames un-acked and needs a restart once space is
//! free (a hung flush stops the outbox's turns: the watchdog restarts the node).
//!
//! sled does not give its space back: on that 12 MiB tmpfs an emptied spool took 7.6 to 8.5 MB
//! after each of three fill-and-drain cycles (its log grows and blob files of pages over 128 KiB,
//! several inline records of 30 KB in one leaf, stay: sled issue #786), so each cycle held
//! fewer frames (27, 17, 4 frames of 4 chunks). Give the spool a file system of several times
//! `max_bytes`.

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

use std::ops::Range;
use std::path::PathBuf;

/// What the spool does with a new *frame* when it is full. Results and dead letters are always
/// stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WhenFull {
    /// Drop the oldest spooled frames, whole (all their chunks), until the new frame fits
    /// (every frame dropped counted once as `frame/spool-full-oldest`). Keeps the newest
    /// pictures.
    DropOldestFrames,
    /// Refuse the new frame, all of it ([`Appended::Refused`]): the caller keeps it un-acked at
    /// the MQTT broker until the spool drained. Nothing is dropped.
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

/// The outcome of [`Spool::append_frame`] (and [`Spool::append`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Appended {
    /// Every record of the unit is stored, in order, under the consecutive seqs `seqs` (durable
    /// after the next flush). `dropped` lists the older frames dropped to make room (already
    /// counted).
    Stored {
        seqs: Range<u64>,
        dropped: Vec<Dropped>,
    },
    /// [`WhenFull::DropOldestFrames`] only: the unit's frame records do not fit even with every
    /// older frame gone, so they were dropped (all of them, counted once as
    /// `frame/spool-full-no-room`; `records` and `bytes` say how much) and nothing older was
    /// dropped for them. Its other records (result, dead letters) are stored under `seqs`
    /// (empty if there were none), after dropping older frames if they needed the room
    /// (`dropped`).
    FrameDropped {
        seqs: Range<u64>,
        records: u64,
        bytes: u64,
        dropped: Vec<Dropped>,
    },
    /// [`WhenFull::Backpressure`] only: the unit holds frame records and does not fit. Nothing of
    /// it was stored and nothing was dropped: hold the frame un-acked and retry once the spool
    /// drained.
    Refused,
}

/// A whole frame dropped to make room: every one of its frame records (all its chunks) went.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dropped {
    /// Seq of its first frame record (none of them will come out of [`Spool::oldest`] any more).
    pub seq: u64,
    /// Always [`Class::Frame`] today; there to keep the log line and counters honest.
    pub class: Class,
    /// Records it had: its chunks, or 1.
    pub records: u64,
    /// Their [`SpoolRecord::size`]s, summed.
    pub bytes: u64,
    /// When it was spooled: how much history was lost.
    pub created_ms: i64,
}

/// A durable, bounded, ordered buffer of [`SpoolRecord`]s. See the module doc for the rules.
pub trait Spool: Send {
    /// Appends the records of one frame as one unit, all or nothing: its frame record or all its
    /// chunks, its result, its dead letters (or any subset of them, e.g. the ones whose direct
    /// delivery failed). They are stored in order under consecutive seqs (strictly increasing,
    /// never reused, also across restarts). Not durable until [`Spool::flush`].
    ///
    /// The unit's frame records form one *frame*: it is dropped whole or not at all. When stored
    /// bytes plus the unit's exceed `max_bytes`:
    /// - a unit with frame records under [`WhenFull::Backpressure`] is [`Appended::Refused`]:
    ///   nothing stored, nothing dropped;
    /// - under [`WhenFull::DropOldestFrames`] the oldest whole frames are dropped until the unit
    ///   fits (each counted once as `frame/spool-full-oldest`, listed in `dropped`); if its frame
    ///   records cannot fit even with every older frame gone, they are dropped instead (counted
    ///   once as `frame/spool-full-no-room`) and the rest is stored: [`Appended::FrameDropped`];
    /// - a unit without frame records is always stored (even above `max_bytes`), under
    ///   `DropOldestFrames` after dropping the oldest frames to make room.
    ///
    /// # Errors
    /// Nothing of the unit stays after an error (what it wrote is rolled back; drops made for it
    /// stay made and counted, so a retry finds the room). [`SpoolError::DiskFull`] when the file
    /// system lacks the room (checked before anything is written; see
    /// [`SpoolError::is_disk_full`]); [`SpoolError::Io`] / [`SpoolError::Sled`] when a write
    /// fails; [`SpoolError::TooLarge`].
    fn append_frame(&mut self, records: &[SpoolRecord]) -> Result<Appended, SpoolError>;

    /// One record as a unit of its own: [`Spool::append_frame`] of `[rec]`.
    fn append(&mut self, rec: &SpoolRecord) -> Result<Appended, SpoolError> {
        self.append_frame(std::slice::from_ref(rec))
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

    /// The file system holding the spool has too little free space for the unit plus a reserve
    /// that keeps sled working (see the module doc, "A full disk"). Nothing was written. Keep the
    /// frames un-acked and retry later; free disk space, or lower `spool.max_bytes` below what
    /// the disk can hold.
    #[error(
        "spool {dir}: the file system is full: {available} bytes free, the records need about \
         {needed} plus a reserve of {reserve}"
    )]
    DiskFull {
        dir: PathBuf,
        needed: u64,
        available: u64,
        reserve: u64,
    },

    /// sled refuses to open the folder: its own files are damaged. [`SledSpool::open`] handles
    /// this itself (moves the folder aside); `verify` reports it. Start the node to move it aside
    /// and start fresh, or inspect the files.
    #[error("spool {dir} cannot be opened, its files are damaged: {detail}")]
    Damaged { dir: PathBuf, detail: String },
}

impl SpoolError {
    /// The disk (or a quota) is full: [`SpoolError::DiskFull`], or an I/O error ENOSPC / EDQUOT
    /// (`StorageFull`, `QuotaExceeded`), also when sled wraps it. Treat it as backpressure: keep
    /// the frames un-acked at the MQTT broker and retry.
    pub fn is_disk_full(&self) -> bool {
        match self {
            SpoolError::DiskFull { .. } => true,
            SpoolError::Io { source, .. } => io_is_disk_full(source),
            SpoolError::Sled {
                source: sled::Error::Io(source),
                ..
            } => io_is_disk_full(source),
            _ => false,
        }
    }

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

/// ENOSPC or EDQUOT, by kind (sled 0.34 rewraps its I/O errors as `Custom { kind: StorageFull,
/// error: "Os { code: 28, .. }" }`, keeping only the kind), by OS code, or wrapped in another
/// `io::Error`.
fn io_is_disk_full(e: &std::io::Error) -> bool {
    use std::io::ErrorKind;
    const ENOSPC: i32 = 28;
    const EDQUOT: i32 = 122;
    matches!(e.kind(), ErrorKind::StorageFull | ErrorKind::QuotaExceeded)
        || matches!(e.raw_os_error(), Some(ENOSPC | EDQUOT))
        || e.get_ref()
            .and_then(|inner| inner.downcast_ref::<std::io::Error>())
            .is_some_and(io_is_disk_full)
}
