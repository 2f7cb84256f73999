//! Minimal HTTP/1.1 on tokio: [`serve`] (the blob server) and [`fetch`] (a GET client for
//! `http://` URLs). One request per connection, `Connection: close`; no TLS.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore, watch};
use tokio::task::JoinSet;
use tokio::time::timeout;

use super::{BlobError, BlobStore};

/// The largest request head (request line and headers) the server reads.
pub const MAX_REQUEST_HEAD: u64 = 8 * 1024;
/// How long a client has to send its request head.
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);
/// A response is dropped when its client reads nothing for this long.
const WRITE_STALL: Duration = Duration::from_secs(30);
/// Connections served at once; more wait in the listen backlog.
const MAX_CONNECTIONS: usize = 256;
/// On shutdown, responses in progress get this long to finish.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);
/// Bytes read from a blob file at a time.
const CHUNK: usize = 256 * 1024;
/// The largest response head [`fetch`] reads.
const MAX_RESPONSE_HEAD: u64 = 64 * 1024;

/// Serves `GET`/`HEAD /blobs/<sha256>` and `/healthz` from `store` on `listener` until
/// `shutdown` turns true (or its sender is dropped); then stops accepting and gives the
/// responses in progress [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(store: BlobStore, listener: TcpListener, mut shutdown: watch::Receiver<bool>) {
    let addr = listener.local_addr().ok();
    log::debug!("blobstore: serving on {addr:?}");
    let permits = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            biased;
            () = super::stopped(&mut shutdown) => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            (accepted, permit) = accept(&listener, &permits) => match accepted {
                Ok((stream, peer)) => {
                    let store = store.clone();
                    conns.spawn(async move {
                        handle(&store, stream, peer).await;
                        drop(permit);
                    });
                }
                Err(e) => {
                    // Out of file descriptors, mostly: back off instead of spinning.
                    log::debug!("blobstore: accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    if timeout(SHUTDOWN_GRACE, async {
        while conns.join_next().await.is_some() {}
    })
    .await
    .is_err()
    {
        log::debug!(
            "blobstore: dropping {} connection(s) at shutdown",
            conns.len()
        );
        conns.abort_all();
    }
    log::debug!("blobstore: server on {addr:?} stopped");
}

/// Waits for a connection slot, then for a connection.
async fn accept(
    listener: &TcpListener,
    permits: &Arc<Semaphore>,
) -> (
    io::Result<(TcpStream, SocketAddr)>,
    Option<OwnedSemaphorePermit>,
) {
    // The semaphore is never closed, so acquiring only fails in theory.
    let permit = permits.clone().acquire_owned().await.ok();
    (listener.accept().await, permit)
}

/// Serves one request on `stream`, then closes it.
async fn handle(store: &BlobStore, stream: TcpStream, peer: SocketAddr) {
    let mut conn = BufReader::new(stream);
    let head = timeout(HEAD_TIMEOUT, read_head(&mut conn, MAX_REQUEST_HEAD)).await;
    let (status, line) = match head.map(parse_head) {
        // (Incomplete: only parse_request says so; the timeout stands for it here.)
        Err(_) | Ok(Ok(ParsedRequest::Incomplete)) => (408, "request head timed out".to_string()),
        Ok(Err(e)) => {
            log::debug!("blobstore: {peer}: reading the request: {e}");
            return;
        }
        Ok(Ok(ParsedRequest::Request { method, target })) => {
            let outcome = respond(store, conn.get_mut(), &method, &target).await;
            let line = format!("{method} {target}");
            match outcome {
                Ok((status, sent)) => {
                    log::debug!("blobstore: {peer} {line} -> {status}, {sent} body bytes");
                }
                Err(e) => log::debug!("blobstore: {peer} {line}: response failed: {e}"),
            }
            linger_close(conn).await;
            return;
        }
        Ok(Ok(ParsedRequest::Refused { status, why })) => (status, why),
    };
    log::debug!("blobstore: {peer}: {status}: {line}");
    let _ = send_simple(
        conn.get_mut(),
        status,
        false,
        &format!("{}\n", reason(status)),
    )
    .await;
    linger_close(conn).await;
}

/// Answers one parsed request; returns the status and the body bytes sent.
async fn respond(
    store: &BlobStore,
    out: &mut TcpStream,
    method: &str,
    path: &str,
) -> io::Result<(u16, u64)> {
    let head_only = method == "HEAD";
    let id = match route(method, path) {
        Route::NotFound => return send_simple(out, 404, head_only, "not found\n").await,
        Route::MethodNotAllowed => {
            return send_simple(out, 405, false, "only GET and HEAD are allowed\n").await;
        }
        Route::Health => return send_simple(out, 200, head_only, "ok").await,
        Route::Blob(id) => id,
    };
    let Ok(file_path) = store.blob_path(id) else {
        let body = "malformed blob id: expected 64 lowercase hex digits\n";
        return send_simple(out, 400, head_only, body).await;
    };
    let mut file = match tokio::fs::File::open(&file_path).await {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return send_simple(out, 404, head_only, "no such blob\n").await;
        }
        Err(e) => {
            log::debug!("blobstore: cannot open {}: {e}", file_path.display());
            return send_simple(out, 500, head_only, "cannot read the blob\n").await;
        }
    };
    let len = file.metadata().await?.len();
    let head = format!(
        "HTTP/1.1 200 OK\r\nContent-Type: application/octet-stream\r\nContent-Length: {len}\r\n\
         ETag: \"{id}\"\r\nCache-Control: public, max-age=31536000, immutable\r\n\
         Connection: close\r\n\r\n"
    );
    write_stalling(out, head.as_bytes()).await?;
    if head_only {
        return Ok((200, 0));
    }
    // A renamed-over or pruned file stays readable through our open handle: len holds.
    let mut buf = vec![0; CHUNK];
    let mut sent = 0;
    while sent < len {
        let want = CHUNK.min(usize::try_from(len - sent).unwrap_or(CHUNK));
        let n = file.read(&mut buf[..want]).await?;
        if n == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "blob file shrank",
            ));
        }
        write_stalling(out, &buf[..n]).await?;
        sent += n as u64;
    }
    Ok((200, sent))
}

/// What a request asks the blob server for, from its method and target (query ignored).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route<'a> {
    /// Neither `/healthz` nor under `/blobs/`: 404.
    NotFound,
    /// A known path with a method other than GET or HEAD: 405.
    MethodNotAllowed,
    /// `/healthz`: 200.
    Health,
    /// `/blobs/<id>`, the id as sent (the store checks it is a SHA-256 before it names a file).
    Blob(&'a str),
}

/// The blob server's routing.
pub fn route<'a>(method: &str, target: &'a str) -> Route<'a> {
    let path = target.split('?').next().unwrap_or(target);
    let blob_id = path.strip_prefix("/blobs/");
    if path != "/healthz" && blob_id.is_none() {
        return Route::NotFound;
    }
    if method != "GET" && method != "HEAD" {
        return Route::MethodNotAllowed;
    }
    blob_id.map_or(Route::Health, Route::Blob)
}

/// What a server makes of the bytes a client sent ([`parse_request`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ParsedRequest {
    /// A request line to answer (route it with [`route`]).
    Request { method: String, target: String },
    /// Answered with `status` (400: malformed request line; 431: head over 8 KiB), unrouted.
    Refused { status: u16, why: String },
    /// The bytes end before the head's empty line: a server waits for more, then answers 408
    /// (or closes, if the client closed).
    Incomplete,
}

/// The blob server's request parsing as a pure function of the bytes a client sent: the head
/// read by the same `read_head`, with the same 8 KiB limit, then `parse_request_line` (the
/// `/metrics` endpoint reads its requests with the same two). For the fuzz target (`fuzz/`) and
/// tests; the servers read from their connections, with a timeout.
pub fn parse_request(bytes: &[u8]) -> ParsedRequest {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    let mut rest = bytes;
    let head = std::pin::pin!(read_head(&mut rest, MAX_REQUEST_HEAD));
    // Reading a slice never waits, so one poll finishes.
    let Poll::Ready(head) = head.poll(&mut Context::from_waker(Waker::noop())) else {
        return ParsedRequest::Incomplete;
    };
    parse_head(head).unwrap_or(ParsedRequest::Incomplete)
}

/// A head as `read_head` returned it: the request line, or the status to refuse it with; the
/// read's I/O error (the client went away) as such.
fn parse_head(head: Result<Vec<String>, HeadError>) -> io::Result<ParsedRequest> {
    Ok(match head {
        Err(HeadError::TooLarge) => ParsedRequest::Refused {
            status: 431,
            why: "request head too large".to_string(),
        },
        Err(HeadError::Io(e)) => return Err(e),
        Ok(lines) => match parse_request_line(&lines[0]) {
            Some((method, target)) => ParsedRequest::Request {
                method: method.to_string(),
                target: target.to_string(),
            },
            None => ParsedRequest::Refused {
                status: 400,
                why: format!("malformed request line {:?}", lines[0]),
            },
        },
    })
}

/// Sends a short text response (`head_only`: without its body).
async fn send_simple(
    out: &mut TcpStream,
    status: u16,
    head_only: bool,
    body: &str,
) -> io::Result<(u16, u64)> {
    let allow = if status == 405 {
        "Allow: GET, HEAD\r\n"
    } else {
        ""
    };
    let mut response = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Length: {}\r\n\
         {allow}Connection: close\r\n\r\n",
        reason(status),
        body.len()
    );
    if !head_only {
        response.push_str(body);
    }
    write_stalling(out, response.as_bytes()).await?;
    Ok((status, if head_only { 0 } else { body.len() as u64 }))
}

/// `write_all`, failing when the peer takes nothing for [`WRITE_STALL`].
pub(crate) async fn write_stalling(out: &mut TcpStream, bytes: &[u8]) -> io::Result<()> {
    timeout(WRITE_STALL, out.write_all(bytes))
        .await
        .map_err(|_| io::Error::new(io::ErrorKind::TimedOut, "client stopped reading"))?
}

/// Closes after a response: FIN first, then reads (and drops) what the client still sends for
/// up to a second, so that unread request bytes do not turn the close into a reset that could
/// destroy the response before the client read it.
pub(crate) async fn linger_close(mut conn: BufReader<TcpStream>) {
    if conn.get_mut().shutdown().await.is_err() {
        return;
    }
    let _ = timeout(Duration::from_secs(1), async {
        let mut sink = [0; 4096];
        let mut total = 0;
        while total < 1024 * 1024 {
            match conn.read(&mut sink).await {
                Ok(0) | Err(_) => break,
                Ok(n) => total += n,
            }
        }
    })
    .await;
}

pub(crate) fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        431 => "Request Header Fields Too Large",
        503 => "Service Unavailable",
        _ => "Internal Server Error",
    }
}

/// `METHOD /path HTTP/1.x` -> (method, path).
pub(crate) fn parse_request_line(line: &str) -> Option<(&str, &str)> {
    let mut parts = line.split(' ');
    let (method, target, version) = (parts.next()?, parts.next()?, parts.next()?);
    let ok = parts.next().is_none()
        && !method.is_empty()
        && method.bytes().all(|b| b.is_ascii_uppercase())
        && target.starts_with('/')
        && version.starts_with("HTTP/1.");
    ok.then_some((method, target))
}

pub(crate) enum HeadError {
    TooLarge,
    Io(io::Error),
}

/// Reads a message head: lines up to the empty one, at most `limit` bytes in all. Returns the
/// lines without their line ends; the first is the request or status line.
pub(crate) async fn read_head<R: AsyncBufRead + Unpin>(
    r: &mut R,
    limit: u64,
) -> Result<Vec<String>, HeadError> {
    let mut lines = Vec::new();
    let mut used = 0;
    loop {
        let mut line = Vec::new();
        let n = (&mut *r)
            .take(limit - used)
            .read_until(b'\n', &mut line)
            .await
            .map_err(HeadError::Io)?;
        used += n as u64;
        if line.last() != Some(&b'\n') {
            return Err(if used >= limit {
                HeadError::TooLarge
            } else {
                HeadError::Io(io::ErrorKind::UnexpectedEof.into())
            });
        }
        let text = String::from_utf8_lossy(&line);
        let text = text.trim_end_matches(['\r', '\n']);
        if text.is_empty() {
            if lines.is_empty() {
                continue; // a stray line end before the first line is allowed
            }
            return Ok(lines);
        }
        lines.push(text.to_string());
    }
}

/// Fetches `url` (`http://host[:port]/path`) with one GET and returns the body of a 200
/// response, at most `max_bytes` of it, all within `limit`. The caller verifies the content.
pub async fn fetch(url: &str, max_bytes: u64, limit: Duration) -> Result<Vec<u8>, BlobError> {
    let target = Target::parse(url)?;
    timeout(limit, fetch_within(url, &target, max_bytes))
        .await
        .unwrap_or_else(|_| {
            Err(BlobError::Timeout {
                url: url.to_string(),
                after: limit,
            })
        })
}

async fn fetch_within(url: &str, t: &Target<'_>, max_bytes: u64) -> Result<Vec<u8>, BlobError> {
    let transport = |source| BlobError::Transport {
        url: url.to_string(),
        source,
    };
    let bad = |detail: String| BlobError::BadResponse {
        url: url.to_string(),
        detail,
    };
    let mut stream = TcpStream::connect((t.host, t.port))
        .await
        .map_err(transport)?;
    let _ = stream.set_nodelay(true);
    let request = format!(
        "GET {} HTTP/1.1\r\nHost: {}\r\nUser-Agent: fovea/{}\r\nAccept: */*\r\n\
         Connection: close\r\n\r\n",
        t.path,
        t.authority,
        env!("CARGO_PKG_VERSION")
    );
    stream
        .write_all(request.as_bytes())
        .await
        .map_err(transport)?;
    let mut conn = BufReader::new(stream);
    let lines = match read_head(&mut conn, MAX_RESPONSE_HEAD).await {
        Ok(lines) => lines,
        Err(HeadError::TooLarge) => return Err(bad("response head over 64 KiB".into())),
        Err(HeadError::Io(e)) => return Err(transport(e)),
    };
    let head = ResponseHead::parse(&lines).map_err(bad)?;
    if head.status != 200 {
        return Err(BlobError::Status {
            url: url.to_string(),
            status: head.status,
            reason: head.reason,
        });
    }
    let too_large = || BlobError::TooLarge {
        url: url.to_string(),
        limit: max_bytes,
    };
    let mut body = Vec::new();
    if head.chunked {
        read_chunked(&mut conn, max_bytes, &mut body)
            .await
            .map_err(|e| match e {
                ChunkError::TooLarge => too_large(),
                ChunkError::Bad(detail) => bad(detail),
                ChunkError::Io(e) => transport(e),
            })?;
    } else if let Some(len) = head.content_length {
        if len > max_bytes {
            return Err(too_large());
        }
        body.reserve_exact(usize::try_from(len).map_err(|_| too_large())?);
        (&mut conn)
            .take(len)
            .read_to_end(&mut body)
            .await
            .map_err(transport)?;
        if (body.len() as u64) < len {
            let got = body.len();
            return Err(bad(format!("connection closed after {got} of {len} bytes")));
        }
    } else {
        let mut read = (&mut conn).take(max_bytes.saturating_add(1));
        read.read_to_end(&mut body).await.map_err(transport)?;
        if body.len() as u64 > max_bytes {
            return Err(too_large());
        }
    }
    Ok(body)
}

/// The parts of an `http://` URL that a GET needs.
struct Target<'a> {
    /// `host[:port]` as written: the Host header.
    authority: &'a str,
    host: &'a str,
    port: u16,
    /// Path and query (fragment dropped), `/` if none.
    path: String,
}

impl<'a> Target<'a> {
    fn parse(url: &'a str) -> Result<Target<'a>, BlobError> {
        let bad = |reason| BlobError::BadUrl {
            url: url.to_string(),
            reason,
        };
        let rest = url
            .strip_prefix("http://")
            .ok_or_else(|| bad("only http://host:port/path URLs are supported"))?;
        let rest = rest.split('#').next().unwrap_or(rest);
        let (authority, path) = match rest.find(['/', '?']) {
            Some(i) if rest[i..].starts_with('/') => (&rest[..i], rest[i..].to_string()),
            Some(i) => (&rest[..i], format!("/{}", &rest[i..])),
            None => (rest, "/".to_string()),
        };
        if path.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(bad("the path contains spaces or control characters"));
        }
        if authority.is_empty() || authority.contains('@') {
            return Err(bad("expected a host (and no user name)"));
        }
        let (host, port) = if let Some(v6) = authority.strip_prefix('[') {
            let (host, after) = v6
                .split_once(']')
                .ok_or_else(|| bad("unclosed [ in host"))?;
            (host, after.strip_prefix(':'))
        } else {
            match authority.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (authority, None),
            }
        };
        let port = match port {
            None => 80,
            Some(p) => p
                .parse::<u16>()
                .ok()
                .filter(|&p| p != 0)
                .ok_or_else(|| bad("the port is not a number from 1 to 65535"))?,
        };
        if host.is_empty() {
            return Err(bad("expected a host"));
        }
        Ok(Target {
            authority,
            host,
            port,
            path,
        })
    }
}

/// What [`fetch`] needs from a response head.
struct ResponseHead {
    status: u16,
    reason: String,
    content_length: Option<u64>,
    chunked: bool,
}

impl ResponseHead {
    fn parse(lines: &[String]) -> Result<ResponseHead, String> {
        let status_line = &lines[0];
        let mut parts = status_line.splitn(3, ' ');
        let version = parts.next().unwrap_or_default();
        let status = parts.next().and_then(|s| s.parse::<u16>().ok());
        let (true, Some(status)) = (version.starts_with("HTTP/1."), status) else {
            return Err(format!("not an HTTP/1.x status line: {status_line:?}"));
        };
        let mut head = ResponseHead {
            status,
            reason: parts.next().unwrap_or_default().to_string(),
            content_length: None,
            chunked: false,
        };
        let mut transfer_encoding = false;
        for line in &lines[1..] {
            let Some((name, value)) = line.split_once(':') else {
                return Err(format!("malformed header line {line:?}"));
            };
            let value = value.trim();
            if name.eq_ignore_ascii_case("content-length") {
                let len = value
                    .parse::<u64>()
                    .map_err(|_| format!("bad Content-Length {value:?}"))?;
                if head.content_length.is_some_and(|l| l != len) {
                    return Err("conflicting Content-Length headers".into());
                }
                head.content_length = Some(len);
            } else if name.eq_ignore_ascii_case("transfer-encoding") {
                transfer_encoding = true;
                let last = value.rsplit(',').next().unwrap_or_default().trim();
                head.chunked = last.eq_ignore_ascii_case("chunked");
            }
        }
        if transfer_encoding {
            // The transfer coding decides the framing (RFC 9112 6.3); otherwise: until close.
            head.content_length = None;
        }
        Ok(head)
    }
}

enum ChunkError {
    TooLarge,
    Bad(String),
    Io(io::Error),
}

/// Decodes a chunked body into `body`, at most `max_bytes` of it.
async fn read_chunked<R: AsyncBufRead + Unpin>(
    r: &mut R,
    max_bytes: u64,
    body: &mut Vec<u8>,
) -> Result<(), ChunkError> {
    loop {
        let line = read_line(r).await?;
        let size = line.split(';').next().unwrap_or_default().trim();
        let size = u64::from_str_radix(size, 16)
            .map_err(|_| ChunkError::Bad(format!("bad chunk size line {line:?}")))?;
        if size == 0 {
            // Trailers, up to the empty line.
            for _ in 0..100 {
                if read_line(r).await?.is_empty() {
                    return Ok(());
                }
            }
            return Err(ChunkError::Bad("too many trailer lines".into()));
        }
        if (body.len() as u64).saturating_add(size) > max_bytes {
            return Err(ChunkError::TooLarge);
        }
        let start = body.len();
        (&mut *r)
            .take(size)
            .read_to_end(body)
            .await
            .map_err(ChunkError::Io)?;
        if ((body.len() - start) as u64) < size || !read_line(r).await?.is_empty() {
            return Err(ChunkError::Bad("truncated or malformed chunk".into()));
        }
    }
}

/// One line of a chunked body (at most 4 KiB), without its line end.
async fn read_line<R: AsyncBufRead + Unpin>(r: &mut R) -> Result<String, ChunkError> {
    let mut line = Vec::new();
    (&mut *r)
        .take(4096)
        .read_until(b'\n', &mut line)
        .await
        .map_err(ChunkError::Io)?;
    if line.last() != Some(&b'\n') {
        return Err(ChunkError::Bad(
            "chunk framing line missing or too long".into(),
        ));
    }
    let text = String::from_utf8_lossy(&line);
    Ok(text.trim_end_matches(['\r', '\n']).to_string())
}
