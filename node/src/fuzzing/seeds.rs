//! The seed corpora of the fuzz targets (`fuzz/corpus/<target>/<seed>`), made by the real
//! encoders. `cargo test -p fovea --lib fuzz_corpus` checks that the files in the repository are
//! what this makes (so a format change cannot leave the seeds stale); with
//! `FOVEA_WRITE_FUZZ_CORPUS=1` it writes them instead.

use std::collections::{BTreeMap, HashMap};
use std::io::Cursor;
use std::path::{Path, PathBuf};

use bytes::Bytes;
use fovea_proto::chunks::split;
use fovea_proto::v1::{Frame, FrameChunk};
use image::{DynamicImage, ImageBuffer, ImageFormat, Luma, Rgb};
use prost::Message;

use super::{EXPIRE, ROUND_TRIP, push_piece};
use crate::inference::decode::tests::with_exif_orientation;
use crate::spool::record::{self, Class, FileStub, FramePart, SpoolRecord};

/// Every seed: target -> file name -> bytes.
type Corpus = BTreeMap<&'static str, BTreeMap<&'static str, Vec<u8>>>;

fn corpus() -> Corpus {
    let images = Images::new();
    [
        ("payload", payload(&images)),
        ("topic", topic()),
        ("frame_chunk", frame_chunk()),
        ("spool_record", spool_record()),
        ("http_request", http_request()),
        ("image_decode", images.seeds()),
    ]
    .into_iter()
    .collect()
}

/// Small images cut from the sample photos: 40x30 crops as PNG and as JPEG (complete), the
/// heads of the real files, and a few variants.
struct Images {
    png: Vec<u8>,
    jpeg: Vec<u8>,
}

fn samples() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/samples")
}

fn encode(img: &DynamicImage, format: ImageFormat) -> Vec<u8> {
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), format).unwrap();
    out
}

impl Images {
    fn new() -> Self {
        // Crops of PNGs, not resizes and not decoded JPEGs (whose decoder rounds differently
        // with each CPU's SIMD): exact pixels, the same seeds on every architecture.
        let cat = image::open(samples().join("chelsea.png")).unwrap();
        let cup = image::open(samples().join("coffee.png")).unwrap();
        Images {
            png: encode(&cat.crop_imm(200, 100, 40, 30), ImageFormat::Png),
            jpeg: encode(&cup.crop_imm(280, 150, 40, 30), ImageFormat::Jpeg),
        }
    }

    fn seeds(&self) -> BTreeMap<&'static str, Vec<u8>> {
        let head =
            |name: &str, len: usize| std::fs::read(samples().join(name)).unwrap()[..len].to_vec();
        let grey16 = DynamicImage::ImageLuma16(ImageBuffer::from_pixel(20, 12, Luma([40_000u16])));
        let tall = DynamicImage::ImageRgb8(ImageBuffer::from_pixel(8, 300, Rgb([9, 9, 9])));
        [
            ("crop.png", self.png.clone()),
            ("crop.jpg", self.jpeg.clone()),
            ("crop-rotated.jpg", with_exif_orientation(&self.jpeg, 6)),
            ("crop-half.jpg", self.jpeg[..self.jpeg.len() / 2].to_vec()),
            ("crop-half.png", self.png[..self.png.len() / 2].to_vec()),
            ("grey16.png", encode(&grey16, ImageFormat::Png)),
            ("tall.png", encode(&tall, ImageFormat::Png)),
            ("rocket-head.jpg", head("rocket.jpg", 1024)),
            ("chelsea-head.png", head("chelsea.png", 512)),
        ]
        .into_iter()
        .collect()
    }
}

fn payload(images: &Images) -> BTreeMap<&'static str, Vec<u8>> {
    let envelope = Frame {
        camera_id: "cam-1".into(),
        sequence: 42,
        captured_at_ms: 1_700_000_000_000,
        content_type: "image/jpeg".into(),
        data: Bytes::from(images.jpeg.clone()),
        metadata: [("site".to_string(), "dock".to_string())].into(),
        ..Frame::default()
    };
    let png_envelope = Frame {
        data: Bytes::from(images.png.clone()),
        ..Frame::default()
    };
    let other_camera = Frame {
        camera_id: "cam-2".into(),
        data: Bytes::from_static(&[0xFF, 0xD8, 0xFF, 0xE0]),
        ..Frame::default()
    };
    let no_image = Frame {
        captured_at_ms: 5,
        metadata: [("k".to_string(), "v".repeat(300))].into(),
        ..Frame::default()
    };
    [
        ("bare.jpg", images.jpeg.clone()),
        ("bare.png", images.png.clone()),
        ("envelope", envelope.encode_to_vec()),
        ("envelope-png", png_envelope.encode_to_vec()),
        ("envelope-other-camera", other_camera.encode_to_vec()),
        ("envelope-no-image", no_image.encode_to_vec()),
    ]
    .into_iter()
    .collect()
}

/// The topic, then the filters, one a line.
fn topic() -> BTreeMap<&'static str, Vec<u8>> {
    [
        (
            "camera",
            "cameras/dock-3/frames\ncameras/+/frames\nsite/a/+",
        ),
        ("second-filter", "site/a/door.2\ncameras/+/frames\nsite/a/+"),
        ("dot-dot", "cameras/../frames\ncameras/+/frames"),
        ("no-match", "cameras/dock-3/frames/x\ncameras/+/frames"),
        ("unicode", "cameras/kamera-\u{fc}/frames\ncameras/+/frames"),
    ]
    .into_iter()
    .map(|(name, text)| (name, text.as_bytes().to_vec()))
    .collect()
}

/// Deterministic pseudo-random bytes, different for each seed.
fn noise(len: usize, seed: u64) -> Vec<u8> {
    use rand::{RngCore, SeedableRng};
    let mut out = vec![0; len];
    rand::rngs::StdRng::seed_from_u64(seed).fill_bytes(&mut out);
    out
}

fn chunks(frame_id: &str, camera: &str, payload: &[u8], max: usize) -> Vec<Vec<u8>> {
    let meta = HashMap::from([("site".to_string(), "dock".to_string())]);
    split(frame_id, camera, "image/jpeg", &meta, payload, max)
        .unwrap()
        .iter()
        .map(FrameChunk::encode_to_vec)
        .collect()
}

/// A sequence input: limits, then a push for each chunk and an expire for each `None`.
fn sequence(limits: [u8; 4], steps: &[Option<&[u8]>], wait: u8) -> Vec<u8> {
    let mut out = limits.to_vec();
    for step in steps {
        match step {
            Some(chunk) => push_piece(&mut out, 0, chunk),
            None => push_piece(&mut out, EXPIRE + wait, &[]),
        }
    }
    out
}

fn frame_chunk() -> BTreeMap<&'static str, Vec<u8>> {
    let a = chunks("node/cam-1/s1", "cam-1", &noise(1000, 1), 300);
    let b = chunks("node/cam-2/s1", "cam-2", &noise(700, 2), 200);
    let empty = chunks("node/cam-1/s2", "cam-1", &[], 100);
    let roomy = [255, 4, 255, 20];
    let reversed: Vec<Option<&[u8]>> = a
        .iter()
        .rev()
        .chain([&a[0]])
        .map(|c| Some(&c[..]))
        .chain([None])
        .collect();
    // All of a, b without its chunk 1 (b[0] and b[2] between a's), the empty frame, a timeout.
    let mut interleaved: Vec<Option<&[u8]>> = a.iter().map(|c| Some(&c[..])).collect();
    interleaved.insert(1, Some(&b[0]));
    interleaved.insert(3, Some(&b[2]));
    interleaved.extend([Some(&empty[0][..]), None]);
    // One frame in flight at most: each new frame evicts the last, whose late chunk is ignored.
    let c = chunks("node/cam-3/s1", "cam-3", &noise(500, 6), 200);
    let evicting: Vec<Option<&[u8]>> =
        vec![Some(&a[0]), Some(&b[0]), Some(&c[0]), Some(&a[1]), None];
    let mut round_trip = vec![ROUND_TRIP];
    round_trip.extend(200u16.to_le_bytes());
    round_trip.extend(noise(700, 3));
    [
        ("reversed-with-duplicate", sequence(roomy, &reversed, 10)),
        ("interleaved-one-lost", sequence(roomy, &interleaved, 50)),
        ("evicting", sequence([255, 1, 255, 20], &evicting, 50)),
        ("round-trip", round_trip),
    ]
    .into_iter()
    .collect()
}

fn spool_record() -> BTreeMap<&'static str, Vec<u8>> {
    let rec = |class: Class, value: Vec<u8>| SpoolRecord {
        class,
        topic: format!("fovea.{}", class.name()),
        key: "cam-1".into(),
        headers: vec![
            ("fovea-record-id".into(), "node/cam-1/s7".into()),
            ("content-type".into(), "application/x-protobuf".into()),
        ],
        value,
        created_ms: 1_700_000_000_000,
    };
    let part = FramePart { first: 7, count: 3 };
    let frame = record::encode_part(&rec(Class::Frame, noise(200, 4)), Some(part)).unwrap();
    let result = record::encode(&rec(Class::Result, noise(60, 5))).unwrap();
    let dead = record::encode(&rec(Class::DeadLetter, b"bad".to_vec())).unwrap();
    [
        ("frame", frame.clone()),
        ("result", result.clone()),
        ("dead-letter", dead),
        ("result-body", result[record::HEADER_LEN..].to_vec()),
        ("file-stub", FileStub::of(&frame).encode().to_vec()),
        ("key", record::seq_key(42).to_vec()),
    ]
    .into_iter()
    .collect()
}

fn http_request() -> BTreeMap<&'static str, Vec<u8>> {
    let id = "0f".repeat(32);
    let mut large = b"GET /healthz HTTP/1.1\r\nX-Pad: ".to_vec();
    large.resize(super::MAX_REQUEST_HEAD as usize + 16, b'a');
    large.extend(b"\r\n\r\n");
    [
        (
            "get-blob",
            format!("GET /blobs/{id} HTTP/1.1\r\nHost: node:8088\r\n\r\n").into_bytes(),
        ),
        ("head-health", b"HEAD /healthz HTTP/1.0\r\n\r\n".to_vec()),
        (
            "post-query",
            b"POST /blobs/abc?x=1 HTTP/1.1\r\nContent-Length: 0\r\n\r\n".to_vec(),
        ),
        ("stray-line-end", b"\r\nGET /metrics HTTP/1.1\n\n".to_vec()),
        ("malformed", b"GET  / HTTP/1.1\r\n\r\n".to_vec()),
        ("unfinished", b"GET / HTTP/1.1\r\nHost: x\r\n".to_vec()),
        ("too-large", large),
    ]
    .into_iter()
    .collect()
}

fn corpus_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../fuzz/corpus")
}

/// The seeds in the repository: target -> file name -> bytes.
fn on_disk() -> BTreeMap<String, BTreeMap<String, Vec<u8>>> {
    let names = |dir: &Path| -> Vec<(String, PathBuf)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .map(|entries| entries.map(|e| e.unwrap()).collect())
            .unwrap_or_else(|_| Vec::new())
            .into_iter()
            .map(|e| (e.file_name().into_string().unwrap(), e.path()))
            .collect();
        out.sort();
        out
    };
    names(&corpus_dir())
        .into_iter()
        .map(|(target, dir)| {
            let seeds = names(&dir)
                .into_iter()
                .map(|(name, path)| (name, std::fs::read(path).unwrap()))
                .collect();
            (target, seeds)
        })
        .collect()
}

/// The `frame_chunk` sequence seeds reach what their names say: a completion, a timeout, an
/// eviction.
#[test]
fn chunk_seeds_reach_every_outcome() {
    use fovea_proto::chunks::{Aggregator, IncompleteReason, Outcome};
    use std::time::{Duration, Instant};
    let outcomes = |input: &[u8]| -> Vec<String> {
        let mut aggregator =
            Aggregator::new(super::aggregator_limits(input[..4].try_into().unwrap()));
        let mut now = Instant::now();
        let mut seen = Vec::new();
        for (tag, piece) in super::pieces(&input[4..]) {
            let out = if tag >= EXPIRE {
                now += Duration::from_millis(100) * u32::from(tag - EXPIRE);
                aggregator.expire(now)
            } else {
                aggregator.push(FrameChunk::decode(piece).unwrap(), now)
            };
            seen.extend(out.iter().map(|o| match o {
                Outcome::Complete(a) => format!("complete {}", a.camera_id),
                Outcome::Incomplete {
                    camera_id,
                    reason: IncompleteReason::TimedOut,
                    ..
                } => {
                    format!("timed out {camera_id}")
                }
                Outcome::Incomplete { camera_id, .. } => format!("evicted {camera_id}"),
                Outcome::Rejected { camera_id, .. } => format!("rejected {camera_id}"),
            }));
        }
        seen
    };
    let seeds = frame_chunk();
    assert_eq!(
        outcomes(&seeds["reversed-with-duplicate"]),
        ["complete cam-1"]
    );
    assert_eq!(
        outcomes(&seeds["interleaved-one-lost"]),
        ["complete cam-1", "complete cam-1", "timed out cam-2"]
    );
    assert_eq!(
        outcomes(&seeds["evicting"]),
        ["evicted cam-1", "evicted cam-2", "timed out cam-3"]
    );
}

#[test]
fn fuzz_corpus_is_current() {
    let made = corpus();
    if std::env::var_os("FOVEA_WRITE_FUZZ_CORPUS").is_some() {
        let _ = std::fs::remove_dir_all(corpus_dir());
        for (target, seeds) in &made {
            let dir = corpus_dir().join(target);
            std::fs::create_dir_all(&dir).unwrap();
            for (name, bytes) in seeds {
                std::fs::write(dir.join(name), bytes).unwrap();
            }
        }
    }
    let made: BTreeMap<String, BTreeMap<String, Vec<u8>>> = made
        .into_iter()
        .map(|(t, seeds)| {
            let seeds = seeds.into_iter().map(|(n, b)| (n.to_string(), b)).collect();
            (t.to_string(), seeds)
        })
        .collect();
    let disk = on_disk();
    let total: usize = disk.values().flat_map(|s| s.values()).map(Vec::len).sum();
    assert!(total < 200_000, "the seed corpus grew to {total} bytes");
    assert!(
        made == disk,
        "fuzz/corpus/ is not what the seed generator makes (targets on disk: {:?}); write it \
         with FOVEA_WRITE_FUZZ_CORPUS=1 cargo test -p fovea --lib fuzz_corpus",
        disk.keys().collect::<Vec<_>>()
    );
}
