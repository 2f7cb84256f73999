//! The spool folder on disk, below the [`super::SledSpool`] logic: the sled database and its
//! trees, opening it (locks, damage, panics), the start-up survey of every record, and the seq
//! file. Nothing here decides policy.

use std::collections::{BTreeMap, HashSet};
use std::fs::{self, File, TryLockError};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use sled::IVec;

use super::SpoolError;
use super::large;
use super::record::{self, Class, FormatError, FramePart, SpoolRecord, Stored, key_seq};

/// sled's page cache. Its default (1 GiB) is far too much for an edge box; values are mostly
/// written once and read once, so a small cache costs little.
const CACHE_CAPACITY: u64 = 64 * 1024 * 1024;

/// How long [`open_db`] waits for a locked spool before giving up with `Locked`.
const LOCK_PATIENCE: Duration = Duration::from_secs(2);

/// A file beside sled's, holding the next seq as of the last open, close, or flush at least
/// [`SEQ_FILE_INTERVAL`] after the previous update (`<n> <crc32c of n, hex>`).
/// sled 0.34 opens a database whose log is damaged as an *empty* one, without an error; a
/// stored next seq below this one shows that it lost records.
pub const SEQ_FILE: &str = "fovea-next-seq";

/// How often (at most) a flush also updates [`SEQ_FILE`].
pub const SEQ_FILE_INTERVAL: Duration = Duration::from_secs(10);

/// `meta` key of the next seq to hand out (u64 BE).
pub const NEXT_SEQ: &[u8] = b"next_seq";
/// `meta` key prefix of the drop counters: `drop/<class>/<reason>` (u64 BE).
pub const DROP_PREFIX: &str = "drop/";
/// `meta` key present while a unit is being appended: its seqs, [`SeqRange`]. Found on open,
/// the append was interrupted (never flushed, never acknowledged): its records are removed.
pub const UNIT_OPEN: &[u8] = b"unit_open";
/// `meta` key present while a frame is being dropped: its seqs, [`SeqRange`]. Found on open,
/// the drop (already counted) is finished: the frame records left in the range are removed.
pub const DROP_OPEN: &[u8] = b"drop_open";

/// Seqs `start..end` as stored under [`UNIT_OPEN`] and [`DROP_OPEN`]: two u64 BE.
pub fn encode_range(r: &std::ops::Range<u64>) -> [u8; 16] {
    let mut out = [0; 16];
    out[..8].copy_from_slice(&r.start.to_be_bytes());
    out[8..].copy_from_slice(&r.end.to_be_bytes());
    out
}

pub fn decode_range(v: &[u8]) -> Option<std::ops::Range<u64>> {
    let start = u64::from_be_bytes(v.get(..8)?.try_into().ok()?);
    let end = u64::from_be_bytes(v.get(8..16)?.try_into().ok()?);
    (v.len() == 16 && start <= end).then_some(start..end)
}

/// A `frames` entry: one whole frame that may be dropped, keyed by the seq of its first frame
/// record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameEntry {
    /// Record bytes of its frame records.
    pub bytes: u64,
    /// Seq of its last frame record.
    pub last: u64,
}

impl FrameEntry {
    /// bytes, last seq: 16 bytes.
    pub fn encode(self) -> [u8; 16] {
        let mut out = [0; 16];
        out[..8].copy_from_slice(&self.bytes.to_be_bytes());
        out[8..].copy_from_slice(&self.last.to_be_bytes());
        out
    }

    /// A 16-byte entry, or the 8-byte one (size only) of a spool written before frames were
    /// units: a frame of one record, `first` itself.
    pub fn decode(first: u64, v: &[u8]) -> Option<FrameEntry> {
        let word = |at: usize| v.get(at..at + 8)?.try_into().ok().map(u64::from_be_bytes);
        match v.len() {
            8 => Some(FrameEntry {
                bytes: word(0)?,
                last: first,
            }),
            16 => Some(FrameEntry {
                bytes: word(0)?,
                last: word(8)?,
            }),
            _ => None,
        }
    }
}

/// The sled database of one spool folder and its trees.
pub struct Trees {
    pub db: sled::Db,
    /// seq -> record (or [`record::FileStub`]).
    pub records: sled::Tree,
    /// seq -> [`Entry`].
    pub index: sled::Tree,
    /// seq of a frame's first frame record -> [`FrameEntry`]: the frames that may be dropped.
    pub frames: sled::Tree,
    /// next seq, drop counters.
    pub meta: sled::Tree,
    /// seq -> raw bytes of a corrupt record.
    pub quarantine: sled::Tree,
}

impl Trees {
    fn from_db(db: sled::Db) -> sled::Result<Trees> {
        Ok(Trees {
            records: db.open_tree("records")?,
            index: db.open_tree("index")?,
            frames: db.open_tree("frames")?,
            meta: db.open_tree("meta")?,
            quarantine: db.open_tree("quarantine")?,
            db,
        })
    }
}

/// An `index` value: what the counters need to know about a record without reading it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    pub class: Class,
    pub size: u64,
    pub created_ms: i64,
}

impl Entry {
    const LEN: usize = 1 + 8 + 8;

    pub fn of(rec: &SpoolRecord) -> Entry {
        Entry {
            class: rec.class,
            size: rec.size() as u64,
            created_ms: rec.created_ms,
        }
    }

    pub fn encode(self) -> [u8; Entry::LEN] {
        let mut out = [0; Entry::LEN];
        out[0] = self.class.index() as u8;
        out[1..9].copy_from_slice(&self.size.to_be_bytes());
        out[9..17].copy_from_slice(&self.created_ms.to_be_bytes());
        out
    }

    pub fn decode(bytes: &[u8]) -> Option<Entry> {
        if bytes.len() != Entry::LEN {
            return None;
        }
        let class = *Class::ALL.get(usize::from(bytes[0]))?;
        Some(Entry {
            class,
            size: u64::from_be_bytes(bytes[1..9].try_into().ok()?),
            created_ms: i64::from_be_bytes(bytes[9..17].try_into().ok()?),
        })
    }
}

/// Reads a `records` value: inline, or from its file in `dir`'s `large` folder.
pub fn load(dir: &Path, seq: u64, value: &[u8]) -> Result<SpoolRecord, FormatError> {
    load_part(dir, seq, value).map(|(rec, _)| rec)
}

/// [`load`], with the record's place in its frame.
pub fn load_part(
    dir: &Path,
    seq: u64,
    value: &[u8],
) -> Result<(SpoolRecord, Option<FramePart>), FormatError> {
    match record::stored(value)? {
        Stored::Inline(bytes) => record::decode_part(bytes),
        Stored::File(stub) => {
            let (path, bytes) = large::read(dir, seq);
            let shown = path.display().to_string();
            let bytes = bytes.map_err(|e| FormatError::File {
                path: shown.clone(),
                detail: e.to_string(),
            })?;
            record::decode_file(stub, &shown, &bytes)
        }
    }
}

/// A `records` entry that failed its checks.
pub struct Corrupt {
    pub key: IVec,
    pub value: IVec,
    pub reason: FormatError,
}

/// What a scan of `records` found, compared with `index`, `frames` and the record files.
#[derive(Default)]
pub struct Survey {
    /// Intact records per class.
    pub records: [u64; 3],
    /// Their bytes.
    pub bytes: [u64; 3],
    /// Records that failed a check.
    pub corrupt: Vec<Corrupt>,
    /// `index` entries without an intact record.
    pub index_stale: Vec<u64>,
    /// Intact records whose `index` entry is missing or wrong.
    pub index_missing: Vec<(u64, Entry)>,
    /// `frames` entries without a whole intact frame.
    pub frames_stale: Vec<u64>,
    /// Whole intact frames missing from `frames` (or with the wrong entry).
    pub frames_missing: Vec<(u64, FrameEntry)>,
    /// Record bytes of the frames `frames` should hold: what drops can free.
    pub droppable: u64,
    /// Records of an append or a drop a crash interrupted ([`UNIT_OPEN`], [`DROP_OPEN`]): to be
    /// removed, not counted.
    pub interrupted: Vec<u64>,
    /// The markers found in `meta` (to be cleared once `interrupted` is removed).
    pub markers: Vec<&'static [u8]>,
    /// Record files no stub points to (a crash before their stub, or after their removal).
    pub orphan_files: Vec<PathBuf>,
    /// Highest seq seen in `records`, `index` or `quarantine`.
    pub max_seq: Option<u64>,
}

impl Survey {
    pub fn index_mismatches(&self) -> u64 {
        (self.index_stale.len()
            + self.index_missing.len()
            + self.frames_stale.len()
            + self.frames_missing.len()) as u64
    }

    /// Records of interrupted appends and drops, plus the markers naming them.
    pub fn interrupted_count(&self) -> u64 {
        (self.interrupted.len() + self.markers.len()) as u64
    }

    fn see_seq(&mut self, seq: u64) {
        self.max_seq = Some(self.max_seq.map_or(seq, |m| m.max(seq)));
    }
}

/// Reads every record once and compares with the indexes (a merge: all are in seq order) and
/// the record files. Changes nothing.
fn survey(t: &Trees, dir: &Path) -> Result<Survey, OpenFailure> {
    let sled_err = |e| OpenFailure::from_sled(e, "reading records");
    let mut s = Survey::default();
    let marker = |key: &'static [u8]| -> Result<Option<std::ops::Range<u64>>, OpenFailure> {
        Ok(t.meta.get(key).map_err(sled_err)?.map(|v| {
            decode_range(&v).unwrap_or(0..0) // malformed: cleared, nothing removed
        }))
    };
    let unit_open = marker(UNIT_OPEN)?;
    let drop_open = marker(DROP_OPEN)?;
    s.markers = [(UNIT_OPEN, &unit_open), (DROP_OPEN, &drop_open)]
        .into_iter()
        .filter(|(_, m)| m.is_some())
        .map(|(k, _)| k)
        .collect();
    // Intact frame records by frame (first seq -> records expected, records found, bytes,
    // last seq): few (each is large), compared with `frames` at the end.
    let mut frames: BTreeMap<u64, (u32, u32, u64, u64)> = BTreeMap::new();
    // Seqs whose value is a file stub (intact or not): their files are not orphans.
    let mut stubs = HashSet::new();
    let mut index = t.index.iter();
    let mut next_index = next_entry(&mut index).map_err(sled_err)?;
    for item in t.records.iter() {
        let (k, v) = item.map_err(sled_err)?;
        let seq = match key_seq(&k) {
            Ok(seq) => seq,
            Err(reason) => {
                s.corrupt.push(Corrupt {
                    key: k,
                    value: v,
                    reason,
                });
                continue;
            }
        };
        s.see_seq(seq);
        if matches!(record::stored(&v), Ok(Stored::File(_))) {
            stubs.insert(seq);
        }
        if unit_open.as_ref().is_some_and(|r| r.contains(&seq)) {
            s.interrupted.push(seq);
            continue;
        }
        let (rec, part) = match load_part(dir, seq, &v) {
            Ok(loaded) => loaded,
            Err(reason) => {
                s.corrupt.push(Corrupt {
                    key: k,
                    value: v,
                    reason,
                });
                continue;
            }
        };
        let want = Entry::of(&rec);
        if want.class == Class::Frame && drop_open.as_ref().is_some_and(|r| r.contains(&seq)) {
            s.interrupted.push(seq);
            continue;
        }
        s.records[want.class.index()] += 1;
        s.bytes[want.class.index()] += want.size;
        if want.class == Class::Frame {
            let part = part.unwrap_or(FramePart {
                first: seq,
                count: 1,
            });
            let f = frames.entry(part.first).or_insert((part.count, 0, 0, seq));
            f.1 += 1;
            f.2 += want.size;
            f.3 = f.3.max(seq);
        }
        while let Some((iseq, _)) = next_index
            && iseq < seq
        {
            s.index_stale.push(iseq);
            next_index = next_entry(&mut index).map_err(sled_err)?;
        }
        match next_index {
            Some((iseq, found)) if iseq == seq => {
                if found != Some(want) {
                    s.index_missing.push((seq, want));
                }
                next_index = next_entry(&mut index).map_err(sled_err)?;
            }
            _ => s.index_missing.push((seq, want)),
        }
    }
    while let Some((iseq, _)) = next_index {
        s.index_stale.push(iseq);
        s.see_seq(iseq);
        next_index = next_entry(&mut index).map_err(sled_err)?;
    }
    // Only whole frames may be dropped: one whose first records were delivered (removed) drains.
    let mut frames: BTreeMap<u64, FrameEntry> = frames
        .into_iter()
        .filter(|(_, (want, found, _, _))| found == want)
        .map(|(first, (_, _, bytes, last))| (first, FrameEntry { bytes, last }))
        .collect();
    s.droppable = frames.values().map(|f| f.bytes).sum();
    for item in t.frames.iter() {
        let (k, v) = item.map_err(sled_err)?;
        let Ok(seq) = key_seq(&k) else {
            continue; // not a seq: never written by us, ignored
        };
        let found = FrameEntry::decode(seq, &v);
        match frames.remove(&seq) {
            Some(want) if found == Some(want) => {}
            Some(want) => s.frames_missing.push((seq, want)),
            None => s.frames_stale.push(seq),
        }
    }
    s.frames_missing.extend(frames);
    if let Some((k, _)) = t.quarantine.last().map_err(sled_err)?
        && let Ok(seq) = key_seq(&k)
    {
        s.see_seq(seq);
    }
    let files = large::list(dir).map_err(|e| {
        OpenFailure::Other(SpoolError::io(
            format!("listing {}", dir.join(large::LARGE_DIR).display()),
            e,
        ))
    })?;
    for (seq, path) in files {
        if !stubs.contains(&seq) {
            s.orphan_files.push(path);
        }
    }
    Ok(s)
}

/// The next `index` entry: its seq and its decoded value (`None` when malformed). Entries whose
/// key is not a seq are skipped.
fn next_entry(it: &mut sled::Iter) -> sled::Result<Option<(u64, Option<Entry>)>> {
    for item in it.by_ref() {
        let (k, v) = item?;
        if let Ok(seq) = key_seq(&k) {
            return Ok(Some((seq, Entry::decode(&v))));
        }
    }
    Ok(None)
}

/// Why a spool folder could not be opened and surveyed.
pub enum OpenFailure {
    /// The folder is locked by another process.
    Locked(String),
    /// sled's files are damaged: worth moving aside.
    Damaged(String),
    /// The disk or the OS failed (permissions, full disk): moving aside would not help.
    Other(SpoolError),
}

impl OpenFailure {
    pub fn into_error(self, dir: &Path) -> SpoolError {
        match self {
            OpenFailure::Locked(detail) => SpoolError::Locked {
                dir: dir.to_path_buf(),
                detail,
            },
            OpenFailure::Damaged(detail) => SpoolError::Damaged {
                dir: dir.to_path_buf(),
                detail,
            },
            OpenFailure::Other(e) => e,
        }
    }

    pub fn from_sled(e: sled::Error, context: &str) -> OpenFailure {
        use std::io::ErrorKind;
        match &e {
            sled::Error::Io(io) if io.to_string().contains("could not acquire lock") => {
                OpenFailure::Locked(io.to_string())
            }
            sled::Error::Io(io)
                if matches!(
                    io.kind(),
                    ErrorKind::UnexpectedEof | ErrorKind::InvalidData | ErrorKind::InvalidInput
                ) =>
            {
                OpenFailure::Damaged(format!("{context}: {e}"))
            }
            sled::Error::Io(_) => OpenFailure::Other(SpoolError::sled(context, e)),
            // Corruption, Unsupported (an unreadable config), ReportableBug, ...
            _ => OpenFailure::Damaged(format!("{context}: {e}")),
        }
    }
}

/// Opens sled in `dir`. A lock is retried for up to [`LOCK_PATIENCE`]: sled's background
/// threads hold the files for a moment after a spool is dropped (a reopen in the same process),
/// and so does a previous node that is still exiting.
pub fn open_db(dir: &Path) -> Result<Trees, OpenFailure> {
    let deadline = Instant::now() + LOCK_PATIENCE;
    loop {
        match try_open_db(dir) {
            Err(OpenFailure::Locked(_)) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(10));
            }
            other => return other,
        }
    }
}

/// Opens sled in `dir` (refusing early if another process holds it). sled panics on some
/// damaged files: that is caught and reported as damage.
fn try_open_db(dir: &Path) -> Result<Trees, OpenFailure> {
    check_unlocked(dir)?;
    let opened = catch_unwind(AssertUnwindSafe(|| {
        sled::Config::new()
            .path(dir)
            .cache_capacity(CACHE_CAPACITY)
            .open()
            .and_then(Trees::from_db)
    }));
    match opened {
        Ok(Ok(t)) => Ok(t),
        Ok(Err(e)) => Err(OpenFailure::from_sled(e, "opening")),
        Err(panic) => Err(OpenFailure::Damaged(format!(
            "sled panicked while opening: {}",
            panic_message(panic.as_ref())
        ))),
    }
}

/// [`open_db`] then the survey; a survey that meets sled-level corruption is damage too.
pub fn open_and_survey(dir: &Path) -> Result<(Trees, Survey), OpenFailure> {
    let t = open_db(dir)?;
    match catch_unwind(AssertUnwindSafe(|| survey(&t, dir))) {
        Ok(Ok(s)) => Ok((t, s)),
        Ok(Err(e)) => Err(e),
        Err(panic) => Err(OpenFailure::Damaged(format!(
            "sled panicked while reading records: {}",
            panic_message(panic.as_ref())
        ))),
    }
}

/// Fails with `Locked` if another process holds sled's lock on `dir/db` (sled's own error for
/// that is an untyped I/O error, and must never be mistaken for damage).
fn check_unlocked(dir: &Path) -> Result<(), OpenFailure> {
    let path = dir.join("db");
    let file = match File::open(&path) {
        Ok(f) => f,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        Err(e) => {
            return Err(OpenFailure::Other(SpoolError::io(
                format!("opening {}", path.display()),
                e,
            )));
        }
    };
    match file.try_lock() {
        // Dropping `file` releases the lock at once.
        Ok(()) => Ok(()),
        Err(TryLockError::WouldBlock) => {
            Err(OpenFailure::Locked(format!("{} is locked", path.display())))
        }
        Err(TryLockError::Error(e)) => Err(OpenFailure::Other(SpoolError::io(
            format!("locking {}", path.display()),
            e,
        ))),
    }
}

/// `dir` if it holds a sled database (verify and the test aid never create one).
pub fn existing_spool(dir: &Path) -> Result<PathBuf, SpoolError> {
    if dir.join("db").is_file() {
        Ok(dir.to_path_buf())
    } else {
        Err(SpoolError::NotFound {
            dir: dir.to_path_buf(),
        })
    }
}

pub fn read_u64(tree: &sled::Tree, key: &[u8]) -> sled::Result<Option<u64>> {
    Ok(tree
        .get(key)?
        .and_then(|v| v.as_ref().try_into().ok().map(u64::from_be_bytes)))
}

/// The next seq according to sled: `meta`'s, or past the highest seq in the trees.
pub fn stored_next_seq(t: &Trees, survey: &Survey) -> sled::Result<u64> {
    Ok(read_u64(&t.meta, NEXT_SEQ)?
        .unwrap_or(0)
        .max(survey.max_seq.map_or(0, |s| s.saturating_add(1))))
}

pub fn read_drops(meta: &sled::Tree) -> sled::Result<BTreeMap<(String, String), u64>> {
    let mut out = BTreeMap::new();
    for item in meta.scan_prefix(DROP_PREFIX) {
        let (k, v) = item?;
        let key = String::from_utf8_lossy(&k);
        let rest = &key[DROP_PREFIX.len()..];
        let n = v.as_ref().try_into().ok().map(u64::from_be_bytes);
        match (rest.split_once('/'), n) {
            (Some((class, reason)), Some(n)) => {
                out.insert((class.to_string(), reason.to_string()), n);
            }
            _ => log::warn!("spool: ignoring a malformed drop counter {key:?}"),
        }
    }
    Ok(out)
}

/// The next seq recorded in [`SEQ_FILE`] (`None`: no file, or unreadable).
pub fn read_seq_file(dir: &Path) -> Option<u64> {
    let path = dir.join(SEQ_FILE);
    let text = match fs::read_to_string(&path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return None,
        Err(e) => {
            log::warn!("spool: cannot read {}: {e}; ignoring it", path.display());
            return None;
        }
    };
    let parsed = text.trim_end().split_once(' ').and_then(|(n, crc)| {
        let ok = format!("{:08x}", crc32c::crc32c(n.as_bytes())) == crc;
        n.parse::<u64>().ok().filter(|_| ok)
    });
    if parsed.is_none() {
        log::warn!(
            "spool: {} is damaged ({text:?}); ignoring it",
            path.display()
        );
    }
    parsed
}

/// Replaces [`SEQ_FILE`] atomically and durably (write, fsync, rename, fsync the folder).
pub fn write_seq_file(dir: &Path, next_seq: u64) -> Result<(), SpoolError> {
    use std::io::Write;
    let path = dir.join(SEQ_FILE);
    let tmp = dir.join(format!("{SEQ_FILE}.tmp"));
    let n = next_seq.to_string();
    let text = format!("{n} {:08x}\n", crc32c::crc32c(n.as_bytes()));
    let io = |what: &str, e| SpoolError::io(format!("{what} {}", path.display()), e);
    let mut f = File::create(&tmp).map_err(|e| io("writing", e))?;
    f.write_all(text.as_bytes()).map_err(|e| io("writing", e))?;
    f.sync_all().map_err(|e| io("syncing", e))?;
    fs::rename(&tmp, &path).map_err(|e| io("replacing", e))?;
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|e| io("syncing the folder of", e))
}

/// `dir` without a trailing slash or `.` parts, so that `<dir>.corrupt-...` is a sibling.
pub fn clean_path(dir: &Path) -> PathBuf {
    dir.components().collect()
}

/// `<dir>.corrupt-<unix-ms>`, not yet existing.
pub fn aside_path(dir: &Path, now_ms: i64) -> PathBuf {
    let mut n = 0;
    loop {
        let mut name = dir.as_os_str().to_owned();
        name.push(format!(".corrupt-{now_ms}"));
        if n > 0 {
            name.push(format!("-{n}"));
        }
        let path = PathBuf::from(name);
        if !path.exists() {
            return path;
        }
        n += 1;
    }
}

fn panic_message(panic: &(dyn std::any::Any + Send)) -> String {
    if let Some(s) = panic.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = panic.downcast_ref::<String>() {
        s.clone()
    } else {
        "(no message)".to_string()
    }
}
