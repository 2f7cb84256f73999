use super::*;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

const TIMEOUT: Duration = Duration::from_secs(10);

/// An ack that counts, in `sent`, that it was sent.
fn marker(sent: &Arc<AtomicUsize>) -> Ack {
    let sent = sent.clone();
    Ack::release(Box::new(move || {
        sent.fetch_add(1, Ordering::Relaxed);
    }))
}

fn chunks(frame_id: &str, payload: &[u8], piece: usize) -> Vec<Vec<u8>> {
    fovea_proto::chunks::split(
        frame_id,
        "ignored",
        "image/png",
        &HashMap::new(),
        payload,
        piece,
    )
    .unwrap()
    .into_iter()
    .map(|c| c.encode_to_vec())
    .collect()
}

fn uploads_with_store(dir: &std::path::Path) -> ChunkedUploads {
    let (store, found) = ChunkStore::open(dir).unwrap();
    assert!(found.is_empty());
    ChunkedUploads::new(1 << 24, 8, TIMEOUT, Some(store))
}

fn payload_of(upload: &Upload) -> Vec<u8> {
    let bytes = upload.result.as_ref().expect("complete");
    Frame::decode(bytes.as_ref()).unwrap().data.to_vec()
}

#[tokio::test]
async fn every_chunk_but_the_last_is_stored_and_acked_the_last_travels_with_the_frame() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = uploads_with_store(dir.path());
    let payload: Vec<u8> = (0..31 * 1000).map(|i| (i % 251) as u8).collect();
    let (stored_acks, last_ack) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let parts = chunks("7", &payload, 1000);
    let n = parts.len();
    assert!(n > 20, "longer than mosquitto's window: {n}");
    let now = Instant::now();
    let mut done = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        let ack = if i == n - 1 {
            marker(&last_ack)
        } else {
            marker(&stored_acks)
        };
        let pushed = up.push("cam", part, ack, now);
        assert!(pushed.ack_now.is_none());
        if let Some(op) = pushed.store {
            assert_eq!((op.camera.as_str(), op.frame_id.as_str()), ("cam", "7"));
            ChunkStore::open(dir.path())
                .unwrap()
                .0
                .write(&op.upload, op.index, &op.bytes)
                .unwrap();
            op.ack.send().await;
        }
        done.extend(pushed.uploads);
    }
    let stored = stored_acks.load(Ordering::Relaxed);
    assert_eq!(stored, n - 1, "every chunk but the last acked once stored");
    assert_eq!(done.len(), 1);
    assert_eq!(payload_of(&done[0]), payload);
    assert_eq!(
        last_ack.load(Ordering::Relaxed),
        0,
        "held until the frame is durable"
    );
    let folder = dir.path().join(ChunkStore::upload_name("cam", "7"));
    assert!(folder.exists());
    done.pop().unwrap().ack.send().await;
    assert_eq!(last_ack.load(Ordering::Relaxed), 1);
    assert!(!folder.exists(), "stored chunks released with the frame");
}

#[test]
fn duplicates_and_late_chunks_are_acked_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = uploads_with_store(dir.path());
    let parts = chunks("1", &[9u8; 3000], 1000);
    let (last, rest) = parts.split_last().unwrap();
    let now = Instant::now();
    assert!(up.push("cam", &rest[0], Ack::none(), now).store.is_some());
    let dup = up.push("cam", &rest[0], Ack::none(), now);
    assert!(dup.ack_now.is_some() && dup.store.is_none() && dup.uploads.is_empty());
    for part in &rest[1..] {
        assert!(up.push("cam", part, Ack::none(), now).store.is_some());
    }
    assert_eq!(up.push("cam", last, Ack::none(), now).uploads.len(), 1);
    let late = up.push("cam", &parts[1], Ack::none(), now);
    assert!(
        late.ack_now.is_some() && late.uploads.is_empty(),
        "late chunk of a finished frame"
    );
}

#[tokio::test]
async fn an_upload_that_times_out_is_a_dead_letter_that_releases_its_chunks() {
    let dir = tempfile::tempdir().unwrap();
    let mut up = uploads_with_store(dir.path());
    let parts = chunks("5", &[1u8; 4000], 1000);
    let now = Instant::now();
    let op = up.push("cam", &parts[1], Ack::none(), now).store.unwrap();
    ChunkStore::open(dir.path())
        .unwrap()
        .0
        .write(&op.upload, op.index, &op.bytes)
        .unwrap();
    assert!(up.expire(now + TIMEOUT / 2).is_empty());
    let mut ended = up.expire(now + TIMEOUT * 2);
    assert_eq!(ended.len(), 1);
    let why = ended[0].result.as_ref().err().unwrap().to_string();
    assert!(
        why.contains(&format!("1 of {} chunks", parts.len())),
        "{why}"
    );
    ended.pop().unwrap().ack.send().await;
    assert!(!dir.path().join(&op.upload).exists());
    assert_eq!(up.in_flight(), 0);
}

#[tokio::test]
async fn without_a_store_acks_are_held_until_the_upload_ends() {
    let mut up = ChunkedUploads::new(1 << 24, 8, TIMEOUT, None);
    let sent = Arc::new(AtomicUsize::new(0));
    let now = Instant::now();
    let parts = chunks("3", &[4u8; 3000], 1000);
    let (last, rest) = parts.split_last().unwrap();
    for part in rest {
        let pushed = up.push("cam", part, marker(&sent), now);
        assert!(pushed.store.is_none() && pushed.ack_now.is_none());
    }
    let mut ended = up.push("cam", last, marker(&sent), now).uploads;
    assert_eq!(sent.load(Ordering::Relaxed), 0);
    ended.pop().unwrap().ack.send().await;
    let n = sent.load(Ordering::Relaxed);
    assert_eq!(n, parts.len(), "one merged ack for every chunk");
}

#[test]
fn a_held_ack_of_an_upload_that_ended_meanwhile_comes_back() {
    let mut up = ChunkedUploads::new(1 << 24, 8, TIMEOUT, None);
    assert!(up.hold("cam", "gone", Ack::none()).is_some());
}

#[test]
fn a_restart_assembles_from_the_stored_chunks_and_the_redelivered_rest() {
    let dir = tempfile::tempdir().unwrap();
    let payload: Vec<u8> = (0..4000u32).map(|i| (i * 7 % 256) as u8).collect();
    let parts = chunks("9", &payload, 1000);
    let (last, rest) = parts.split_last().unwrap();
    {
        let mut up = uploads_with_store(dir.path());
        let store = ChunkStore::open(dir.path()).unwrap().0;
        for part in rest {
            let op = up
                .push("cam", part, Ack::none(), Instant::now())
                .store
                .unwrap();
            store.write(&op.upload, op.index, &op.bytes).unwrap();
        }
    } // the node dies: all chunks but the last were acked, the last was not
    let (store, found) = ChunkStore::open(dir.path()).unwrap();
    assert_eq!(found.len(), rest.len());
    let mut up = ChunkedUploads::new(1 << 24, 8, TIMEOUT, Some(store));
    assert!(up.replay(found, Instant::now()).is_empty());
    // A stored chunk comes again (a duplicate), then the broker redelivers the un-acked last.
    let again = up.push("cam", &rest[1], Ack::none(), Instant::now());
    assert!(again.ack_now.is_some());
    let ended = up.push("cam", last, Ack::none(), Instant::now()).uploads;
    assert_eq!(payload_of(&ended[0]), payload);
}

#[test]
fn not_a_chunk_is_a_bad_chunk_with_its_own_ack() {
    let mut up = ChunkedUploads::new(1 << 24, 8, TIMEOUT, None);
    let pushed = up.push("cam", b"\xff\xff\xff", Ack::none(), Instant::now());
    assert_eq!(pushed.uploads.len(), 1);
    assert_eq!(
        pushed.uploads[0].result.as_ref().err().unwrap().kind(),
        "bad-chunk"
    );
}
