//! Chunks of uploads in progress, on disk under `<state_dir>/chunks`, so that each chunk can be
//! PUBACKed as soon as it is stored instead of when its whole frame is durable. Holding every
//! chunk's ack would need a broker in-flight window larger than the longest upload (mosquitto's
//! default is 20; a 4 MB frame in 128 KB chunks is 31), and an upload longer than the window
//! could never complete.
//!
//! One folder per upload (named by a hash of camera and frame id, which are outside strings),
//! one file per chunk (the `FrameChunk` as received, with the camera id the topic named). A chunk
//! is written to a temporary name, synced, renamed and the folder synced before it is acked: an
//! acked chunk survives a crash or power cut, and a chunk cut short by one is no file at all
//! (its temporary is removed at start; the broker still has it, un-acked). The folder is removed
//! once the frame's records (or its dead letter) are durable; at start, what is left is fed back
//! to the aggregator: complete uploads become frames again, incomplete ones wait for the rest.
//!
//! Plain files rather than sled: chunks are large values that live for seconds, and sled, when
//! its disk fills, can hang on large values (see the spool's module doc); a full disk here is a
//! clean write error, and the chunk's ack is then held with its upload instead.

use sha2::{Digest, Sha256};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone)]
pub struct ChunkStore {
    dir: PathBuf,
}

/// A chunk found at start: its upload folder and the encoded `FrameChunk`.
pub struct Stored {
    pub upload: String,
    pub bytes: Vec<u8>,
}

impl ChunkStore {
    /// Opens (creating) the store in `dir`; returns it with the chunks a previous run left,
    /// grouped by upload and in index order. Unreadable leftovers are removed with a warning.
    pub fn open(dir: &Path) -> io::Result<(ChunkStore, Vec<Stored>)> {
        fs::create_dir_all(dir)?;
        let store = ChunkStore {
            dir: dir.to_path_buf(),
        };
        let mut found = Vec::new();
        let mut uploads: Vec<_> = fs::read_dir(dir)?.filter_map(Result::ok).collect();
        uploads.sort_by_key(|e| e.file_name());
        for upload in uploads {
            let name = upload.file_name().to_string_lossy().into_owned();
            let path = upload.path();
            if !path.is_dir() {
                log::warn!("chunk store: removing stray file {}", path.display());
                let _ = fs::remove_file(&path);
                continue;
            }
            let mut chunks: Vec<(u32, PathBuf)> = Vec::new();
            for entry in fs::read_dir(&path)?.filter_map(Result::ok) {
                let file = entry.path();
                match entry
                    .file_name()
                    .to_str()
                    .and_then(|n| n.parse::<u32>().ok())
                {
                    Some(index) => chunks.push((index, file)),
                    // A temporary cut short by a crash: that chunk was never acked.
                    None => {
                        let _ = fs::remove_file(&file);
                    }
                }
            }
            chunks.sort();
            for (_, file) in chunks {
                match fs::read(&file) {
                    Ok(bytes) => found.push(Stored {
                        upload: name.clone(),
                        bytes,
                    }),
                    Err(e) => log::warn!("chunk store: cannot read {}: {e}", file.display()),
                }
            }
        }
        Ok((store, found))
    }

    /// The folder name of the upload of `frame_id` from `camera`.
    pub fn upload_name(camera: &str, frame_id: &str) -> String {
        let mut h = Sha256::new();
        h.update(camera.as_bytes());
        h.update([0]);
        h.update(frame_id.as_bytes());
        hex::encode(&h.finalize()[..16])
    }

    /// Stores chunk `index` of `upload` durably (blocking: call off the async threads).
    pub fn write(&self, upload: &str, index: u32, bytes: &[u8]) -> io::Result<()> {
        let folder = self.dir.join(upload);
        let fresh = !folder.exists();
        fs::create_dir_all(&folder)?;
        let tmp = folder.join(format!("{index}.tmp"));
        let mut f = fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
        fs::rename(&tmp, folder.join(index.to_string()))?;
        fs::File::open(&folder)?.sync_all()?;
        if fresh {
            fs::File::open(&self.dir)?.sync_all()?;
        }
        Ok(())
    }

    /// Forgets `upload` (its frame or dead letter is durable). Errors are logged: a folder left
    /// behind is assembled again at the next start, a duplicate and never a loss.
    pub fn remove(&self, upload: &str) {
        let folder = self.dir.join(upload);
        if let Err(e) = fs::remove_dir_all(&folder)
            && e.kind() != io::ErrorKind::NotFound
        {
            log::warn!("chunk store: cannot remove {}: {e}", folder.display());
        }
    }

    /// Bytes stored now (for the disk report).
    pub fn bytes(&self) -> u64 {
        let Ok(uploads) = fs::read_dir(&self.dir) else {
            return 0;
        };
        uploads
            .filter_map(Result::ok)
            .filter_map(|u| fs::read_dir(u.path()).ok())
            .flatten()
            .filter_map(|c| c.ok()?.metadata().ok())
            .map(|m| m.len())
            .sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stored_chunks_come_back_in_order_and_removed_ones_do_not() {
        let dir = tempfile::tempdir().unwrap();
        let (store, found) = ChunkStore::open(dir.path()).unwrap();
        assert!(found.is_empty());
        let a = ChunkStore::upload_name("cam", "1");
        let b = ChunkStore::upload_name("cam", "2");
        assert_ne!(a, b);
        store.write(&a, 10, b"ten").unwrap();
        store.write(&a, 2, b"two").unwrap();
        store.write(&b, 0, b"zero").unwrap();
        // A temporary left by a crash mid-write is no chunk.
        fs::write(dir.path().join(&b).join("1.tmp"), b"half").unwrap();
        assert_eq!(store.bytes(), 3 + 3 + 4 + 4);
        store.remove(&b);
        store.remove(&b); // twice is fine
        let (_, found) = ChunkStore::open(dir.path()).unwrap();
        let got: Vec<_> = found
            .iter()
            .map(|s| (s.upload.as_str(), s.bytes.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![(a.as_str(), &b"two"[..]), (a.as_str(), &b"ten"[..])]
        );
    }
}
