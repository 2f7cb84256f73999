//! The sd_notify protocol, without libsystemd: datagrams such as `READY=1` to the Unix socket
//! named by `$NOTIFY_SOCKET` (a path, or `@name` for the abstract namespace). Outside systemd
//! the variable is unset and every call is a no-op.
//!
//! The socket is non-blocking: a receiver that stops reading (a wedged systemd, a test harness)
//! fills its queue, and a blocking send would then stall the task that sends, which may be the
//! one that stops the node. A message that does not fit is dropped and logged at debug level.

use std::os::unix::net::UnixDatagram;
use std::time::Duration;

pub struct Notifier {
    socket: Option<(UnixDatagram, Target)>,
}

enum Target {
    Path(String),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// Reads `$NOTIFY_SOCKET`; a missing or unusable socket gives a notifier that does nothing.
    pub fn from_env() -> Notifier {
        let target = match std::env::var("NOTIFY_SOCKET") {
            Ok(s) if s.starts_with('@') => Some(Target::Abstract(s.as_bytes()[1..].to_vec())),
            Ok(s) if s.starts_with('/') => Some(Target::Path(s)),
            Ok(s) if !s.is_empty() => {
                log::warn!("NOTIFY_SOCKET={s:?} is neither a path nor @abstract; not notifying");
                None
            }
            _ => None,
        };
        let socket = target.and_then(|t| match unbound_nonblocking() {
            Ok(sock) => Some((sock, t)),
            Err(e) => {
                log::warn!("cannot create the systemd notification socket: {e}");
                None
            }
        });
        Notifier { socket }
    }

    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends `state` (newline-separated `KEY=value` assignments). Failures are logged, not fatal:
    /// a node must not stop taking frames because systemd went away.
    pub fn notify(&self, state: &str) {
        let Some((sock, target)) = &self.socket else {
            return;
        };
        let sent = match target {
            Target::Path(p) => sock.send_to(state.as_bytes(), p),
            Target::Abstract(name) => {
                abstract_addr(name).and_then(|addr| sock.send_to_addr(state.as_bytes(), &addr))
            }
        };
        if let Err(e) = sent {
            log::debug!("sd_notify {state:?}: {e}");
        }
    }

    pub fn ready(&self, status: &str) {
        self.notify(&format!("READY=1\nSTATUS={}", one_line(status)));
    }

    pub fn status(&self, status: &str) {
        self.notify(&format!("STATUS={}", one_line(status)));
    }

    pub fn watchdog(&self) {
        self.notify("WATCHDOG=1");
    }

    pub fn stopping(&self, status: &str) {
        self.notify(&format!("STOPPING=1\nSTATUS={}", one_line(status)));
    }

    /// Asks systemd for more time to stop (`EXTEND_TIMEOUT_USEC`), while draining.
    pub fn extend_timeout(&self, by: Duration) {
        self.notify(&format!("EXTEND_TIMEOUT_USEC={}", by.as_micros()));
    }
}

fn unbound_nonblocking() -> std::io::Result<UnixDatagram> {
    let sock = UnixDatagram::unbound()?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

fn abstract_addr(name: &[u8]) -> std::io::Result<std::os::unix::net::SocketAddr> {
    use std::os::linux::net::SocketAddrExt;
    std::os::unix::net::SocketAddr::from_abstract_name(name)
}

fn one_line(s: &str) -> String {
    s.replace('\n', " ")
}

/// The watchdog interval systemd asks for (`WatchdogSec=`), if it is meant for this process:
/// `$WATCHDOG_USEC`, when `$WATCHDOG_PID` is unset or ours.
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn to_path(path: &std::path::Path) -> Notifier {
        Notifier {
            socket: Some((
                unbound_nonblocking().unwrap(),
                Target::Path(path.to_string_lossy().into_owned()),
            )),
        }
    }

    #[test]
    fn sends_datagrams_to_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let n = to_path(&path);
        n.ready("taking\nframes");
        n.watchdog();
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"READY=1\nSTATUS=taking frames");
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"WATCHDOG=1");
    }

    #[test]
    fn sends_datagrams_to_an_abstract_socket() {
        let name = format!("fovea-test-{}", std::process::id());
        let addr = abstract_addr(name.as_bytes()).unwrap();
        let listener = UnixDatagram::bind_addr(&addr).unwrap();
        listener
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        let n = Notifier {
            socket: Some((
                unbound_nonblocking().unwrap(),
                Target::Abstract(name.into_bytes()),
            )),
        };
        n.stopping("draining");
        let mut buf = [0u8; 256];
        let len = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..len], b"STOPPING=1\nSTATUS=draining");
    }

    #[test]
    fn a_receiver_that_stops_reading_never_blocks_the_sender() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let _deaf = UnixDatagram::bind(&path).unwrap();
        let n = to_path(&path);
        // Far more than a Unix datagram queue holds; each send must return at once.
        let started = std::time::Instant::now();
        for _ in 0..10_000 {
            n.watchdog();
        }
        n.stopping("draining");
        assert!(started.elapsed() < Duration::from_secs(5));
    }

    #[test]
    fn without_a_socket_nothing_happens() {
        let n = Notifier { socket: None };
        assert!(!n.enabled());
        n.ready("x");
    }
}
