//! Reading the disk for the budget: the bytes a folder holds, and the free space and identity of
//! the filesystem a (possibly not yet created) folder will live on.

use super::budget::{Measured, Part};
use std::os::unix::fs::MetadataExt;
use std::path::Path;

/// Bytes allocated on disk to the files under `dir` (blocks, not lengths: sled's sparse files and
/// SQLite's free pages count as what they take). `None` when `dir` cannot be read.
pub fn dir_bytes(dir: &Path) -> Option<u64> {
    let mut total = 0u64;
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).ok()? {
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                stack.push(entry.path());
            } else {
                total += meta.blocks() * 512;
            }
        }
    }
    Some(total)
}

/// The nearest folder at or above `path` that exists (a state folder is created at start, so
/// before that its filesystem is its parent's).
fn existing_ancestor(path: &Path) -> &Path {
    path.ancestors()
        .find(|p| p.exists())
        .unwrap_or(Path::new("/"))
}

/// The filesystem and free space for `part`, and what it holds now.
pub fn measure(part: &Part) -> Measured {
    let at = existing_ancestor(&part.path);
    Measured {
        filesystem: std::fs::metadata(at).map(|m| m.dev()).unwrap_or(0),
        free: fs2::available_space(at).unwrap_or(0),
        used: if !part.own_folder {
            None
        } else if part.path.exists() {
            dir_bytes(&part.path)
        } else {
            Some(0)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_nested_files_and_reads_missing_folders_as_empty() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/x"), vec![1u8; 10_000]).unwrap();
        std::fs::write(dir.path().join("y"), vec![1u8; 5_000]).unwrap();
        let bytes = dir_bytes(dir.path()).unwrap();
        assert!((15_000..=32_768).contains(&bytes), "{bytes}");
        let part = Part {
            name: "spool",
            path: dir.path().join("not/yet"),
            budget: Some(1),
            basis: String::new(),
            own_folder: true,
        };
        let m = measure(&part);
        assert_eq!(m.used, Some(0));
        assert!(m.free > 0);
        assert_eq!(m.filesystem, std::fs::metadata(dir.path()).unwrap().dev());
    }
}
