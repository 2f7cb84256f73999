//! Records over [`LARGE_BYTES`] encoded live in files of their own, `large/<seq, 16 hex>.rec`,
//! with a stub in sled ([`super::record::FileStub`]).
//!
//! Why: sled 0.34 writes any page over a quarter of its 512 KiB segment as a separate blob file,
//! and does not reliably delete blobs it no longer needs (sled issue #786, unresolved): with
//! 1 MiB frames, each write-and-drain cycle of 200 MiB left about 650 MiB of dead blob files
//! behind, for good (also across restarts). A file per large record is deleted when its record
//! goes, so the disk holds what the spool holds.
//!
//! Durability: a file is written when its record is appended, fsync'ed (with its folder) by the
//! next flush *before* sled's flush, so a flushed stub never points at a file that is not on
//! disk. Files of removed, dropped or quarantined records are deleted only after the flush that
//! made the removal durable; a crash in between leaves *orphans* (a file without a stub), which
//! the next open deletes.

use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};

/// Encoded records larger than this go to a file (sled keeps pages up to 128 KiB in its log).
pub const LARGE_BYTES: usize = 64 * 1024;

/// The folder of record files, inside the spool folder.
pub const LARGE_DIR: &str = "large";

/// The record files of one spool.
pub struct LargeFiles {
    /// The spool folder.
    spool_dir: PathBuf,
    /// `<spool>/large`.
    dir: PathBuf,
    /// Files written since the last sync.
    unsynced: Vec<PathBuf>,
    /// Files whose record was removed; deleted after the next sled flush.
    doomed: Vec<PathBuf>,
}

impl LargeFiles {
    /// The record files of the spool in `spool_dir` (the folder is created).
    pub fn new(spool_dir: &Path) -> io::Result<LargeFiles> {
        let dir = spool_dir.join(LARGE_DIR);
        fs::create_dir_all(&dir)?;
        Ok(LargeFiles {
            spool_dir: spool_dir.to_path_buf(),
            dir,
            unsynced: Vec::new(),
            doomed: Vec::new(),
        })
    }

    /// Where the record `seq` lives.
    pub fn path(&self, seq: u64) -> PathBuf {
        file_path(&self.dir, seq)
    }

    /// Writes a record's encoded bytes (not durable until [`LargeFiles::sync`]).
    pub fn write(&mut self, seq: u64, bytes: &[u8]) -> io::Result<()> {
        let path = self.path(seq);
        fs::write(&path, bytes)?;
        self.unsynced.push(path);
        Ok(())
    }

    /// fsyncs every file written since the last sync, and the folder.
    pub fn sync(&mut self) -> io::Result<()> {
        if self.unsynced.is_empty() {
            return Ok(());
        }
        for path in &self.unsynced {
            match File::open(path) {
                Ok(f) => f.sync_all()?,
                // Removed before it was ever flushed: nothing to keep.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(e),
            }
        }
        File::open(&self.dir)?.sync_all()?;
        self.unsynced.clear();
        Ok(())
    }

    /// Marks the file of a removed record for deletion after the next flush.
    pub fn delete_later(&mut self, seq: u64) {
        self.doomed.push(self.path(seq));
    }

    /// Whether files wait for deletion.
    pub fn has_doomed(&self) -> bool {
        !self.doomed.is_empty()
    }

    /// Deletes the files marked by [`LargeFiles::delete_later`]. Call only after a successful
    /// sled flush. A file that cannot be deleted is logged and left: the next open deletes it.
    pub fn delete_doomed(&mut self) {
        for path in self.doomed.drain(..) {
            match fs::remove_file(&path) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => log::warn!(
                    "spool: cannot delete {}: {e} (deleted at the next start)",
                    path.display()
                ),
            }
        }
    }

    /// Keeps the file of a quarantined record beside the others as `<seq>.quarantined`.
    pub fn quarantine(&mut self, seq: u64) -> io::Result<()> {
        let path = self.path(seq);
        match fs::rename(&path, path.with_extension("quarantined")) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    /// Bytes of all record files (for the disk usage in the benchmark).
    pub fn disk_bytes(&self) -> u64 {
        list(&self.spool_dir)
            .map(|files| {
                files
                    .iter()
                    .filter_map(|(_, p)| fs::metadata(p).ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    }
}

/// `<large>/<seq, 16 hex>.rec`.
fn file_path(large_dir: &Path, seq: u64) -> PathBuf {
    large_dir.join(format!("{seq:016x}.rec"))
}

/// Reads the file of record `seq` in the spool folder `spool_dir`.
pub fn read(spool_dir: &Path, seq: u64) -> (PathBuf, io::Result<Vec<u8>>) {
    let path = file_path(&spool_dir.join(LARGE_DIR), seq);
    let bytes = fs::read(&path);
    (path, bytes)
}

/// Every record file in the spool folder `spool_dir` (seq, path); none if there is no folder.
pub fn list(spool_dir: &Path) -> io::Result<Vec<(u64, PathBuf)>> {
    let dir = spool_dir.join(LARGE_DIR);
    let entries = match fs::read_dir(&dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut out = Vec::new();
    for entry in entries {
        let path = entry?.path();
        let seq = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".rec"))
            .filter(|hex| hex.len() == 16)
            .and_then(|hex| u64::from_str_radix(hex, 16).ok());
        if let Some(seq) = seq {
            out.push((seq, path));
        }
    }
    out.sort();
    Ok(out)
}
