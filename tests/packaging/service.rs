//! Standing in for systemd where no systemd runs: starting the installed unit's commands in the
//! scratch root the way systemd would (its environment, an unprivileged user, its umask), and
//! collecting the sd_notify datagrams fovea sends (READY=1, WATCHDOG=1, STOPPING=1).

use crate::chroot::ScratchRoot;
use crate::tools::{Guard, tool};
use std::os::unix::net::UnixDatagram;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How systemd would start the unit's commands, as far as a chroot can: the unit's
/// Environment=, an unprivileged user (DynamicUser=), its UMask=, the state directory created
/// and owned by that user, $HOME=/. Brokers and the metrics endpoint point at free local ports:
/// a box with nothing else installed.
pub(crate) struct ServiceEnv {
    pub(crate) uid: u32,
    pub(crate) umask: String,
    pub(crate) env: Vec<(String, String)>,
}

impl ServiceEnv {
    pub(crate) fn command(
        &self,
        root: &ScratchRoot,
        words: &[String],
        extra_env: &[(&str, String)],
    ) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            // WATCHDOG_PID is the main process, as systemd sets it: sh and chroot exec, so the
            // pid stays the same.
            .arg(r#"umask "$1"; root="$2"; user="$3"; shift 3; export WATCHDOG_PID=$$; exec "$0" --userspec="$user" "$root" "$@""#)
            .arg(tool("chroot"))
            .arg(&self.umask)
            .arg(&root.path)
            .arg(format!("{0}:{0}", self.uid))
            .args(words)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", "/")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// The sd_notify datagrams fovea sends, with the time each arrived.
pub(crate) struct Notifications {
    pub(crate) socket: UnixDatagram,
    pub(crate) got: Vec<(Instant, String)>,
}

impl Notifications {
    /// Waits until a datagram with the line `line` has arrived at or after `since`; returns when.
    pub(crate) fn wait_for(
        &mut self,
        line: &str,
        since: Instant,
        limit: Duration,
        node: &mut Guard,
        log: &Path,
    ) -> Instant {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            if let Some((t, _)) = self
                .got
                .iter()
                .find(|(t, s)| *t >= since && s.lines().any(|l| l == line))
            {
                return *t;
            }
            match self.socket.recv(&mut buf) {
                Ok(n) => self.got.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )),
                Err(_) => {
                    if let Ok(Some(status)) = node.0.try_wait() {
                        panic!(
                            "fovea exited ({status}) before {line}: {:?}\n{}",
                            self.got,
                            std::fs::read_to_string(log).unwrap_or_default()
                        );
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {line} within {limit:?}: {:?}\n{}",
                self.got,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}
