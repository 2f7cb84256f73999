//! The operator's HTTP endpoint: `GET /metrics` (Prometheus), `/healthz` (200 unless a stage is
//! stalled) and `/readyz` (200 when ready, else 503; both bodies say why). One request per
//! connection, answered from memory; the HTTP plumbing is the blob server's
//! ([`crate::blobstore::http`]).

use super::health::Health;
use crate::blobstore::http::{
    HeadError, linger_close, parse_request_line, read_head, reason, write_stalling,
};
use crate::metrics::exposition::{self, CONTENT_TYPE, Process};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::BufReader;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};
use tokio::time::timeout;

const MAX_REQUEST_HEAD: u64 = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(5);
/// Scrapes served at once; a scrape storm must not cost the pipeline memory.
const MAX_CONNECTIONS: usize = 16;

/// Serves until `shutdown` turns true. The endpoint keeps answering while the node drains, so
/// the last figures can still be scraped.
pub async fn serve(
    listener: TcpListener,
    health: Health,
    process: Arc<Process>,
    mut shutdown: watch::Receiver<bool>,
) {
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            accepted = listener.accept() => accepted,
        };
        match accepted {
            Ok((stream, _)) => {
                let Ok(permit) = permits.clone().try_acquire_owned() else {
                    continue; // dropped: too many scrapes at once
                };
                let (health, process) = (health.clone(), process.clone());
                tokio::spawn(async move {
                    handle(stream, &health, &process).await;
                    drop(permit);
                });
            }
            Err(e) => {
                log::debug!("metrics: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

async fn handle(stream: TcpStream, health: &Health, process: &Process) {
    let mut conn = BufReader::new(stream);
    let (status, content_type, body) =
        match timeout(HEAD_TIMEOUT, read_head(&mut conn, MAX_REQUEST_HEAD)).await {
            Err(_) => (408, "text/plain", "request head timed out\n".to_string()),
            Ok(Err(HeadError::TooLarge)) => (431, "text/plain", "request head too large\n".into()),
            Ok(Err(HeadError::Io(_))) => return,
            Ok(Ok(lines)) => match parse_request_line(&lines[0]) {
                Some(("GET", path)) => route(path, health, process),
                Some(_) => (405, "text/plain", "only GET is allowed\n".into()),
                None => (400, "text/plain", "malformed request line\n".into()),
            },
        };
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Cache-Control: no-store\r\nConnection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    let out = conn.get_mut();
    if write_stalling(out, head.as_bytes()).await.is_ok() {
        let _ = write_stalling(out, body.as_bytes()).await;
    }
    linger_close(conn).await;
}

fn route(path: &str, health: &Health, process: &Process) -> (u16, &'static str, String) {
    match path.split('?').next().unwrap_or(path) {
        "/metrics" => (200, CONTENT_TYPE, exposition::render(health, process)),
        "/healthz" => match health.live() {
            Ok(()) => (200, "text/plain", "ok\n".into()),
            Err(why) => (503, "text/plain", format!("stalled: {why}\n")),
        },
        "/readyz" => {
            let status = if health.ready() { 200 } else { 503 };
            (status, "text/plain", health.report())
        }
        _ => (
            404,
            "text/plain",
            "not found: try /metrics, /healthz or /readyz\n".into(),
        ),
    }
}
