//! The blob store against real files in temporary folders, and its HTTP server and client over
//! real TCP on 127.0.0.1.

use std::fs::{self, File};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use super::*;

const HOUR: Duration = Duration::from_secs(3600);
const MB20: usize = 20 * 1024 * 1024;

fn open(dir: &Path, max_bytes: u64, retention: Duration) -> BlobStore {
    BlobStore::open(BlobStoreOptions {
        dir: dir.to_path_buf(),
        max_bytes,
        retention,
    })
    .unwrap()
}

fn open_default(dir: &Path) -> BlobStore {
    open(dir, u64::MAX, HOUR)
}

/// Deterministic pseudo-random bytes (xorshift), different for each seed.
fn bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Files in `dir` other than the lock file.
fn files(dir: &Path) -> Vec<String> {
    let mut names: Vec<String> = fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .filter(|n| n != ".lock")
        .collect();
    names.sort();
    names
}

fn set_age(dir: &Path, id: &str, age: Duration) {
    let file = File::options().write(true).open(dir.join(id)).unwrap();
    file.set_modified(SystemTime::now() - age).unwrap();
}

#[test]
fn put_get_round_trip_is_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let small = b"a small frame".to_vec();
    let big = bytes(MB20, 1);
    let small_id = store.put(&small).unwrap();
    let big_id = store.put(&big).unwrap();
    assert_eq!(small_id, hex::encode(Sha256::digest(&small)));
    assert_eq!(big_id, hex::encode(Sha256::digest(&big)));
    assert!(store.get(&small_id).unwrap().unwrap() == small);
    assert!(store.get(&big_id).unwrap().unwrap() == big);
    assert_eq!(store.stats(), (2, (small.len() + big.len()) as u64));
    let empty_id = store.put(b"").unwrap();
    assert_eq!(store.get(&empty_id).unwrap().unwrap(), b"");
    let unknown = "0".repeat(64);
    assert!(store.get(&unknown).unwrap().is_none());
}

#[test]
fn same_content_twice_is_one_file() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let data = bytes(1000, 2);
    let first = store.put(&data).unwrap();
    let second = store.put(&data).unwrap();
    assert_eq!(first, second);
    assert_eq!(files(tmp.path()), vec![first]);
    assert_eq!(store.stats(), (1, 1000));
}

#[test]
fn concurrent_puts_of_the_same_content_store_one_file() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let data = bytes(300_000, 20);
    let ids: Vec<String> = std::thread::scope(|s| {
        let puts: Vec<_> = (0..8)
            .map(|_| s.spawn(|| store.put(&data).unwrap()))
            .collect();
        puts.into_iter().map(|p| p.join().unwrap()).collect()
    });
    assert!(ids.iter().all(|id| *id == ids[0]));
    assert_eq!(files(tmp.path()), vec![ids[0].clone()]);
    assert_eq!(store.stats(), (1, 300_000));
}

#[test]
fn a_damaged_blob_is_replaced_by_the_next_put() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let data = bytes(5000, 21);
    let id = store.put(&data).unwrap();
    fs::write(tmp.path().join(&id), &data[..100]).unwrap(); // e.g. truncated by a disk fault
    drop(store);
    let store = open_default(tmp.path());
    assert_eq!(store.stats(), (1, 100));
    assert_eq!(store.put(&data).unwrap(), id);
    assert!(store.get(&id).unwrap().unwrap() == data);
    assert_eq!(store.stats(), (1, 5000));
}

#[test]
fn bad_ids_are_rejected() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let id = store.put(b"x").unwrap();
    let long = format!("{id}0");
    let traversal = format!("../{}", &id[3..]);
    for bad in [
        "../x",
        "",
        "abc",
        &id.to_uppercase(),
        &id[..63],
        &long,
        &traversal,
        &format!("{}g", &id[..63]),
        &format!("{}/", &id[..63]),
    ] {
        let err = store.get(bad).unwrap_err();
        assert!(matches!(err, BlobError::InvalidId { .. }), "{bad:?}: {err}");
    }
}

#[test]
fn prune_deletes_blobs_older_than_retention() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), u64::MAX, HOUR);
    let old = store.put(&bytes(100, 3)).unwrap();
    let fresh = store.put(&bytes(200, 4)).unwrap();
    set_age(tmp.path(), &old, 2 * HOUR);
    assert_eq!(store.prune().unwrap(), (1, 100));
    assert_eq!(files(tmp.path()), vec![fresh.clone()]);
    assert_eq!(store.stats(), (1, 200));
    assert_eq!(store.prune().unwrap(), (0, 0));
    drop(store);

    // A tiny retention: everything goes.
    let store = open(tmp.path(), u64::MAX, Duration::from_millis(1));
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(store.prune().unwrap(), (1, 200));
    assert_eq!(store.stats(), (0, 0));
    assert!(files(tmp.path()).is_empty());
}

#[test]
fn putting_again_refreshes_the_age() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), u64::MAX, HOUR);
    let data = bytes(100, 5);
    let id = store.put(&data).unwrap();
    set_age(tmp.path(), &id, 2 * HOUR);
    assert_eq!(store.put(&data).unwrap(), id);
    assert_eq!(store.prune().unwrap(), (0, 0));
    assert_eq!(store.stats(), (1, 100));
}

#[test]
fn prune_by_size_deletes_oldest_first() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), 2500, HOUR);
    let ids: Vec<String> = (0..3)
        .map(|i| store.put(&bytes(1000, 10 + i)).unwrap())
        .collect();
    // ids[0] oldest, ids[2] newest; hashes sort otherwise, so the order is the mtime's.
    for (id, minutes) in ids.iter().zip([30, 20, 10]) {
        set_age(tmp.path(), id, Duration::from_secs(minutes * 60));
    }
    assert_eq!(store.stats(), (3, 3000));
    assert_eq!(store.prune().unwrap(), (1, 1000));
    let mut left = vec![ids[1].clone(), ids[2].clone()];
    left.sort();
    assert_eq!(files(tmp.path()), left);
    drop(store);

    let store = open(tmp.path(), 1000, HOUR);
    assert_eq!(store.prune().unwrap(), (1, 1000));
    assert_eq!(files(tmp.path()), vec![ids[2].clone()]);
    assert_eq!(store.stats(), (1, 1000));
}

#[test]
fn open_cleans_crash_leftovers_and_counts_blobs() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let a = store.put(&bytes(300, 6)).unwrap();
    let b = store.put(&bytes(700, 7)).unwrap();
    drop(store);
    // What a crash in the middle of a put leaves: a temp file, maybe half written.
    fs::write(tmp.path().join(".tmp-4242-0"), bytes(500, 8)).unwrap();
    fs::write(tmp.path().join(".tmp-4242-1"), b"").unwrap();
    fs::write(tmp.path().join("README"), b"not a blob").unwrap();

    let store = open_default(tmp.path());
    let mut expected = vec![a, b, "README".to_string()];
    expected.sort();
    assert_eq!(files(tmp.path()), expected);
    assert_eq!(store.stats(), (2, 1000));
}

#[test]
fn a_store_in_use_cannot_be_opened_again() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let err = BlobStore::open(BlobStoreOptions {
        dir: tmp.path().to_path_buf(),
        max_bytes: 1,
        retention: HOUR,
    })
    .err()
    .unwrap();
    assert!(matches!(err, BlobError::Locked { .. }), "{err}");
    drop(store);
    open_default(tmp.path());
}

#[test]
fn blob_url_joins_base_and_id() {
    assert_eq!(
        blob_url("http://10.0.0.5:8088", "ab"),
        "http://10.0.0.5:8088/blobs/ab"
    );
    assert_eq!(blob_url("http://h:1/", "ab"), "http://h:1/blobs/ab");
}

/// A server on 127.0.0.1:0 for `store`.
struct Server {
    addr: SocketAddr,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

async fn start(store: &BlobStore) -> Server {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(serve(store.clone(), listener, rx));
    Server { addr, stop, task }
}

impl Server {
    fn url(&self, id: &str) -> String {
        blob_url(&format!("http://{}", self.addr), id)
    }

    async fn stop(self) {
        self.stop.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(10), self.task)
            .await
            .unwrap()
            .unwrap();
    }
}

/// A response read to the end: status, headers (lowercase names), body.
struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        let found = self.headers.iter().find(|(n, _)| n == name);
        found.map(|(_, v)| v.as_str())
    }
}

/// Sends `request` as is and reads the response until the server closes.
async fn raw(addr: SocketAddr, request: &[u8]) -> Response {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(request).await.unwrap();
    let mut all = Vec::new();
    s.read_to_end(&mut all).await.unwrap();
    let end = all.windows(4).position(|w| w == b"\r\n\r\n").unwrap();
    let head = String::from_utf8(all[..end].to_vec()).unwrap();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .unwrap()
        .split(' ')
        .nth(1)
        .unwrap()
        .parse()
        .unwrap();
    let headers = lines
        .map(|l| {
            let (n, v) = l.split_once(':').unwrap();
            (n.to_ascii_lowercase(), v.trim().to_string())
        })
        .collect();
    Response {
        status,
        headers,
        body: all[end + 4..].to_vec(),
    }
}

async fn get(addr: SocketAddr, method: &str, path: &str) -> Response {
    let request = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n\r\n");
    raw(addr, request.as_bytes()).await
}

#[tokio::test]
async fn server_answers_every_kind_of_request() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let data = bytes(100_000, 9);
    let id = store.put(&data).unwrap();
    let server = start(&store).await;
    let addr = server.addr;
    let path = format!("/blobs/{id}");

    let ok = get(addr, "GET", &path).await;
    assert_eq!(ok.status, 200);
    assert_eq!(ok.header("content-type"), Some("application/octet-stream"));
    assert_eq!(ok.header("content-length"), Some("100000"));
    assert!(ok.body == data);

    let head = get(addr, "HEAD", &path).await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("100000"));
    assert!(head.body.is_empty());

    assert_eq!(
        get(addr, "GET", &format!("/blobs/{}", "0".repeat(64)))
            .await
            .status,
        404
    );
    for malformed in [
        "/blobs/../x",
        "/blobs/ABC",
        "/blobs/",
        "/blobs/%2e%2e%2fetc",
    ] {
        assert_eq!(get(addr, "GET", malformed).await.status, 400, "{malformed}");
    }
    let upper = format!("/blobs/{}", id.to_uppercase());
    assert_eq!(get(addr, "GET", &upper).await.status, 400);

    let post = raw(
        addr,
        format!("POST {path} HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").as_bytes(),
    )
    .await;
    assert_eq!(post.status, 405);
    assert_eq!(post.header("allow"), Some("GET, HEAD"));
    assert_eq!(get(addr, "DELETE", &path).await.status, 405);

    let health = get(addr, "GET", "/healthz").await;
    assert_eq!((health.status, health.body.as_slice()), (200, &b"ok"[..]));
    assert_eq!(get(addr, "GET", "/elsewhere").await.status, 404);
    assert_eq!(raw(addr, b"nonsense\r\n\r\n").await.status, 400);
    let huge = format!("GET / HTTP/1.1\r\nX-Pad: {}\r\n\r\n", "a".repeat(9000));
    assert_eq!(raw(addr, huge.as_bytes()).await.status, 431);
    server.stop().await;
}

#[tokio::test]
async fn fetch_gets_a_20_mb_blob_byte_identical() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let data = bytes(MB20, 10);
    let id = store.put(&data).unwrap();
    let server = start(&store).await;
    let got = fetch(&server.url(&id), MB20 as u64, Duration::from_secs(60))
        .await
        .unwrap();
    assert!(got == data);
    assert_eq!(hex::encode(Sha256::digest(&got)), id);
    server.stop().await;
}

#[tokio::test]
async fn server_serves_many_clients_at_once() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let data = bytes(1 << 20, 22);
    let id = store.put(&data).unwrap();
    let server = start(&store).await;
    let url = server.url(&id);
    let fetches: Vec<_> = (0..32)
        .map(|_| {
            let url = url.clone();
            tokio::spawn(async move { fetch(&url, 1 << 20, Duration::from_secs(30)).await })
        })
        .collect();
    for f in fetches {
        assert!(f.await.unwrap().unwrap() == data);
    }
    server.stop().await;
}

#[tokio::test]
async fn fetch_reports_status_limit_and_bad_urls() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let id = store.put(&bytes(10_000, 11)).unwrap();
    let server = start(&store).await;
    let secs = Duration::from_secs(10);

    let missing = fetch(&server.url(&"f".repeat(64)), 1 << 20, secs).await;
    assert!(
        matches!(missing, Err(BlobError::Status { status: 404, .. })),
        "{missing:?}"
    );
    let over = fetch(&server.url(&id), 9_999, secs).await;
    assert!(
        matches!(over, Err(BlobError::TooLarge { limit: 9_999, .. })),
        "{over:?}"
    );
    assert_eq!(
        fetch(&server.url(&id), 10_000, secs).await.unwrap().len(),
        10_000
    );

    for url in [
        "https://h/x",
        "http://",
        "http://h:0/x",
        "http://u@h/x",
        "http://h/a b",
        "ftp://h",
    ] {
        let err = fetch(url, 1, secs).await;
        assert!(
            matches!(err, Err(BlobError::BadUrl { .. })),
            "{url}: {err:?}"
        );
    }
    server.stop().await;
    let refused = fetch(&nowhere_url(), 1, secs).await;
    assert!(
        matches!(refused, Err(BlobError::Transport { .. })),
        "{refused:?}"
    );
}

/// A loopback address where nothing listens.
fn nowhere_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    format!("http://{addr}/healthz")
}

/// A one-shot server that answers any request with `response`, then closes.
async fn canned(response: &'static [u8]) -> SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        let (mut s, _) = listener.accept().await.unwrap();
        let mut buf = [0; 1024];
        let _ = s.read(&mut buf).await;
        s.write_all(response).await.unwrap();
    });
    addr
}

#[tokio::test]
async fn fetch_decodes_chunked_and_close_delimited_bodies() {
    let secs = Duration::from_secs(10);
    let chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n6;x=y\r\n world\r\n0\r\n\r\n";
    let addr = canned(chunked).await;
    assert_eq!(
        fetch(&format!("http://{addr}/x"), 100, secs).await.unwrap(),
        b"hello world"
    );
    let addr = canned(chunked).await;
    let over = fetch(&format!("http://{addr}/x"), 8, secs).await;
    assert!(matches!(over, Err(BlobError::TooLarge { .. })), "{over:?}");

    let addr = canned(b"HTTP/1.0 200 OK\r\n\r\nuntil close").await;
    assert_eq!(
        fetch(&format!("http://{addr}/"), 100, secs).await.unwrap(),
        b"until close"
    );
    let addr = canned(b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nshort").await;
    let short = fetch(&format!("http://{addr}/"), 100, secs).await;
    assert!(
        matches!(short, Err(BlobError::BadResponse { .. })),
        "{short:?}"
    );
}

#[tokio::test]
async fn fetch_times_out_on_a_silent_server() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let silent = tokio::spawn(async move {
        let (s, _) = listener.accept().await.unwrap();
        tokio::time::sleep(Duration::from_secs(30)).await;
        drop(s);
    });
    let err = fetch(&format!("http://{addr}/"), 100, Duration::from_millis(200)).await;
    assert!(matches!(err, Err(BlobError::Timeout { .. })), "{err:?}");
    silent.abort();
}

#[tokio::test]
async fn server_stops_when_shutdown_turns_true() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open_default(tmp.path());
    let server = start(&store).await;
    let addr = server.addr;
    assert_eq!(get(addr, "GET", "/healthz").await.status, 200);
    server.stop().await;
    assert!(TcpStream::connect(addr).await.is_err());
}

#[tokio::test]
async fn pruner_prunes_until_shutdown() {
    let tmp = tempfile::tempdir().unwrap();
    let store = open(tmp.path(), u64::MAX, Duration::from_millis(1));
    store.put(b"short-lived").unwrap();
    let (stop, rx) = watch::channel(false);
    let task = tokio::spawn(run_pruner(store.clone(), Duration::from_millis(20), rx));
    for _ in 0..250 {
        if store.stats() == (0, 0) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(store.stats(), (0, 0));
    stop.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), task)
        .await
        .unwrap()
        .unwrap();
}
