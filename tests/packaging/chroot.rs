//! A clean Debian 12 to install the package into: the debootstrap tarball built once and
//! cached, a scratch root extracted from it with /proc mounted, and the careful unmounting and
//! removal a folder holding mounts needs (never deleting through a bind-mounted /dev or /proc).
//! The install test needs all of it; none of it is about fovea.

use crate::tools::{cache_dir, ok, read, run, text, tool};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Instant;

/// Mount points at or under `dir`, deepest first.
pub(crate) fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"));
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            PathBuf::from(
                m.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts
}

pub(crate) fn unmount_all_under(dir: &Path) {
    for m in mounts_under(dir) {
        let status = Command::new(tool("umount")).arg(&m).status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = Command::new(tool("umount")).arg("-l").arg(&m).status();
        }
    }
}

/// Removes a folder that may hold a root file system, never through a mount (a bind-mounted
/// /dev or /proc would take the host's with it): anything still mounted leaves it in place.
pub(crate) fn remove_root(dir: &Path) {
    unmount_all_under(dir);
    let left = mounts_under(dir);
    if left.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        eprintln!(
            "leaving {} in place: still mounted: {left:?}",
            dir.display()
        );
    }
}

/// A tarball of a clean Debian 12 (debootstrap --variant=minbase, the default mirror), built
/// once and cached.
pub(crate) fn clean_debian_tarball() -> PathBuf {
    let arch = ok(Command::new(tool("dpkg")).arg("--print-architecture"))
        .trim()
        .to_string();
    let dir = cache_dir().join("debootstrap");
    std::fs::create_dir_all(&dir).unwrap();
    let tarball = dir.join(format!("bookworm-minbase-{arch}.tar"));
    let lock = std::fs::File::create(dir.join(".lock")).unwrap();
    lock.lock().unwrap(); // one build at a time, across test processes too
    if tarball.is_file() {
        return tarball;
    }
    // Leftovers of an interrupted build (debootstrap mounts /proc and /sys inside).
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("build-")
        {
            remove_root(&path);
        }
    }
    let build = dir.join(format!("build-{}", std::process::id()));
    let started = Instant::now();
    let out = run(Command::new(tool("debootstrap"))
        .args(["--variant=minbase", "bookworm"])
        .arg(&build)
        .stdin(Stdio::null()));
    unmount_all_under(&build);
    if !out.status.success() {
        let log =
            std::fs::read_to_string(build.join("debootstrap/debootstrap.log")).unwrap_or_default();
        remove_root(&build);
        panic!("debootstrap failed: {}\n{log}", text(&out));
    }
    let partial = dir.join(format!(
        "{}.partial",
        tarball.file_name().unwrap().to_string_lossy()
    ));
    ok(Command::new(tool("tar"))
        .arg("--numeric-owner")
        .arg("-C")
        .arg(&build)
        .arg("-cf")
        .arg(&partial)
        .arg("."));
    std::fs::rename(&partial, &tarball).unwrap();
    remove_root(&build);
    eprintln!(
        "debootstrap: clean Debian cached at {} in {:.0} s",
        tarball.display(),
        started.elapsed().as_secs_f64()
    );
    tarball
}

/// A scratch root extracted from the clean tarball, with /proc mounted; unmounted and removed
/// when dropped (the processes run in it must be gone first: declare their guards after it).
pub(crate) struct ScratchRoot {
    pub(crate) path: PathBuf,
}

impl ScratchRoot {
    pub(crate) fn new(tarball: &Path) -> ScratchRoot {
        let path = tempfile::Builder::new()
            .prefix("fovea-scratch-root-")
            .tempdir()
            .unwrap()
            .keep();
        let root = ScratchRoot { path };
        ok(Command::new(tool("tar"))
            .args(["--numeric-owner", "-xpf"])
            .arg(tarball)
            .arg("-C")
            .arg(&root.path));
        ok(Command::new(tool("mount"))
            .args(["-t", "proc", "proc"])
            .arg(root.path.join("proc")));
        // Name resolution for apt, as on the host.
        std::fs::copy("/etc/resolv.conf", root.path.join("etc/resolv.conf")).unwrap();
        root
    }

    pub(crate) fn host_path(&self, inside: &str) -> PathBuf {
        self.path.join(inside.trim_start_matches('/'))
    }

    /// `chroot ROOT args...` as root, with a clean environment.
    pub(crate) fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(tool("chroot"));
        cmd.arg(&self.path)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        cmd
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        remove_root(&self.path);
    }
}
