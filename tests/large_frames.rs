#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Frames larger than Kafka's default 1 MB record limit, end to end with real mosquitto, a real
//! Kafka-protocol broker and the real `fovea` binary: chunk-and-reassemble, chunked MQTT uploads,
//! many cameras at once, a chunk that never arrives, and claim checks.

mod harness;

use fovea_proto::headers as h;
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult, inference_result::Status};
use harness::*;
use prost::Message as _;
use rdkafka::message::{Headers as _, Message as _};
use std::collections::HashMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(180);
const LIMIT: usize = 1 << 20;

/// The classifier only: these tests are about bytes, not answers.
fn config(mqtt: &Mosquitto, kafka: &Kafka, extra: &str) -> String {
    node_config(mqtt, kafka, extra).replace(
        "models = [\"efficientnet-lite0\", \"ssdlite-person\"]",
        "models = [\"efficientnet-lite0\"]",
    )
}

/// Every record on the frames topic respects the limit (key + value + headers).
fn assert_records_fit(records: &[rdkafka::message::OwnedMessage]) {
    for r in records {
        let headers: usize = r
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|h| h.key.len() + h.value.map_or(0, <[u8]>::len))
                    .sum()
            })
            .unwrap_or(0);
        let size = r.key().map_or(0, <[u8]>::len) + r.payload().map_or(0, <[u8]>::len) + headers;
        assert!(
            size <= LIMIT,
            "a record of {size} bytes exceeds the 1 MiB limit"
        );
    }
}

#[test]
fn frames_from_100_kb_to_50_mb_arrive_byte_identical_under_a_1_mib_limit() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let _node = Node::start(dir.path(), &config(&mqtt, &kafka, ""));
    // Noise PNG sides for ~100 KB, 900 KB, 1.1 MB, 4 MB, 20 MB and 50 MB.
    let sizes = [
        ("s100k", 183),
        ("s900k", 548),
        ("s1m1", 606),
        ("s4m", 1155),
        ("s20m", 2582),
        ("s50m", 4083),
    ];
    let mut sent = HashMap::new();
    for (i, (camera, side)) in sizes.iter().enumerate() {
        let image = noise_png(*side, i as u32);
        publish(
            mqtt.port,
            &[(format!("cameras/{camera}/frames"), image.clone())],
        );
        sent.insert(camera.to_string(), image);
    }
    let results = kafka.read("fovea.results", sizes.len(), WAIT);
    assert_eq!(results.len(), sizes.len());
    for r in &results {
        let result = InferenceResult::decode(r.payload().unwrap()).unwrap();
        assert_eq!(result.status(), Status::Ok, "{}", result.status_detail);
        let policy = result.frame.unwrap().size_policy;
        let expect = if sent[&result.camera_id].len() < 1_000_000 {
            "inline"
        } else {
            "chunked"
        };
        assert_eq!(policy, expect, "{}", result.camera_id);
    }
    let records = kafka.read("fovea.frames", 1, Duration::from_secs(30));
    assert_records_fit(&records);
    let out = dir.path().join("export");
    let summary = export_frames(&kafka, &out);
    assert!(
        summary.contains("exported 6 frame(s) (2 inline, 4 chunked, 0 claim-check)"),
        "{summary}"
    );
    for (camera, image) in &sent {
        assert!(
            exported_file(&out, camera) == *image,
            "{camera}: reassembled bytes differ"
        );
    }
}

#[test]
fn a_4_mb_frame_uploaded_in_128_kb_chunks_is_reassembled() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let _node = Node::start(dir.path(), &config(&mqtt, &kafka, ""));
    let image = noise_png(1155, 7);
    let messages = chunked_upload("small-cam", "42", &image, 128 * 1024);
    assert!(messages.len() >= 30, "{} chunks", messages.len());
    assert!(messages.iter().all(|(_, p)| p.len() <= 128 * 1024));
    publish(mqtt.port, &messages);

    let results = kafka.read("fovea.results", 1, WAIT);
    assert_eq!(results.len(), 1);
    let result = InferenceResult::decode(results[0].payload().unwrap()).unwrap();
    assert_eq!(result.status(), Status::Ok, "{}", result.status_detail);
    assert_eq!(
        result.camera_sequence, 42,
        "a numeric frame id is the camera's sequence"
    );
    assert_eq!(result.metadata["site"], "dock");
    assert_eq!(result.record_id, "test-node/small-cam/s42");
    let out = dir.path().join("export");
    export_frames(&kafka, &out);
    assert!(exported_file(&out, "small-cam") == image);
}

#[test]
fn ten_cameras_sending_large_frames_at_once_get_their_own_frames_back() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let _node = Node::start(dir.path(), &config(&mqtt, &kafka, ""));
    let images: Vec<Vec<u8>> = (0..10).map(|i| noise_png(820 + i * 10, 100 + i)).collect();
    let messages: Vec<_> = images
        .iter()
        .enumerate()
        .map(|(i, img)| (format!("cameras/busy-{i}/frames"), img.clone()))
        .collect();
    publish(mqtt.port, &messages);
    let results = kafka.read("fovea.results", 10, WAIT);
    assert_eq!(results.len(), 10);
    let out = dir.path().join("export");
    let summary = export_frames(&kafka, &out);
    assert!(summary.contains("exported 10 frame(s)"), "{summary}");
    for (i, image) in images.iter().enumerate() {
        assert!(
            exported_file(&out, &format!("busy-{i}")) == *image,
            "busy-{i} got another camera's bytes"
        );
    }
}

#[test]
fn a_chunk_that_never_arrives_is_reported_and_later_frames_are_unaffected() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let _node = Node::start(
        dir.path(),
        &config(&mqtt, &kafka, "large_frames.chunk_timeout_ms = 1500"),
    );
    let first = noise_png(400, 1);
    let mut broken = chunked_upload("flaky", "1", &first, 64 * 1024);
    let lost = broken.remove(3);
    drop(lost);
    publish(mqtt.port, &broken);
    let second = noise_png(400, 2);
    publish(mqtt.port, &chunked_upload("flaky", "2", &second, 64 * 1024));

    let letters = kafka.read("fovea.deadletter", 1, WAIT);
    assert_eq!(letters.len(), 1);
    let letter = DeadLetter::decode(letters[0].payload().unwrap()).unwrap();
    assert_eq!(letter.kind, "chunks-incomplete");
    assert!(letter.reason.contains("missing [3]"), "{}", letter.reason);
    let results = kafka.read("fovea.results", 1, WAIT);
    assert_eq!(results.len(), 1, "only the complete frame has a result");
    let result = InferenceResult::decode(results[0].payload().unwrap()).unwrap();
    assert_eq!(result.camera_sequence, 2);
    let frames = kafka.read("fovea.frames", 1, Duration::from_secs(10));
    let frame = Frame::decode(frames[0].payload().unwrap()).unwrap();
    assert!(frame.data == second.as_slice());
}

#[test]
fn claim_check_record_holds_a_reference_to_identical_bytes() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let port = free_port();
    let extra = format!(
        "large_frames.policy = \"claim_check\"\nlarge_frames.http_listen = \"127.0.0.1:{port}\""
    );
    let _node = Node::start(dir.path(), &config(&mqtt, &kafka, &extra));
    let image = noise_png(1000, 9);
    publish(
        mqtt.port,
        &[("cameras/claimed/frames".to_string(), image.clone())],
    );

    let frames = kafka.read("fovea.frames", 1, WAIT);
    assert_eq!(frames.len(), 1);
    assert_records_fit(&frames);
    assert_eq!(
        header(&frames[0], h::SIZE_POLICY).as_deref(),
        Some("claim-check")
    );
    let frame = Frame::decode(frames[0].payload().unwrap()).unwrap();
    assert!(frame.data.is_empty(), "the image is not in the record");
    let claim = frame.claim.expect("a claim check");
    assert_eq!(claim.size as usize, image.len());
    assert!(
        claim
            .url
            .starts_with(&format!("http://127.0.0.1:{port}/blobs/")),
        "{}",
        claim.url
    );
    let rt = tokio::runtime::Runtime::new().unwrap();
    let fetched = rt
        .block_on(fovea::blobstore::fetch(
            &claim.url,
            1 << 30,
            Duration::from_secs(30),
        ))
        .unwrap();
    assert!(
        fetched == image,
        "the blob differs from what the camera sent"
    );
    assert_eq!(
        claim.sha256,
        hex::encode(<sha2::Sha256 as sha2::Digest>::digest(&image))
    );

    let results = kafka.read("fovea.results", 1, WAIT);
    let result = InferenceResult::decode(results[0].payload().unwrap()).unwrap();
    assert_eq!(result.frame.unwrap().size_policy, "claim-check");
    let out = dir.path().join("export");
    // The node's config names the blob store's URL: the one prefix export fetches from.
    let config = dir.path().join("fovea.toml");
    let summary = export_frames_with(&kafka, &out, &["--config", config.to_str().unwrap()]);
    assert!(summary.contains("1 claim-check"), "{summary}");
    assert!(exported_file(&out, "claimed") == image);
}
