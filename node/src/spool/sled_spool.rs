//! The sled engine behind [`Spool`]: [`SledSpool`], plus the offline tools [`verify`] and
//! [`inject_raw_for_tests`].
//!
//! Five trees in one sled database (the module doc of [`super`] has the format and the rules):
//! `records` (seq -> record or file stub), `index` (seq -> class, size, created_ms: counters,
//! drops and removals never need to read or decode a record, and the oldest age is one small
//! read), `frames` (first seq of a whole frame -> its bytes and last seq: the oldest frame
//! without walking past results), `meta` and `quarantine`; and record files for large records
//! (module `large`). Writes go to the trees one after the other (not in a sled transaction,
//! which would copy every value once more); a marker in `meta` spans each append of a unit and
//! each drop of a frame, and [`SledSpool::open`] undoes an interrupted append, finishes an
//! interrupted drop, and repairs `index` and `frames` from `records` after a crash between two
//! writes.

use std::collections::{BTreeMap, HashMap};
use std::fs;
use std::ops::Range;
use std::path::Path;
use std::time::Instant;

use super::large::{LARGE_BYTES, LargeFiles};
use super::record::{
    self, Class, FileStub, FormatError, FramePart, HEADER_LEN, SpoolRecord, Stored, key_seq,
    seq_key,
};
use super::report::{CorruptRecord, OpenReport, SpoolStats, VerifyReport, now_ms};
use super::store::{
    self, DROP_OPEN, Entry, FrameEntry, NEXT_SEQ, OpenFailure, SEQ_FILE, SEQ_FILE_INTERVAL, Survey,
    Trees, UNIT_OPEN,
};
use super::{Appended, Dropped, Spool, SpoolError, SpoolOptions, WhenFull};

/// Reason of an old frame dropped to make room for a new record.
pub const REASON_OLDEST: &str = "spool-full-oldest";
/// Reason of a new frame dropped because it cannot fit even without older frames.
pub const REASON_NO_ROOM: &str = "spool-full-no-room";

/// Free space an append must leave on the spool's file system. sled 0.34 must never meet a
/// full disk (module doc, "A full disk"): it writes its log in 512 KiB segments, rewrites pages,
/// and needs room to open; 4 MiB kept free covered every fill-and-drain cycle measured on small
/// tmpfs file systems (`spool::tests::a_full_file_system_*`).
pub const DISK_RESERVE_BYTES: u64 = 4 << 20;

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
    /// Record bytes of the whole frames in `frames`: what drops can free.
    droppable: u64,
    /// The seqs of a unit whose append failed and whose rollback failed too: rolled back before
    /// anything else is done (its [`UNIT_OPEN`] marker stays, so a restart would too).
    unfinished: Option<Range<u64>>,
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
            droppable: survey.droppable,
            unfinished: None,
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
            interrupted: survey.interrupted.len() as u64,
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

    /// Undoes what the survey found of interrupted appends and drops, then brings `index` and
    /// `frames` in line with the intact records it found.
    fn repair(&mut self, s: &Survey) -> Result<u64, SpoolError> {
        let err = |e| SpoolError::sled("repairing the index", e);
        for &seq in &s.interrupted {
            let old = self.t.records.remove(seq_key(seq)).map_err(err)?;
            if old.is_some_and(|v| matches!(record::stored(&v), Ok(Stored::File(_)))) {
                self.large.delete_later(seq);
            }
        }
        for key in &s.markers {
            self.t.meta.remove(key).map_err(err)?;
        }
        if !s.interrupted.is_empty() || !s.markers.is_empty() {
            log::warn!(
                "spool {}: removed {} record(s) of an append or a drop a crash interrupted \
                 (never acknowledged, or already counted as dropped)",
                self.opts.dir.display(),
                s.interrupted.len()
            );
        }
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
        for (seq, frame) in &s.frames_missing {
            self.t
                .frames
                .insert(seq_key(*seq), &frame.encode())
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
    /// returns its index entry. A frame record takes its frame out of `frames`: a frame part of
    /// which was delivered (or quarantined) is never dropped, it drains.
    fn forget(&mut self, seq: u64, context: &str) -> Result<Option<Entry>, SpoolError> {
        let err = |e| SpoolError::sled(context, e);
        let key = seq_key(seq);
        let entry = self.t.index.get(key).map_err(err)?;
        if entry
            .as_deref()
            .and_then(Entry::decode)
            .is_none_or(|e| e.class == Class::Frame)
        {
            self.undroppable(seq, context)?;
        }
        self.forget_record(seq, context)
    }

    /// Takes the frame holding frame record `seq` (if it is in `frames`) out of `frames`.
    fn undroppable(&mut self, seq: u64, context: &str) -> Result<(), SpoolError> {
        let err = |e| SpoolError::sled(context, e);
        let Some((k, v)) = self
            .t
            .frames
            .range(..=seq_key(seq))
            .next_back()
            .transpose()
            .map_err(err)?
        else {
            return Ok(());
        };
        let Ok(first) = key_seq(&k) else {
            return Ok(());
        };
        match FrameEntry::decode(first, &v) {
            Some(f) if f.last < seq => {}
            found => {
                self.t.frames.remove(&k).map_err(err)?;
                self.droppable = self.droppable.saturating_sub(found.map_or(0, |f| f.bytes));
            }
        }
        Ok(())
    }

    /// [`SledSpool::forget`] without looking at `frames`.
    fn forget_record(&mut self, seq: u64, context: &str) -> Result<Option<Entry>, SpoolError> {
        let err = |e| SpoolError::sled(context, e);
        let key = seq_key(seq);
        let entry = self.t.index.remove(key).map_err(err)?;
        let entry = entry.as_deref().and_then(Entry::decode);
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

    /// The oldest whole frames whose bytes add up to `need` (or all of them): (first seq,
    /// entry). Reads only.
    fn oldest_frames(&self, need: u64) -> Result<Vec<(u64, FrameEntry)>, SpoolError> {
        let mut victims = Vec::new();
        let mut freed = 0u64;
        for item in self.t.frames.iter() {
            if freed >= need {
                break;
            }
            let (k, v) = item.map_err(|e| SpoolError::sled("finding the oldest frames", e))?;
            let Ok(first) = key_seq(&k) else { continue };
            let Some(frame) = FrameEntry::decode(first, &v) else {
                continue;
            };
            freed += frame.bytes;
            victims.push((first, frame));
        }
        Ok(victims)
    }

    /// Drops whole frames (every frame record in their seq range), each counted once.
    fn drop_frames(
        &mut self,
        victims: &[(u64, FrameEntry)],
        for_what: &str,
    ) -> Result<Vec<Dropped>, SpoolError> {
        let context = "dropping the oldest frames";
        let err = |e| SpoolError::sled(context, e);
        let mut dropped = Vec::with_capacity(victims.len());
        for &(first, frame) in victims {
            let range = first..frame.last.saturating_add(1);
            // Counter first: after a crash the drop is either undone or counted. The marker
            // makes the next open finish a drop a crash interrupted, so no part of it drains.
            self.count_drop(Class::Frame, REASON_OLDEST)?;
            self.t
                .meta
                .insert(DROP_OPEN, &store::encode_range(&range))
                .map_err(err)?;
            self.t.frames.remove(seq_key(first)).map_err(err)?;
            self.droppable = self.droppable.saturating_sub(frame.bytes);
            let mut members = Vec::new();
            for item in self.t.index.range(seq_key(range.start)..seq_key(range.end)) {
                let (k, v) = item.map_err(err)?;
                if let (Ok(seq), Some(e)) = (key_seq(&k), Entry::decode(&v))
                    && e.class == Class::Frame
                {
                    members.push(seq);
                }
            }
            let mut d = Dropped {
                seq: first,
                class: Class::Frame,
                records: 0,
                bytes: 0,
                created_ms: 0,
            };
            for seq in members {
                if let Some(e) = self.forget_record(seq, context)? {
                    if d.records == 0 {
                        d.created_ms = e.created_ms;
                    }
                    d.records += 1;
                    d.bytes += e.size;
                }
            }
            self.t.meta.remove(DROP_OPEN).map_err(err)?;
            dropped.push(d);
        }
        if let (Some(first), Some(last)) = (dropped.first(), dropped.last()) {
            let bytes: u64 = dropped.iter().map(|d| d.bytes).sum();
            let records: u64 = dropped.iter().map(|d| d.records).sum();
            log::warn!(
                "spool {} is full ({} of {} bytes): dropped the {} oldest frames ({records} \
                 records, {bytes} bytes, seq {}..{}) to make room for {for_what}",
                self.opts.dir.display(),
                self.total_bytes() + bytes,
                self.opts.max_bytes,
                dropped.len(),
                first.seq,
                last.seq + last.records,
            );
        }
        Ok(dropped)
    }

    /// Fails with [`SpoolError::DiskFull`] unless the file system has room for `recs` plus
    /// [`DISK_RESERVE_BYTES`]. A file system that cannot be asked is not refused.
    fn check_disk(&self, recs: &[&SpoolRecord]) -> Result<(), SpoolError> {
        if recs.is_empty() {
            return Ok(());
        }
        let needed: u64 = recs.iter().map(|r| disk_estimate(r)).sum();
        match fs2::available_space(&self.opts.dir) {
            Ok(available) if available < needed.saturating_add(DISK_RESERVE_BYTES) => {
                Err(SpoolError::DiskFull {
                    dir: self.opts.dir.clone(),
                    needed,
                    available,
                    reserve: DISK_RESERVE_BYTES,
                })
            }
            Ok(_) => Ok(()),
            Err(e) => {
                log::debug!(
                    "spool {}: cannot read the free space: {e}",
                    self.opts.dir.display()
                );
                Ok(())
            }
        }
    }

    /// Writes `recs` under the next seqs, all or nothing: on an error what was written is
    /// rolled back (see [`SledSpool::rollback`]) and the error returned.
    fn store_unit(&mut self, recs: &[&SpoolRecord]) -> Result<Range<u64>, SpoolError> {
        let first = self.next_seq;
        let seqs = first..first + recs.len() as u64;
        if recs.is_empty() {
            return Ok(seqs);
        }
        // The seqs are used up before anything is written under them: never reused, even after
        // an error half-way.
        self.next_seq = seqs.end;
        let frame_seqs: Vec<u64> = recs
            .iter()
            .zip(seqs.clone())
            .filter(|(r, _)| r.class == Class::Frame)
            .map(|(_, seq)| seq)
            .collect();
        let part = frame_seqs.first().map(|&f| FramePart {
            first: f,
            count: frame_seqs.len() as u32,
        });
        match self.write_unit(recs, &seqs, part, &frame_seqs) {
            Ok(()) => {
                for r in recs {
                    self.count_in(Entry::of(r));
                }
                self.droppable += recs
                    .iter()
                    .filter(|r| r.class == Class::Frame)
                    .map(|r| r.size() as u64)
                    .sum::<u64>();
                Ok(seqs)
            }
            Err(e) => {
                if let Err(again) = self.rollback(seqs.clone()) {
                    log::error!(
                        "spool {}: undoing a failed append (seqs {}..{}) failed too: {again}; \
                         retried before the next operation, and on the next start",
                        self.opts.dir.display(),
                        seqs.start,
                        seqs.end
                    );
                    self.unfinished = Some(seqs);
                }
                Err(e)
            }
        }
    }

    /// The writes of [`SledSpool::store_unit`], between the [`UNIT_OPEN`] marker and its removal.
    fn write_unit(
        &mut self,
        recs: &[&SpoolRecord],
        seqs: &Range<u64>,
        part: Option<FramePart>,
        frame_seqs: &[u64],
    ) -> Result<(), SpoolError> {
        let err = |e| SpoolError::sled("appending records", e);
        self.t
            .meta
            .insert(NEXT_SEQ, &seqs.end.to_be_bytes())
            .map_err(err)?;
        self.t
            .meta
            .insert(UNIT_OPEN, &store::encode_range(seqs))
            .map_err(err)?;
        let mut frame_bytes = 0;
        for (rec, seq) in recs.iter().zip(seqs.clone()) {
            let entry = Entry::of(rec);
            let encoded = record::encode_part(rec, part.filter(|_| rec.class == Class::Frame))
                .map_err(|e| SpoolError::TooLarge {
                    bytes: entry.size,
                    detail: e.to_string(),
                })?;
            let key = seq_key(seq);
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
                frame_bytes += entry.size;
            }
        }
        if let (Some(&first), Some(&last)) = (frame_seqs.first(), frame_seqs.last()) {
            let frame = FrameEntry {
                bytes: frame_bytes,
                last,
            };
            self.t
                .frames
                .insert(seq_key(first), &frame.encode())
                .map_err(err)?;
        }
        self.t.meta.remove(UNIT_OPEN).map_err(err)?;
        Ok(())
    }

    /// Removes whatever a failed append wrote under `seqs` (records, index, its frame, record
    /// files after the next flush) and its marker. Counters never included it.
    fn rollback(&mut self, seqs: Range<u64>) -> Result<(), SpoolError> {
        let err = |e| SpoolError::sled("undoing a failed append", e);
        for seq in seqs.clone() {
            let key = seq_key(seq);
            self.t.frames.remove(key).map_err(err)?;
            self.t.index.remove(key).map_err(err)?;
            let old = self.t.records.remove(key).map_err(err)?;
            if old.is_some_and(|v| matches!(record::stored(&v), Ok(Stored::File(_))))
                || self.large.path(seq).exists()
            {
                self.large.delete_later(seq);
            }
        }
        self.t.meta.remove(UNIT_OPEN).map_err(err)?;
        Ok(())
    }

    /// Finishes a rollback that failed earlier, before anything else touches the trees.
    fn finish_rollback(&mut self) -> Result<(), SpoolError> {
        if let Some(seqs) = self.unfinished.clone() {
            self.rollback(seqs)?;
            self.unfinished = None;
        }
        Ok(())
    }
}

/// About what a record takes on disk: its file, or its share of sled's log (measured at about
/// twice the record bytes for small records; three times, to be safe).
fn disk_estimate(rec: &SpoolRecord) -> u64 {
    let encoded = (rec.size() + HEADER_LEN + 32 + 8 * rec.headers.len()) as u64;
    if encoded > LARGE_BYTES as u64 {
        encoded.div_ceil(4096) * 4096 + 4096
    } else {
        3 * encoded
    }
}

impl Spool for SledSpool {
    fn append_frame(&mut self, records: &[SpoolRecord]) -> Result<Appended, SpoolError> {
        self.finish_rollback()?;
        let bytes_of = |frames: bool| -> u64 {
            records
                .iter()
                .filter(|r| (r.class == Class::Frame) == frames)
                .map(|r| r.size() as u64)
                .sum()
        };
        let (frame_bytes, other_bytes) = (bytes_of(true), bytes_of(false));
        let frame_records = records.iter().filter(|r| r.class == Class::Frame).count() as u64;
        let max = self.opts.max_bytes;
        let total = self.total_bytes();
        let over = |bytes: u64| total.saturating_add(bytes).saturating_sub(max);
        // What to store, and how many bytes of the oldest frames to drop first.
        let (keep_frames, need) = match self.opts.when_full {
            _ if over(frame_bytes + other_bytes) == 0 => (true, 0),
            WhenFull::Backpressure if frame_records > 0 => return Ok(Appended::Refused),
            WhenFull::Backpressure => (true, 0),
            WhenFull::DropOldestFrames if frame_records == 0 => (true, over(other_bytes)),
            WhenFull::DropOldestFrames => {
                let need = over(frame_bytes + other_bytes);
                if need <= self.droppable {
                    (true, need)
                } else {
                    // Even every older frame gone would not make room: keep them, drop this one.
                    (false, over(other_bytes))
                }
            }
        };
        let store: Vec<&SpoolRecord> = records
            .iter()
            .filter(|r| keep_frames || r.class != Class::Frame)
            .collect();
        self.check_disk(&store)?;
        let victims = if need > 0 {
            self.oldest_frames(need)?
        } else {
            Vec::new()
        };
        let for_what = if keep_frames && frame_records > 0 {
            format!("a frame of {frame_records} record(s), {frame_bytes} bytes")
        } else {
            "a result or dead letter".to_string()
        };
        let dropped = self.drop_frames(&victims, &for_what)?;
        let seqs = self.store_unit(&store)?;
        if keep_frames {
            return Ok(Appended::Stored { seqs, dropped });
        }
        // Counted only once the rest is stored: a retry after an error counts it once.
        self.count_drop(Class::Frame, REASON_NO_ROOM)?;
        log::warn!(
            "spool {}: a frame of {frame_records} record(s), {frame_bytes} bytes, does not fit \
             ({total} of {max} bytes used, {} by frames that may be dropped); dropped it",
            self.opts.dir.display(),
            self.droppable
        );
        Ok(Appended::FrameDropped {
            seqs,
            records: frame_records,
            bytes: frame_bytes,
            dropped,
        })
    }

    fn flush(&mut self) -> Result<(), SpoolError> {
        self.finish_rollback()?;
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
        // Never hand out part of a unit whose append failed.
        self.finish_rollback()?;
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
        interrupted: survey.interrupted_count(),
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
