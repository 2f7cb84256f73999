//! The blob folder: put, get, prune and the counters (blocking I/O: call from `spawn_blocking`),
//! and [`run_pruner`], the task that prunes it every so often.

use std::fs::{self, File, OpenOptions, TryLockError};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::sync::watch;

use super::BlobError;

/// Names of puts in progress start with this; open deletes them.
const TEMP_PREFIX: &str = ".tmp-";
/// The file locked for as long as a process has the store open.
const LOCK_FILE: &str = ".lock";

/// Where the store lives and how much it keeps.
#[derive(Debug, Clone)]
pub struct BlobStoreOptions {
    /// The blob folder (created if missing). Give it an absolute path.
    pub dir: PathBuf,
    /// [`BlobStore::prune`] deletes the oldest blobs until the store holds at most this.
    pub max_bytes: u64,
    /// [`BlobStore::prune`] deletes blobs whose last put is older than this.
    pub retention: Duration,
}

/// A content-addressed blob folder. Cheap to clone; all clones share one store.
#[derive(Clone)]
pub struct BlobStore {
    inner: Arc<Inner>,
}

struct Inner {
    dir: PathBuf,
    max_bytes: u64,
    retention: Duration,
    /// Locked while the store is open, so that no other process's put (whose temp file `open`
    /// would delete) or prune runs in the same folder.
    _lock: File,
    /// Makes temp file names unique within the process.
    next_temp: AtomicU64,
    /// The counters; the lock also orders renames (put) against deletions (prune).
    counts: Mutex<Counts>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Counts {
    blobs: u64,
    bytes: u64,
}

/// A blob file found by a scan.
struct Found {
    id: String,
    len: u64,
    modified: SystemTime,
}

impl BlobStore {
    /// Opens (creating) the folder, locks it, deletes the temp files a crash left, and counts the
    /// blobs in it.
    pub fn open(opts: BlobStoreOptions) -> Result<BlobStore, BlobError> {
        let dir = opts.dir;
        let open_err = |source| BlobError::Open {
            dir: dir.clone(),
            source,
        };
        fs::create_dir_all(&dir).map_err(open_err)?;
        let lock = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(dir.join(LOCK_FILE))
            .map_err(open_err)?;
        match lock.try_lock() {
            Ok(()) => {}
            Err(TryLockError::WouldBlock) => return Err(BlobError::Locked { dir }),
            Err(TryLockError::Error(e)) => return Err(open_err(e)),
        }

        let mut temps = 0;
        for entry in fs::read_dir(&dir).map_err(open_err)? {
            let path = entry.map_err(open_err)?.path();
            let is_temp = path
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(TEMP_PREFIX));
            if is_temp {
                remove(&path).map_err(|source| BlobError::Io {
                    op: "delete the unfinished temp file",
                    path: path.clone(),
                    source,
                })?;
                temps += 1;
            }
        }
        if temps > 0 {
            log::info!(
                "blobstore: deleted {temps} unfinished temp file(s) in {} (left by a crash)",
                dir.display()
            );
        }

        let found = scan(&dir).map_err(open_err)?;
        let counts = Counts {
            blobs: found.len() as u64,
            bytes: found.iter().map(|f| f.len).sum(),
        };
        log::debug!(
            "blobstore: opened {}: {} blobs, {} bytes",
            dir.display(),
            counts.blobs,
            counts.bytes
        );
        Ok(BlobStore {
            inner: Arc::new(Inner {
                dir,
                max_bytes: opts.max_bytes,
                retention: opts.retention,
                _lock: lock,
                next_temp: AtomicU64::new(0),
                counts: Mutex::new(counts),
            }),
        })
    }

    /// Stores `data` durably and returns its SHA-256 in lowercase hex (its id). Storing content
    /// that is already there stores nothing and refreshes its age. Blocking.
    pub fn put(&self, data: &[u8]) -> Result<String, BlobError> {
        let id = hex::encode(Sha256::digest(data));
        let path = self.inner.dir.join(&id);
        let len = data.len() as u64;
        let present = {
            let _counts = self.counts();
            self.refresh_if_present(&path, len)?
        };
        if !present {
            let temp = self.write_temp(data)?;
            let mut counts = self.counts();
            if self.refresh_if_present(&path, len)? {
                // A concurrent put of the same content won the race.
                drop(counts);
                let _ = remove(&temp);
            } else {
                // A file of the wrong length under this name is damage: replace it.
                let replaced = existing_len(&path)?;
                fs::rename(&temp, &path).map_err(|source| {
                    let _ = remove(&temp);
                    io_err("rename into place", &path)(source)
                })?;
                if let Some(old) = replaced {
                    log::warn!(
                        "blobstore: replaced {} ({old} bytes, expected {len})",
                        path.display()
                    );
                    counts.blobs -= 1;
                    counts.bytes -= old;
                }
                counts.blobs += 1;
                counts.bytes += len;
            }
        }
        File::open(&self.inner.dir)
            .and_then(|d| d.sync_all())
            .map_err(io_err("fsync the folder", &self.inner.dir))?;
        Ok(id)
    }

    /// The bytes of blob `id` (not re-hashed), or `None` if the store has no such blob.
    pub fn get(&self, id: &str) -> Result<Option<Vec<u8>>, BlobError> {
        let path = self.blob_path(id)?;
        match fs::read(&path) {
            Ok(bytes) => Ok(Some(bytes)),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(e) => Err(io_err("read", &path)(e)),
        }
    }

    /// Deletes the blobs older than the retention, then the oldest until the store holds at most
    /// `max_bytes`. Returns (blobs deleted, bytes freed). Also re-counts the store from disk.
    /// Blocking; puts wait while it runs.
    pub fn prune(&self) -> Result<(u64, u64), BlobError> {
        let mut counts = self.counts();
        let mut found = scan(&self.inner.dir).map_err(|source| BlobError::Open {
            dir: self.inner.dir.clone(),
            source,
        })?;
        found.sort_by(|a, b| (a.modified, &a.id).cmp(&(b.modified, &b.id)));
        let cutoff = SystemTime::now().checked_sub(self.inner.retention);
        let mut kept = Counts {
            blobs: found.len() as u64,
            bytes: found.iter().map(|f| f.len).sum(),
        };
        let (mut deleted, mut freed) = (0, 0);
        for blob in &found {
            let expired = cutoff.is_some_and(|cutoff| blob.modified < cutoff);
            if !expired && kept.bytes <= self.inner.max_bytes {
                break; // oldest first: nothing after this one is due either
            }
            let path = self.inner.dir.join(&blob.id);
            match fs::remove_file(&path) {
                Ok(()) => {
                    deleted += 1;
                    freed += blob.len;
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => {
                    log::warn!("blobstore: cannot delete {}: {e}", path.display());
                    continue;
                }
            }
            kept.blobs -= 1;
            kept.bytes -= blob.len;
        }
        *counts = kept;
        Ok((deleted, freed))
    }

    /// (blobs, bytes) in the store, as of the last put or prune.
    pub fn stats(&self) -> (u64, u64) {
        let counts = self.counts();
        (counts.blobs, counts.bytes)
    }

    /// The file of blob `id`, after checking that `id` is 64 lowercase hex digits (so it cannot
    /// name anything outside the folder).
    pub(super) fn blob_path(&self, id: &str) -> Result<PathBuf, BlobError> {
        if is_id(id) {
            Ok(self.inner.dir.join(id))
        } else {
            Err(BlobError::invalid_id(id))
        }
    }

    fn counts(&self) -> MutexGuard<'_, Counts> {
        // Counters stay consistent even if a holder panicked: each update is one assignment.
        self.inner.counts.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// If a complete blob is at `path`, refreshes its mtime (its age for retention) and returns
    /// true. Call with the counts locked, so prune cannot delete it in between.
    fn refresh_if_present(&self, path: &Path, len: u64) -> Result<bool, BlobError> {
        if existing_len(path)? != Some(len) {
            return Ok(false);
        }
        OpenOptions::new()
            .write(true)
            .open(path)
            .and_then(|f| f.set_modified(SystemTime::now()))
            .map_err(io_err("refresh the age of", path))?;
        Ok(true)
    }

    /// Writes `data` to a new temp file in the folder and fsyncs it.
    fn write_temp(&self, data: &[u8]) -> Result<PathBuf, BlobError> {
        let n = self.inner.next_temp.fetch_add(1, Ordering::Relaxed);
        let name = format!("{TEMP_PREFIX}{}-{n}", std::process::id());
        let path = self.inner.dir.join(name);
        let written = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .and_then(|mut f| {
                f.write_all(data)?;
                f.sync_all()
            });
        if let Err(e) = written {
            let _ = remove(&path);
            return Err(io_err("write", &path)(e));
        }
        Ok(path)
    }
}

/// Whether `id` is a SHA-256 in 64 lowercase hex digits.
fn is_id(id: &str) -> bool {
    id.len() == 64 && id.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
}

/// The blob files in `dir`.
fn scan(dir: &Path) -> io::Result<Vec<Found>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let Some(id) = entry
            .file_name()
            .to_str()
            .filter(|n| is_id(n))
            .map(String::from)
        else {
            continue;
        };
        let meta = match entry.metadata() {
            Ok(m) if m.is_file() => m,
            Ok(_) => continue,
            Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
            Err(e) => return Err(e),
        };
        found.push(Found {
            id,
            len: meta.len(),
            modified: meta.modified().unwrap_or_else(|_| SystemTime::now()),
        });
    }
    Ok(found)
}

/// The length of the file at `path`, if there is one.
fn existing_len(path: &Path) -> Result<Option<u64>, BlobError> {
    match fs::metadata(path) {
        Ok(m) => Ok(Some(m.len())),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err("stat", path)(e)),
    }
}

/// Deletes a file; one that is already gone is fine.
fn remove(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn io_err(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> BlobError {
    let path = path.to_path_buf();
    move |source| BlobError::Io { op, path, source }
}

/// Prunes `store` every `every` (on the blocking pool) and logs what it freed, until `shutdown`
/// turns true (or its sender is dropped).
pub async fn run_pruner(store: BlobStore, every: Duration, mut shutdown: watch::Receiver<bool>) {
    loop {
        tokio::select! {
            () = super::stopped(&mut shutdown) => break,
            () = tokio::time::sleep(every) => {}
        }
        let pruning = store.clone();
        match tokio::task::spawn_blocking(move || pruning.prune()).await {
            Ok(Ok((0, _))) => log::debug!("blobstore: pruned nothing"),
            Ok(Ok((deleted, freed))) => {
                let (blobs, bytes) = store.stats();
                log::info!(
                    "blobstore: pruned {deleted} blobs ({freed} bytes); {blobs} blobs, {bytes} \
                     bytes left"
                );
            }
            Ok(Err(e)) => log::warn!("blobstore: prune failed: {e} (retried in {every:?})"),
            Err(e) => log::error!("blobstore: prune task failed: {e}"),
        }
    }
    log::debug!("blobstore: pruner stopped");
}
