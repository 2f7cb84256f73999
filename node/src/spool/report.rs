//! What the spool reports: [`SpoolStats`] (`fovea spool stats`, metrics), [`OpenReport`] (logged
//! at start-up) and [`VerifyReport`] (`fovea spool verify`). Their `Display` is what the commands
//! print: one fact per line.

use std::collections::{BTreeMap, HashMap};
use std::fmt;
use std::path::PathBuf;

use super::Class;

/// Counters of a spool.
#[derive(Debug, Clone, PartialEq)]
pub struct SpoolStats {
    /// Records stored, per class (every class present, zero or not).
    pub records: HashMap<Class, u64>,
    /// Record bytes ([`super::SpoolRecord::size`]) stored, per class.
    pub bytes: HashMap<Class, u64>,
    /// Sum of `records`.
    pub total_records: u64,
    /// Sum of `bytes`: what counts against `max_bytes`.
    pub total_bytes: u64,
    /// The configured bound.
    pub max_bytes: u64,
    /// `created_ms` of the oldest stored record: how long the broker has been behind.
    pub oldest_created_ms: Option<i64>,
    /// Records dropped, by (class, reason), since the spool was created (persisted).
    pub dropped: BTreeMap<(String, String), u64>,
    /// Records in the quarantine (corrupt, kept as raw bytes), since the spool was created.
    pub quarantined: u64,
}

impl fmt::Display for SpoolStats {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let get = |m: &HashMap<Class, u64>, c: Class| m.get(&c).copied().unwrap_or(0);
        write!(f, "records: {}", self.total_records)?;
        write_per_class(f, |c| get(&self.records, c).to_string())?;
        write!(
            f,
            "\nbytes: {} of {} max",
            human_bytes(self.total_bytes),
            human_bytes(self.max_bytes)
        )?;
        write_per_class(f, |c| human_bytes(get(&self.bytes, c)))?;
        match self.oldest_created_ms {
            Some(ms) => write!(f, "\noldest: {}", age(ms, now_ms()))?,
            None => write!(f, "\noldest: none (empty)")?,
        }
        if self.dropped.is_empty() {
            write!(f, "\ndropped: none")?;
        }
        for ((class, reason), n) in &self.dropped {
            write!(f, "\ndropped {class}/{reason}: {n}")?;
        }
        write!(f, "\nquarantined: {}", self.quarantined)
    }
}

/// What [`super::SledSpool::open`] found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenReport {
    /// Records found (after quarantining).
    pub records: u64,
    /// Their bytes.
    pub bytes: u64,
    /// Records quarantined by this open (corrupt).
    pub quarantined: u64,
    /// Index entries (`index`, `frames`) repaired (a crash between two tree writes).
    pub index_repaired: u64,
    /// Records removed to undo an append or finish a drop that a crash interrupted.
    pub interrupted: u64,
    /// Record files without a record, deleted (a crash before a flush or after a removal).
    pub orphan_files: u64,
    /// Where a spool sled refused to open was moved (a fresh one was created instead).
    pub moved_aside: Option<PathBuf>,
}

impl fmt::Display for OpenReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} records, {}", self.records, human_bytes(self.bytes))?;
        if self.quarantined > 0 {
            write!(f, ", {} corrupt records quarantined", self.quarantined)?;
        }
        if self.index_repaired > 0 {
            write!(f, ", {} frame index entries repaired", self.index_repaired)?;
        }
        if self.interrupted > 0 {
            write!(
                f,
                ", {} records of an interrupted append or drop removed",
                self.interrupted
            )?;
        }
        if self.orphan_files > 0 {
            write!(f, ", {} orphaned record files deleted", self.orphan_files)?;
        }
        if let Some(p) = &self.moved_aside {
            write!(
                f,
                ", the damaged spool was moved aside to {} and a fresh one created",
                p.display()
            )?;
        }
        Ok(())
    }
}

/// A record `verify` found damaged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CorruptRecord {
    /// Its seq (or `None` when even the key is not a seq).
    pub seq: Option<u64>,
    /// What is wrong, e.g. "checksum mismatch (stored ..., computed ...)".
    pub reason: String,
}

/// What [`super::verify`] found. Nothing was changed.
#[derive(Debug, Clone, PartialEq)]
pub struct VerifyReport {
    /// The spool folder.
    pub dir: PathBuf,
    /// Intact records per class (every class present).
    pub records: HashMap<Class, u64>,
    /// Their bytes per class.
    pub bytes: HashMap<Class, u64>,
    /// Damaged records, in seq order: the node will quarantine them when it opens the spool.
    pub corrupt: Vec<CorruptRecord>,
    /// Records quarantined so far.
    pub quarantined: u64,
    /// Frames missing from the `frames` index, or index entries without a frame (the node
    /// repairs them when it opens the spool).
    pub index_mismatches: u64,
    /// Records (and markers) of an append or a drop a crash interrupted: the node removes them
    /// when it opens the spool (they were never acknowledged, or were counted as dropped).
    pub interrupted: u64,
    /// Record files without a record (harmless: the node deletes them when it opens the spool).
    pub orphan_files: u64,
    /// The next seq that will be handed out, according to sled.
    pub next_seq: u64,
    /// The next seq recorded beside sled's files at the last open. Above `next_seq`, sled lost
    /// records (the node moves such a spool aside).
    pub seq_floor: Option<u64>,
    /// Drop counters, as in [`SpoolStats::dropped`].
    pub dropped: BTreeMap<(String, String), u64>,
}

impl VerifyReport {
    /// No damaged record and a consistent index.
    pub fn is_clean(&self) -> bool {
        self.corrupt.is_empty()
            && self.index_mismatches == 0
            && self.interrupted == 0
            && !self.sled_lost_records()
    }

    /// sled's records end before seqs that were handed out: it lost flushed records.
    pub fn sled_lost_records(&self) -> bool {
        self.seq_floor.is_some_and(|f| f > self.next_seq)
    }
}

impl fmt::Display for VerifyReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let get = |m: &HashMap<Class, u64>, c: Class| m.get(&c).copied().unwrap_or(0);
        writeln!(f, "spool: {}", self.dir.display())?;
        write!(f, "records: {}", self.records.values().sum::<u64>())?;
        write_per_class(f, |c| get(&self.records, c).to_string())?;
        write!(f, "\nbytes: {}", human_bytes(self.bytes.values().sum()))?;
        write_per_class(f, |c| human_bytes(get(&self.bytes, c)))?;
        write!(f, "\ncorrupt: {}", self.corrupt.len())?;
        for c in &self.corrupt {
            match c.seq {
                Some(seq) => write!(f, "\ncorrupt seq {seq}: {}", c.reason)?,
                None => write!(f, "\ncorrupt key: {}", c.reason)?,
            }
        }
        write!(f, "\nindex mismatches: {}", self.index_mismatches)?;
        if self.interrupted > 0 {
            write!(
                f,
                "\ninterrupted append or drop: {} (undone or finished on start)",
                self.interrupted
            )?;
        }
        write!(f, "\norphaned record files: {}", self.orphan_files)?;
        write!(f, "\nquarantined so far: {}", self.quarantined)?;
        for ((class, reason), n) in &self.dropped {
            write!(f, "\ndropped {class}/{reason}: {n}")?;
        }
        write!(f, "\nnext seq: {}", self.next_seq)?;
        if let Some(floor) = self.seq_floor
            && self.sled_lost_records()
        {
            write!(
                f,
                "\nsled lost records: seqs up to {} were handed out, its records end before {}",
                floor - 1,
                self.next_seq
            )?;
        }
        write!(
            f,
            "\nverdict: {}",
            if self.is_clean() {
                "ok"
            } else {
                "damaged (on start the node quarantines corrupt records, repairs the index, and \
                 moves a spool sled lost records from aside)"
            }
        )
    }
}

/// ` (frame X, result Y, dead-letter Z)`.
fn write_per_class(f: &mut fmt::Formatter<'_>, value: impl Fn(Class) -> String) -> fmt::Result {
    let parts: Vec<String> = Class::ALL
        .iter()
        .map(|&c| format!("{} {}", c.name(), value(c)))
        .collect();
    write!(f, " ({})", parts.join(", "))
}

/// `512 B`, `6.1 KiB`, `1.0 GiB`.
pub(crate) fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 5] = ["KiB", "MiB", "GiB", "TiB", "PiB"];
    if n < 1024 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1024.0;
    let mut unit = 0;
    while v >= 1024.0 && unit + 1 < UNITS.len() {
        v /= 1024.0;
        unit += 1;
    }
    format!("{v:.1} {}", UNITS[unit])
}

/// `3.2 s ago`, `12.5 min ago`, `3.1 h ago`.
pub(crate) fn age(created_ms: i64, now_ms: i64) -> String {
    let ms = now_ms.saturating_sub(created_ms);
    if ms < 0 {
        return "in the future (has the clock been set back?)".to_string();
    }
    let s = ms as f64 / 1000.0;
    if s < 60.0 {
        format!("{s:.1} s ago")
    } else if s < 3600.0 {
        format!("{:.1} min ago", s / 60.0)
    } else {
        format!("{:.1} h ago", s / 3600.0)
    }
}

/// Wall clock, Unix ms.
pub(crate) fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}
