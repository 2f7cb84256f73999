//! Payloads of deliveries held beyond the memory budget (`mqtt.max_in_flight`,
//! `mqtt.max_in_flight_bytes`), kept in files under `<state_dir>/ingress-spill` until the
//! dispatcher takes them, so that the connection can go on reading without memory growing.
//!
//! Why it exists: mosquitto 2.0.11 keeps no in-flight window for a client that holds acks (on
//! every PUBACK while others are outstanding it sends up to a window more), so a node that acks
//! frames once they are durable is sent its whole queue. Not reading would stop the keep-alive;
//! dropping deliveries un-acked and renewing the session makes the broker resend everything it
//! had sent. Spilling keeps every delivery, in order, at the cost of a page-cache write.
//!
//! Nothing here is synced: a spilled delivery's PUBACK is still held, so after a crash the
//! broker has it and sends it again. The folder is emptied at start for the same reason.

use bytes::Bytes;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// The spill folder and what it holds.
#[derive(Debug)]
pub struct Spill {
    dir: PathBuf,
    max_bytes: u64,
    next: AtomicU64,
    /// Bytes in spilled payloads not yet taken back.
    bytes: AtomicU64,
    /// Spilled payloads that could not be read back: their deliveries were dropped un-acked,
    /// and the connection renews its session to get them again.
    lost: AtomicU64,
}

/// One spilled payload; its file is removed when it is read back or dropped.
#[derive(Debug)]
pub struct Spilled {
    spill: Arc<Spill>,
    path: PathBuf,
    len: u64,
}

impl Spill {
    /// Opens the folder `dir`, removing what a previous run left (those deliveries were never
    /// acked: the broker sends them again). `max_bytes` 0 turns spilling off.
    pub fn open(dir: &Path, max_bytes: u64) -> io::Result<Arc<Spill>> {
        if dir.exists() {
            fs::remove_dir_all(dir)?;
        }
        fs::create_dir_all(dir)?;
        Ok(Arc::new(Spill {
            dir: dir.to_path_buf(),
            max_bytes,
            next: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            lost: AtomicU64::new(0),
        }))
    }

    /// Whether `len` more bytes fit under the bound.
    pub fn has_room(&self, len: usize) -> bool {
        self.bytes() + len as u64 <= self.max_bytes
    }

    /// Writes `payload` to a file of its own.
    pub fn put(self: &Arc<Self>, payload: &[u8]) -> io::Result<Spilled> {
        let n = self.next.fetch_add(1, Ordering::Relaxed);
        let path = self.dir.join(format!("{n:016x}"));
        fs::write(&path, payload)?;
        let len = payload.len() as u64;
        self.bytes.fetch_add(len, Ordering::Relaxed);
        Ok(Spilled {
            spill: self.clone(),
            path,
            len,
        })
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Takes the count of payloads lost since the last call.
    pub fn take_lost(&self) -> u64 {
        self.lost.swap(0, Ordering::Relaxed)
    }
}

impl Spilled {
    /// Reads the payload back (and removes its file). On an error the delivery is lost to this
    /// session: counted, so that the connection renews it and the broker sends it again.
    pub fn take(self) -> io::Result<Bytes> {
        let read = fs::read(&self.path);
        if read.is_err() {
            self.spill.lost.fetch_add(1, Ordering::Relaxed);
        }
        read.map(Bytes::from)
    }
}

impl Drop for Spilled {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
        self.spill.bytes.fetch_sub(self.len, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_come_back_in_full_and_their_files_go() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::open(&dir.path().join("s"), 10).unwrap();
        assert!(spill.has_room(10) && !spill.has_room(11));
        let a = spill.put(b"hello").unwrap();
        let b = spill.put(b"world").unwrap();
        assert_eq!(spill.bytes(), 10);
        assert!(!spill.has_room(1));
        assert_eq!(&b.take().unwrap()[..], b"world");
        assert_eq!(spill.bytes(), 5);
        drop(a); // a delivery dropped at shutdown: its file goes too
        assert_eq!(spill.bytes(), 0);
        assert_eq!(fs::read_dir(dir.path().join("s")).unwrap().count(), 0);
        assert_eq!(spill.take_lost(), 0);
    }

    #[test]
    fn a_payload_that_cannot_be_read_back_is_counted_lost() {
        let dir = tempfile::tempdir().unwrap();
        let spill = Spill::open(dir.path(), 1 << 20).unwrap();
        let a = spill.put(b"x").unwrap();
        fs::remove_file(&a.path).unwrap();
        assert!(a.take().is_err());
        assert_eq!((spill.take_lost(), spill.take_lost()), (1, 0));
        assert_eq!(spill.bytes(), 0);
    }

    #[test]
    fn what_a_previous_run_left_is_removed_at_open() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("0000000000000001"), b"old").unwrap();
        let spill = Spill::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
        assert_eq!(spill.bytes(), 0);
    }
}
