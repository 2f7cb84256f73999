//! The plumbing every packaging test leans on: where the cache and nisshi are, finding a system
//! tool (failing with the fix when it is missing), running commands and reading files with
//! panics that say what failed, and a child process killed on drop. Kept apart so that the
//! test file and the other helpers read as checks, not as error handling.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output};
use std::time::{Duration, Instant};

pub(crate) fn cache_dir() -> PathBuf {
    std::env::var_os("FOVEA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/fovea")
        })
}

pub(crate) fn nisshi_bin() -> PathBuf {
    let path = std::env::var_os("FOVEA_NISSHI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("nisshi/bin/nisshi"));
    assert!(
        path.exists(),
        "{} not found (set FOVEA_NISSHI_BIN, or run scripts/install-deps.sh)",
        path.display()
    );
    path
}

/// A system tool; its absence fails the test with the fix.
pub(crate) fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} not found: run scripts/install-deps.sh (its packaging tools block)");
}

pub(crate) fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
pub(crate) fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

pub(crate) fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

pub(crate) fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

pub(crate) fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A child process killed (SIGKILL) when dropped.
pub(crate) struct Guard(pub(crate) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(crate) fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status}");
        }
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}
