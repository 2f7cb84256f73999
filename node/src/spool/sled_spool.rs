//! The sled engine behind [`Spool`]: [`SledSpool`], plus the offline tools [`verify`] and
//! [`inject_raw_for_tests`].
//!
//! Five trees in one sled database (the module doc of [`super`] has the format and the rules):
//! `records` (seq -> record or file stub), `index` (seq -> class, size, created_ms: counters,
//! drops and removals never need to read or decode a record, and the oldest age is one small
//! read), `frames` (seq -> size, frames only: the oldest frame without walking past results),
//! `meta` and `quarantine`; and record files for large records (module `large`). Writes go to
//! the trees one after the other (not in a sled transaction, which would copy every value once
//! more); [`SledSpool::open`] repairs `index` and `frames` from `records` after a crash between
//! two of them.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::path::Path;
use std::time::Instant;

use super::large::{LARGE_BYTES, LargeFiles};
use super::record::{self, Class, FileStub, FormatError, SpoolRecord, Stored, key_seq, seq_key};
use super::report::{CorruptRecord, OpenReport, SpoolStats, VerifyReport, now_ms};
use super::store::{
    self, Entry, NEXT_SEQ, OpenFailure, SEQ_FILE, SEQ_FILE_INTERVAL, Survey, Trees,
};
use super::{Appended, Dropped, Spool, SpoolError, SpoolOptions, WhenFull};

/// Reason of an old frame dropped to make room for a new record.
pub const REASON_OLDEST: &str = "spool-full-oldest";
/// Reason of a new frame dropped because it cannot fit even without older frames.
pub const REASON_NO_ROOM: &str = "spool-full-no-room";

/// A durable spool in one folder, on sled. See [`super`] for the rules.
pub struct SledSpool {
    t: Trees,
    /// Files of records over [`LARGE_BYTES`].
    large: LargeFiles,
    /// Folder, bound and policy.
    opts: SpoolOptions,
    /// The next seq to hand out; also stored in `meta` before it is used.
    next_seq: u64,
    /// Records per class ([`Class::index`] order), kept in step with `index`.
    records: [u64; 3],
    /// Record bytes per class.
    bytes: [u64; 3],
    /// Drop counters, as stored in `meta`.
    dropped: BTreeMap<(String, String), u64>,
    /// Entries in the `quarantine` tree.
    quarantined: u64,
    /// The next seq last written to [`SEQ_FILE`], and when.
    seq_file: (u64, Instant),
}

impl SledSpool {
    /// Opens (creating) the spool in `opts.dir`.
    ///
    /// Scans every record once: verifies checksums, rebuilds the counters, quarantines corrupt
    /// records, repairs the indexes and deletes orphaned record files. If sled refuses to open
    /// the folder (damaged files) or lost records, it is renamed to `<dir>.corrupt-<unix-ms>`
    /// (logged at error, reported in [`OpenReport::moved_aside`]) and a fresh spool is created,
    /// so the node starts.
    ///
    /// # Errors
    /// [`SpoolError::Locked`] when another process holds the folder; [`SpoolError::Io`] /
    /// [`SpoolError::Sled`] when the disk fails (permissions, full disk); [`SpoolError::Damaged`]
    /// when even a fresh spool cannot be opened.
    pub fn open(opts: SpoolOptions) -> Result<(SledSpool, OpenReport), SpoolError> {
        let dir = store::clean_path(&opts.dir);
        let mkdir = |dir: &Path| {
            fs::create_dir_all(dir)
                .map_err(|e| SpoolError::io(format!("creating folder {}", dir.display()), e))
        };
        mkdir(&dir)?;
        let floor = store::read_seq_file(&dir);
        let opened = store::open_and_survey(&dir).and_then(|(t, survey)| {
            let next = store::stored_next_seq(&t, &survey)
                .map_err(|e| OpenFailure::from_sled(e, "reading next_seq"))?;
            match floor {
                Some(f) if f > next => Err(OpenFailure::Damaged(format!(
                    "sled lost flushed records: its records and counters end before seq {next}, \
                     but seqs up to {} had been handed out ({SEQ_FILE})",
                    f - 1
                ))),
                _ => Ok((t, survey, next)),
            }
        });
        let (trees, survey, next, moved_aside) = match opened {
            Ok((t, survey, next)) => (t, survey, next, None),
            Err(OpenFailure::Damaged(detail)) => {
                let aside = store::aside_path(&dir, now_ms());
                log::error!(
                    "spool {}: {detail}; moving it aside to {} and starting an empty spool \
                     (records in it are not sent; inspect or delete it)",
                    dir.display(),
                    aside.display()
                );
                fs::rename(&dir, &aside).map_err(|e| {
                    let what = format!("moving {} aside to {}", dir.display(), aside.display());
                    SpoolError::io(what, e)
                })?;
                mkdir(&dir)?;
                let (t, survey) = store::open_and_survey(&dir).map_err(|f| f.into_error(&dir))?;
                let next = store::stored_next_seq(&t, &survey)
                    .map_err(|e| SpoolError::sled("reading next_seq", e))?;
                (t, survey, next, Some(aside))
            }
            Err(other) => return Err(other.into_error(&dir)),
        };
        // Seqs go on after every seq handed out, also across a damaged spool moved aside.
        let next_seq = next.max(floor.unwrap_or(0));
        let dropped =
            store::read_drops(&trees.meta).map_err(|e| SpoolError::sled("reading drops", e))?;
        let large = LargeFiles::new(&dir).map_err(|e| {
            SpoolError::io(format!("creating record files in {}", dir.display()), e)
        })?;
        let mut spool = SledSpool {
            t: trees,
            large,
            opts: SpoolOptions { dir, ..opts },
            next_seq,
            records: survey.records,
            bytes: survey.bytes,
            dropped,
            quarantined: 0,
            seq_file: (floor.unwrap_or(0), Instant::now()),
        };
        let index_repaired = spool.repair(&survey)?;
        let quarantined_now = survey.corrupt.len() as u64;
        for c in &survey.corrupt {
            spool.quarantine(&c.key, &c.value, &c.reason, "found when opening the spool")?;
        }
        spool.quarantined = spool.t.quarantine.len() as u64;
        spool
            .t
            .meta
            .insert(NEXT_SEQ, &next_seq.to_be_bytes())
            .map_err(|e| SpoolError::sled("storing next_seq", e))?;
        // The scan's repairs and quarantines are made durable now, not at the first append;
        // then the seq file, which must never be ahead of what sled holds durably.
        spool.flush()?;
        spool.update_seq_file()?;
        for path in &survey.orphan_files {
            log::info!(
                "spool {}: deleting {} (its record was removed, or never flushed)",
                spool.opts.dir.display(),
                path.display()
            );
            if let Err(e) = fs::remove_file(path) {
                log::warn!("spool: cannot delete {}: {e}", path.display());
            }
        }
        let report = OpenReport {
            records: spool.total_records(),
            bytes: spool.total_bytes(),
            quarantined: quarantined_now,
            index_repaired,
            orphan_files: survey.orphan_files.len() as u64,
            moved_aside,
        };
        Ok((spool, report))
    }

    /// The spool's folder.
    pub fn dir(&self) -> &Path {
        &self.opts.dir
    }

    /// Bytes the spool takes on disk: sled's files and the record files (more than the record
    /// bytes: see the module doc).
    pub fn disk_bytes(&self) -> Result<u64, SpoolError> {
        let sled = self
            .t
            .db
            .size_on_disk()
            .map_err(|e| SpoolError::sled("measuring size on disk", e))?;
        Ok(sled + self.large.disk_bytes())
    }

    /// Brings [`SEQ_FILE`] up to `next_seq`. Call only right after a successful flush: the
    /// file must never be ahead of what sled holds durably.
    fn update_seq_file(&mut self) -> Result<(), SpoolError> {
        store::write_seq_file(&self.opts.dir, self.next_seq)?;
        self.seq_file = (self.next_seq, Instant::now());
        Ok(())
    }

    fn total_records(&self) -> u64 {
        self.records.iter().sum()
    }

    fn total_bytes(&self) -> u64 {
        self.bytes.iter().sum()
    }

    fn count_in(&mut self, e: Entry) {
        self.records[e.class.index()] += 1;
        self.bytes[e.class.index()] += e.size;
    }

    fn count_out(&mut self, e: Entry) {
        let i = e.class.index();
        self.records[i] = self.records[i].saturating_sub(1);
        self.bytes[i] = self.bytes[i].saturating_sub(e.size);
    }

    /// Brings `index` and `frames` in line with the intact records the survey found.
    fn repair(&mut self, s: &Survey) -> Result<u64, SpoolError> {
        let err = |e| SpoolError::sled("repairing the index", e);
        for seq in &s.index_stale {
            self.t.index.remove(seq_key(*seq)).map_err(err)?;
        }
        for (seq, entry) in &s.index_missing {
            self.t
                .index
                .insert(seq_key(*seq), &entry.encode())
                .map_err(err)?;
        }
        for seq in &s.frames_stale {
            self.t.frames.remove(seq_key(*seq)).map_err(err)?;
        }
        for (seq, size) in &s.frames_missing {
            self.t
                .frames
                .insert(seq_key(*seq), &size.to_be_bytes())
                .map_err(err)?;
        }
        let n = s.index_mismatches();
        if n > 0 {
            log::warn!(
                "spool {}: repaired {n} index entries (a crash between two writes)",
                self.opts.dir.display()
            );
        }
        Ok(n)
    }

    /// Removes record `seq` from every tree (its file, if any, after the next flush) and
    /// returns its index entry.
    fn forget(&mut self, seq: u64, context: &str) -> Result<Option<Entry>, SpoolError> {
        let err = |e| SpoolError::sled(context, e);
        let key = seq_key(seq);
        let entry = self.t.index.remove(key).map_err(err)?;
        let entry = entry.as_deref().and_then(Entry::decode);
        if entry.is_none_or(|e| e.class == Class::Frame) {
            self.t.frames.remove(key).map_err(err)?;
        }
        let old = self.t.records.remove(key).map_err(err)?;
        if let Some(v) = &old
            && matches!(record::stored(v), Ok(Stored::File(_)))
        {
            self.large.delete_later(seq);
        }
        let entry = match (entry, old) {
            (Some(e), _) => Some(e),
            // Not indexed (cannot happen after open's repair): count what it was.
            (None, Some(v)) => store::load(&self.opts.dir, seq, &v)
                .ok()
                .map(|r| Entry::of(&r)),
            (None, None) => None, // unknown seq: already removed, dropped or quarantined
        };
        if let Some(e) = entry {
            self.count_out(e);
        }
        Ok(entry)
    }

    /// Moves a record's raw bytes to `quarantine` and forgets it everywhere else. A record
    /// file is kept beside the others as `<seq>.quarantined`.
    fn quarantine(
        &mut self,
        key: &[u8],
        raw: &[u8],
        reason: &FormatError,
        when: &str,
    ) -> Result<(), SpoolError> {
        let context = "quarantining a corrupt record";
        let err = |e| SpoolError::sled(context, e);
        let shown = key_seq(key).map_or_else(
            |_| format!("under key {}", hex::encode(key)),
            |s| s.to_string(),
        );
        log::error!(
            "spool {}: record {shown} ({} bytes) is corrupt: {reason}; moved to quarantine \
             ({when})",
            self.opts.dir.display(),
            raw.len()
        );
        self.t.quarantine.insert(key, raw).map_err(err)?;
        match key_seq(key) {
            Ok(seq) => {
                if matches!(record::stored(raw), Ok(Stored::File(_))) {
                    self.large.quarantine(seq).map_err(|e| {
                        SpoolError::io(format!("keeping the file of quarantined record {seq}"), e)
                    })?;
                }
                self.forget(seq, context)?;
            }
            Err(_) => {
                self.t.records.remove(key).map_err(err)?;
            }
        }
        self.quarantined += 1;
        Ok(())
    }

    /// Adds one to a drop counter and stores it (durable at the next flush).
    fn count_drop(&mut self, class: Class, reason: &str) -> Result<(), SpoolError> {
        let n = self
            .dropped
            .entry((class.name().to_string(), reason.to_string()))
            .or_insert(0);
        *n += 1;
        let key = format!("{}{}/{reason}", store::DROP_PREFIX, class.name());
        self.t
            .meta
            .insert(key.as_bytes(), &n.to_be_bytes())
            .map_err(|e| SpoolError::sled("storing a drop counter", e))?;
        Ok(())
    }

    /// Drops the oldest frames until `need` bytes are freed or no frame is left.
    fn drop_oldest_frames(
        &mut self,
        need: u64,
        for_class: Class,
    ) -> Result<Vec<Dropped>, SpoolError> {
        let context = "dropping the oldest frames";
        let mut victims = Vec::new();
        let mut freed = 0u64;
        for item in self.t.frames.iter() {
            if freed >= need {
                break;
            }
            let (k, v) = item.map_err(|e| SpoolError::sled(context, e))?;
            let Ok(seq) = key_seq(&k) else { continue };
            freed += v.as_ref().try_into().map(u64::from_be_bytes).unwrap_or(0);
            victims.push(seq);
        }
        let mut dropped = Vec::with_capacity(victims.len());
        for seq in victims {
            // Counter first: after a crash the drop is either undone or counted.
            self.count_drop(Class::Frame, REASON_OLDEST)?;
            let entry = self.forget(seq, context)?;
            dropped.push(Dropped {
                seq,
                class: Class::Frame,
                bytes: entry.map_or(0, |e| e.size),
                created_ms: entry.map_or(0, |e| e.created_ms),
            });
        }
        if let (Some(first), Some(last)) = (dropped.first(), dropped.last()) {
            let bytes: u64 = dropped.iter().map(|d| d.bytes).sum();
            log::warn!(
                "spool {} is full ({} of {} bytes): dropped the {} oldest frames ({bytes} bytes, \
                 seq {}..={}) to make room for a {for_class}",
                self.opts.dir.display(),
                self.total_bytes() + bytes,
                self.opts.max_bytes,
                dropped.len(),
                first.seq,
                last.seq,
            );
        }
        Ok(dropped)
    }
}

impl Spool for SledSpool {
    fn append(&mut self, rec: &SpoolRecord) -> Result<Appended, SpoolError> {
        let entry = Entry::of(rec);
        let encoded = record::encode(rec).map_err(|e| SpoolError::TooLarge {
            bytes: entry.size,
            detail: e.to_string(),
        })?;
        let max = self.opts.max_bytes;
        let total = self.total_bytes();
        let mut dropped = Vec::new();
        if total.saturating_add(entry.size) > max {
            let need = total.saturating_add(entry.size) - max;
            match (rec.class, self.opts.when_full) {
                (Class::Frame, WhenFull::Backpressure) => return Ok(Appended::Refused),
                (Class::Frame, WhenFull::DropOldestFrames) => {
                    let frames = self.bytes[Class::Frame.index()];
                    if need > frames {
                        // Even every older frame gone would not make room: keep them.
                        self.count_drop(Class::Frame, REASON_NO_ROOM)?;
                        log::warn!(
                            "spool {}: a frame of {} bytes does not fit ({total} of {max} bytes \
                             used, {frames} by frames); dropped it",
                            self.opts.dir.display(),
                            entry.size
                        );
                        return Ok(Appended::Refused);
                    }
                    dropped = self.drop_oldest_frames(need, rec.class)?;
                }
                (_, WhenFull::DropOldestFrames) => {
                    dropped = self.drop_oldest_frames(need, rec.class)?;
                }
                (_, WhenFull::Backpressure) => {}
            }
        }

        let err = |e| SpoolError::sled("appending a record", e);
        let seq = self.next_seq;
        let key = seq_key(seq);
        // The seq is used up before anything is written under it: never reused, even after an
        // error half-way.
        self.next_seq = seq + 1;
        self.t
            .meta
            .insert(NEXT_SEQ, &self.next_seq.to_be_bytes())
            .map_err(err)?;
        if encoded.len() > LARGE_BYTES {
            self.large.write(seq, &encoded).map_err(|e| {
                SpoolError::io(format!("writing {}", self.large.path(seq).display()), e)
            })?;
            let stub = FileStub::of(&encoded).encode();
            self.t.records.insert(key, &stub).map_err(err)?;
        } else {
            self.t.records.insert(key, encoded).map_err(err)?;
        }
        self.t.index.insert(key, &entry.encode()).map_err(err)?;
        if rec.class == Class::Frame {
            self.t
                .frames
                .insert(key, &entry.size.to_be_bytes())
                .map_err(err)?;
        }
        self.count_in(entry);
        Ok(Appended::Stored { seq, dropped })
    }

    fn flush(&mut self) -> Result<(), SpoolError> {
        // Record files first: a durable stub must never point at a file that is not.
        self.large.sync().map_err(|e| {
            SpoolError::io(
                format!("syncing record files in {}", self.opts.dir.display()),
                e,
            )
        })?;
        self.t
            .db
            .flush()
            .map_err(|e| SpoolError::sled("flushing", e))?;
        // Removals are durable now: their files can go.
        self.large.delete_doomed();
        // Two more fsyncs: at most once per SEQ_FILE_INTERVAL.
        if self.seq_file.0 < self.next_seq && self.seq_file.1.elapsed() >= SEQ_FILE_INTERVAL {
            self.update_seq_file()?;
        }
        Ok(())
    }

    fn oldest(
        &mut self,
        after: Option<u64>,
        max: usize,
    ) -> Result<Vec<(u64, SpoolRecord)>, SpoolError> {
        let start = match after {
            None => 0,
            Some(a) => match a.checked_add(1) {
                Some(s) => s,
                None => return Ok(Vec::new()),
            },
        };
        let mut out = Vec::new();
        let mut bad = Vec::new();
        if max > 0 {
            for item in self.t.records.range(seq_key(start)..) {
                let (k, v) = item.map_err(|e| SpoolError::sled("reading records", e))?;
                let loaded =
                    key_seq(&k).and_then(|seq| Ok((seq, store::load(&self.opts.dir, seq, &v)?)));
                match loaded {
                    Ok(found) => out.push(found),
                    Err(reason) => bad.push((k, v, reason)),
                }
                if out.len() >= max {
                    break;
                }
            }
        }
        for (k, v, reason) in bad {
            self.quarantine(&k, &v, &reason, "found while draining")?;
        }
        Ok(out)
    }

    fn remove(&mut self, seqs: &[u64]) -> Result<(), SpoolError> {
        for &seq in seqs {
            self.forget(seq, "removing records")?;
        }
        // Large records give their disk space back now rather than at the next append.
        if self.large.has_doomed() {
            self.flush()?;
        }
        Ok(())
    }

    fn has_room(&self, class: Class, bytes: u64) -> bool {
        if self.total_bytes().saturating_add(bytes) <= self.opts.max_bytes {
            return true;
        }
        // Above the bound only results and dead letters under backpressure are stored as is.
        class != Class::Frame && self.opts.when_full == WhenFull::Backpressure
    }

    fn is_empty(&self) -> bool {
        self.total_records() == 0
    }

    fn stats(&self) -> SpoolStats {
        let oldest_created_ms = match self.t.index.first() {
            Ok(first) => first
                .and_then(|(_, v)| Entry::decode(&v))
                .map(|e| e.created_ms),
            Err(e) => {
                log::warn!(
                    "spool {}: reading the oldest record: {e}",
                    self.opts.dir.display()
                );
                None
            }
        };
        SpoolStats {
            records: per_class(&self.records),
            bytes: per_class(&self.bytes),
            total_records: self.total_records(),
            total_bytes: self.total_bytes(),
            max_bytes: self.opts.max_bytes,
            oldest_created_ms,
            dropped: self.dropped.clone(),
            quarantined: self.quarantined,
        }
    }
}

impl Drop for SledSpool {
    /// A clean close: flush (record files, sled, deletions), and bring the seq file up to date.
    fn drop(&mut self) {
        let closed = self.flush().and_then(|()| self.update_seq_file());
        if let Err(e) = closed {
            log::warn!("spool {}: closing: {e}", self.opts.dir.display());
        }
    }
}

fn per_class(a: &[u64; 3]) -> HashMap<Class, u64> {
    Class::ALL.iter().map(|&c| (c, a[c.index()])).collect()
}

/// Read-only check for `fovea spool verify DIR`: every record's checksum and decode (record
/// files included), the indexes and the seq file, without changing any record, counter, file
/// or quarantine entry. (Opening the database lets sled run its own crash recovery, as the node
/// would.)
///
/// # Errors
/// [`SpoolError::NotFound`] when there is no spool in `dir`; [`SpoolError::Locked`] when a node
/// holds it (stop the node first: sled allows one process at a time); [`SpoolError::Damaged`]
/// when sled cannot open it at all.
pub fn verify(dir: &Path) -> Result<VerifyReport, SpoolError> {
    let dir = store::clean_path(dir);
    let (t, survey) =
        store::open_and_survey(&store::existing_spool(&dir)?).map_err(|f| f.into_error(&dir))?;
    let next_seq =
        store::stored_next_seq(&t, &survey).map_err(|e| SpoolError::sled("reading next_seq", e))?;
    Ok(VerifyReport {
        records: per_class(&survey.records),
        bytes: per_class(&survey.bytes),
        corrupt: survey
            .corrupt
            .iter()
            .map(|c| CorruptRecord {
                seq: key_seq(&c.key).ok(),
                reason: match key_seq(&c.key) {
                    Ok(_) => c.reason.to_string(),
                    Err(_) => format!("key {}: {}", hex::encode(&c.key), c.reason),
                },
            })
            .collect(),
        quarantined: t.quarantine.len() as u64,
        index_mismatches: survey.index_mismatches(),
        orphan_files: survey.orphan_files.len() as u64,
        next_seq,
        seq_floor: store::read_seq_file(&dir),
        dropped: store::read_drops(&t.meta).map_err(|e| SpoolError::sled("reading drops", e))?,
        dir,
    })
}

/// Test aid (the end-to-end test of a corrupt spool): stores `value` as-is under the next seq
/// in `records`, bypassing the record format, and flushes. The spool must not be open
/// elsewhere.
///
/// # Errors
/// As [`verify`].
pub fn inject_raw_for_tests(dir: &Path, value: &[u8]) -> Result<u64, SpoolError> {
    let dir = store::clean_path(dir);
    let t = store::open_db(&store::existing_spool(&dir)?).map_err(|f| f.into_error(&dir))?;
    let err = |e| SpoolError::sled("injecting a raw record", e);
    let past_last = |tree: &sled::Tree| -> Result<u64, SpoolError> {
        let last = tree.last().map_err(err)?;
        Ok(last
            .and_then(|(k, _)| key_seq(&k).ok())
            .map_or(0, |s| s.saturating_add(1)))
    };
    let seq = store::read_u64(&t.meta, NEXT_SEQ)
        .map_err(err)?
        .unwrap_or(0)
        .max(past_last(&t.records)?)
        .max(past_last(&t.index)?)
        .max(past_last(&t.quarantine)?);
    t.meta
        .insert(NEXT_SEQ, &(seq + 1).to_be_bytes())
        .map_err(err)?;
    t.records.insert(seq_key(seq), value).map_err(err)?;
    t.db.flush().map_err(err)?;
    Ok(seq)
}

impl SledSpool {
    /// The raw `records` tree, for tests that damage a record while the spool is open.
    #[cfg(test)]
    pub(super) fn records_tree(&self) -> &sled::Tree {
        &self.t.records
    }
}
