//! A throttling TCP proxy for the slow-broker test: forwards every connection to `upstream`,
//! holding each chunk for `delay` and pacing each direction to `bytes_per_sec`, both switchable
//! while running (zero: no delay, no cap). Threads, one pair per connection; a chunk is at most
//! 16 KiB, so a cap also slows a single large request down rather than only the next one.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

#[derive(Default)]
struct Throttle {
    delay_ms: AtomicU64,
    bytes_per_sec: AtomicU64,
    stop: AtomicBool,
}

pub struct SlowProxy {
    pub port: u16,
    throttle: Arc<Throttle>,
}

impl SlowProxy {
    /// Listens on `port` (loopback) and forwards to `127.0.0.1:upstream`; starts fast.
    pub fn start(port: u16, upstream: u16) -> SlowProxy {
        let listener = TcpListener::bind(("127.0.0.1", port)).expect("proxy port");
        let throttle = Arc::new(Throttle::default());
        let t = throttle.clone();
        std::thread::spawn(move || {
            for client in listener.incoming() {
                if t.stop.load(Ordering::Relaxed) {
                    break;
                }
                let Ok(client) = client else { continue };
                let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
                    continue; // the broker is down: the client sees a closed connection
                };
                let _ = (client.set_nodelay(true), server.set_nodelay(true));
                for (from, to) in [
                    (client.try_clone(), server.try_clone()),
                    (server.try_clone(), client.try_clone()),
                ] {
                    if let (Ok(from), Ok(to)) = (from, to) {
                        let t = t.clone();
                        std::thread::spawn(move || pump(from, to, &t));
                    }
                }
            }
        });
        SlowProxy { port, throttle }
    }

    /// Holds each chunk `delay` and caps each direction at `bytes_per_sec` (0: no cap).
    pub fn set_slow(&self, delay: Duration, bytes_per_sec: u64) {
        self.throttle
            .delay_ms
            .store(delay.as_millis() as u64, Ordering::Relaxed);
        self.throttle
            .bytes_per_sec
            .store(bytes_per_sec, Ordering::Relaxed);
    }

    pub fn set_fast(&self) {
        self.set_slow(Duration::ZERO, 0);
    }
}

impl Drop for SlowProxy {
    fn drop(&mut self) {
        self.throttle.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port)); // wake the accept loop
    }
}

fn pump(mut from: TcpStream, mut to: TcpStream, t: &Throttle) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let delay = t.delay_ms.load(Ordering::Relaxed);
        let bps = t.bytes_per_sec.load(Ordering::Relaxed);
        let pace = (n as u64 * 1000).checked_div(bps).unwrap_or(0);
        if delay + pace > 0 {
            std::thread::sleep(Duration::from_millis(delay + pace));
        }
        if to.write_all(&buf[..n]).is_err() || t.stop.load(Ordering::Relaxed) {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
    let _ = from.shutdown(Shutdown::Read);
}
