//! Images that would cost the box its memory or pass damage off as a picture, sent through the
//! real node with the packaged limits (`inference.max_image_side = 8192`,
//! `max_image_pixels = 40000000`, `truncated = "dead_letter"`): each gets its dead letter, the
//! node's peak memory stays bounded, and the next good frame is inferred.

#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

use fovea_proto::v1::{DeadLetter, InferenceResult};
use harness::*;
use image::{ImageBuffer, Luma};
use prost::Message as _;
use rdkafka::Message;
use std::collections::HashMap;
use std::io::Cursor;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

/// A PNG of `side` x `side` black pixels: a small file (zlib packs the zeros) that would decode
/// to `side`² bytes.
fn black_png(side: u32) -> Vec<u8> {
    let img = ImageBuffer::<Luma<u8>, _>::new(side, side);
    let mut out = Vec::new();
    img.write_to(&mut Cursor::new(&mut out), image::ImageFormat::Png)
        .unwrap();
    out
}

/// The same PNG with its header saying `side` x `side` (IHDR patched, CRC recomputed): what a
/// hostile camera can send without encoding a 900-megapixel image itself.
fn claims_side(png: &[u8], side: u32) -> Vec<u8> {
    let mut out = png.to_vec();
    // Signature (8), IHDR length (4) and type (4), then width and height.
    out[16..20].copy_from_slice(&side.to_be_bytes());
    out[20..24].copy_from_slice(&side.to_be_bytes());
    let crc = crc32fast::hash(&out[12..29]);
    out[29..33].copy_from_slice(&crc.to_be_bytes());
    out
}

#[test]
fn huge_and_truncated_images_are_dead_lettered_and_memory_stays_bounded() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let node = Node::start(dir.path(), &node_config(&mqtt, &kafka, ""));

    // Warm up with one good frame, so the peak below is the models' and not the first frame's.
    let rocket = sample_image("rocket.jpg");
    publish(mqtt.port, &[("cameras/warm/frames".into(), rocket.clone())]);
    assert_eq!(kafka.read("fovea.results", 1, WAIT).len(), 1);
    let before = peak_rss(node.proc.child.id());

    let eleven_k = black_png(11_000);
    let chelsea = sample_image("chelsea.png");
    let t = |c: &str| format!("cameras/{c}/frames");
    let hostile = vec![
        (t("half-jpeg"), rocket[..rocket.len() / 2].to_vec()),
        (t("half-png"), chelsea[..chelsea.len() / 2].to_vec()),
        (t("png-11000"), eleven_k.clone()),
        (t("png-30000"), claims_side(&eleven_k, 30_000)),
        (t("good"), rocket.clone()),
    ];
    println!(
        "11000 x 11000 PNG: {} bytes; the 30000 x 30000 header on the same data",
        eleven_k.len()
    );
    publish(mqtt.port, &hostile);

    let letters = kafka.read("fovea.deadletter", 4, WAIT);
    let results = kafka.read("fovea.results", 2, WAIT);
    let mut kinds: HashMap<String, DeadLetter> = HashMap::new();
    for record in &letters {
        let d = DeadLetter::decode(record.payload().unwrap()).unwrap();
        kinds.insert(d.camera_id.clone(), d);
    }
    assert_eq!(letters.len(), 4, "dead letters: {kinds:?}");
    assert_eq!(kinds["half-jpeg"].kind, "truncated");
    assert!(
        kinds["half-jpeg"].reason.contains("end-of-image marker"),
        "{}",
        kinds["half-jpeg"].reason
    );
    assert_eq!(kinds["half-png"].kind, "truncated");
    assert!(kinds["half-png"].reason.contains("IEND"));
    for (camera, side) in [("png-11000", 11_000), ("png-30000", 30_000)] {
        assert_eq!(kinds[camera].kind, "too-many-pixels");
        assert!(
            kinds[camera].reason.starts_with(&format!(
                "image is {side}x{side} pixels; at most 8192 a side"
            )),
            "{}",
            kinds[camera].reason
        );
    }
    // The good frame after them is inferred.
    let good: Vec<InferenceResult> = results
        .iter()
        .map(|r| InferenceResult::decode(r.payload().unwrap()).unwrap())
        .filter(|r| r.camera_id == "good")
        .collect();
    assert_eq!(good.len(), 1);
    assert!(!good[0].outputs.is_empty());

    // Nothing was decoded in full: 121 MB of pixels would have shown.
    let after = peak_rss(node.proc.child.id());
    println!(
        "peak RSS of the node: {} MiB after warm-up, {} MiB after the hostile set",
        before >> 20,
        after >> 20
    );
    assert!(
        after < before + (48 << 20),
        "peak RSS rose from {} to {} MiB",
        before >> 20,
        after >> 20
    );
    let (_, metrics) = node.http_get("/metrics");
    assert_eq!(
        metric(
            &metrics,
            "fovea_frames_rejected_total{reason=\"too-many-pixels\"}"
        ),
        Some(2.0)
    );
    assert_eq!(
        metric(
            &metrics,
            "fovea_frames_rejected_total{reason=\"truncated\"}"
        ),
        Some(2.0)
    );
}
