#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The main path end to end: real mosquitto, a real Kafka-protocol broker, the real `fovea`
//! binary with real ONNX Runtime, models and photos. Counts what was sent and what arrived.

mod harness;

use fovea_proto::headers as h;
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult, inference_result::Status};
use harness::*;
use prost::Message as _;
use rdkafka::message::Message as _;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

fn iou(a: [f32; 4], b: [f32; 4]) -> f32 {
    let ix = (a[2].min(b[2]) - a[0].max(b[0])).max(0.0);
    let iy = (a[3].min(b[3]) - a[1].max(b[1])).max(0.0);
    let inter = ix * iy;
    let area = |r: [f32; 4]| (r[2] - r[0]) * (r[3] - r[1]);
    inter / (area(a) + area(b) - inter)
}

fn sha256_file(path: std::path::PathBuf) -> String {
    hex::encode(Sha256::digest(std::fs::read(path).unwrap()))
}

#[test]
fn photos_go_through_mqtt_inference_and_kafka() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let node = Node::start(dir.path(), &node_config(&mqtt, &kafka, ""));

    // Two photos bare, two inside a Frame envelope (with a camera sequence number).
    let photos = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"];
    let mut sent: HashMap<String, Vec<u8>> = HashMap::new();
    let mut messages = Vec::new();
    for (i, name) in photos.iter().enumerate() {
        let camera = name.split('.').next().unwrap().to_string();
        let image = sample_image(name);
        let payload = if i % 2 == 0 {
            image.clone()
        } else {
            Frame {
                sequence: 7,
                captured_at_ms: 1_700_000_000_000,
                data: image.clone().into(),
                ..Frame::default()
            }
            .encode_to_vec()
        };
        messages.push((format!("cameras/{camera}/frames"), payload));
        sent.insert(camera, image);
    }
    publish(mqtt.port, &messages);

    let results = kafka.read("fovea.results", photos.len(), WAIT);
    let frames = kafka.read("fovea.frames", photos.len(), WAIT);
    let letters = kafka.read("fovea.deadletter", 0, Duration::from_secs(2));
    assert_eq!(
        results.len(),
        photos.len(),
        "results; node log:\n{}",
        node.proc.log_text()
    );
    assert_eq!(frames.len(), photos.len(), "frames");
    assert!(
        letters.is_empty(),
        "unexpected dead letters: {}",
        letters.len()
    );

    // Frames: byte-identical images, keyed by camera, with the header conventions.
    for record in &frames {
        let frame = Frame::decode(record.payload().unwrap()).unwrap();
        let camera = std::str::from_utf8(record.key().unwrap()).unwrap();
        assert_eq!(camera, frame.camera_id);
        assert!(
            frame.data == sent[camera].as_slice(),
            "{camera}: image bytes differ"
        );
        assert_eq!(header(record, h::SCHEMA).as_deref(), Some(h::SCHEMA_FRAME));
        assert_eq!(
            header(record, h::RECORD_ID).as_deref(),
            Some(frame.record_id.as_str())
        );
        assert_eq!(header(record, h::SIZE_POLICY).as_deref(), Some("inline"));
        assert!(frame.record_id.starts_with(&format!("test-node/{camera}/")));
        assert!(frame.width > 16 && frame.height > 16);
    }

    // Results: the right answers, naming model, version and the model file's hash.
    let hashes = HashMap::from([
        (
            "efficientnet-lite0",
            sha256_file(repo_root().join("models/efficientnet-lite0/model.onnx")),
        ),
        (
            "ssdlite-person",
            sha256_file(repo_root().join("models/ssdlite-person/model.onnx")),
        ),
    ]);
    let mut by_camera = HashMap::new();
    for record in &results {
        let r = InferenceResult::decode(record.payload().unwrap()).unwrap();
        assert_eq!(
            r.status(),
            Status::Ok,
            "{}: {}",
            r.camera_id,
            r.status_detail
        );
        assert_eq!(header(record, h::SCHEMA).as_deref(), Some(h::SCHEMA_RESULT));
        assert_eq!(
            header(record, h::RECORD_ID).as_deref(),
            Some(r.record_id.as_str())
        );
        assert_eq!(
            header(record, h::MODEL).as_deref(),
            Some("efficientnet-lite0@1,ssdlite-person@1")
        );
        for o in &r.outputs {
            assert_eq!(o.model_sha256, hashes[o.model.as_str()], "{}", o.model);
            assert!(!o.model_version.is_empty());
        }
        by_camera.insert(r.camera_id.clone(), r);
    }
    let top1 = |camera: &str| {
        by_camera[camera]
            .outputs
            .iter()
            .find(|o| o.model == "efficientnet-lite0")
            .unwrap()
            .classifications[0]
            .label
            .clone()
    };
    let cat = top1("chelsea");
    assert!(
        ["Egyptian cat", "tabby", "tiger cat"]
            .iter()
            .any(|l| cat.starts_with(l)),
        "chelsea: {cat}"
    );
    let coffee = top1("coffee");
    assert!(
        ["espresso", "cup"].iter().any(|l| coffee.starts_with(l)),
        "coffee: {coffee}"
    );
    let astronaut = &by_camera["astronaut"];
    let detector = astronaut
        .outputs
        .iter()
        .find(|o| o.model == "ssdlite-person")
        .unwrap();
    let best = detector
        .detections
        .iter()
        .filter(|d| d.label == "person")
        .map(|d| iou([d.x0, d.y0, d.x1, d.y1], [5.0, 32.0, 377.0, 509.0]))
        .fold(0.0f32, f32::max);
    assert!(
        best >= 0.5,
        "astronaut person IoU {best}: {:?}",
        detector.detections
    );
    // The envelope's sequence makes the record id; a bare image's id is its content hash.
    assert_eq!(by_camera["coffee"].record_id, "test-node/coffee/s7");
    assert_eq!(by_camera["coffee"].captured_at_ms, 1_700_000_000_000);
    assert!(
        by_camera["chelsea"]
            .record_id
            .starts_with("test-node/chelsea/h")
    );
}

#[test]
fn bad_input_is_dead_lettered_and_the_node_keeps_going() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let config = node_config(
        &mqtt,
        &kafka,
        "mqtt.max_frame_bytes = 25165824\nlarge_frames.policy = \"dead_letter\"",
    );
    let mut node = Node::start(dir.path(), &config);

    let mut one_pixel = Vec::new();
    image::DynamicImage::new_rgb8(1, 1)
        .write_to(
            &mut std::io::Cursor::new(&mut one_pixel),
            image::ImageFormat::Png,
        )
        .unwrap();
    let mut corrupt_jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
    corrupt_jpeg.extend(std::iter::repeat_n(0x5A, 4096));
    // Complete (it ends with the end-of-image marker) but not a picture: decode-failed, not
    // truncated.
    corrupt_jpeg.extend([0xFF, 0xD9]);
    let mut too_big = vec![0xFF, 0xD8, 0xFF, 0xE0];
    // Over the 24 MiB frame limit: rumqttc must still take it (its default limit is 10 KiB).
    too_big.resize(25 << 20, 0x11);
    let over_record_limit = noise_png(700, 1);
    assert!(
        over_record_limit.len() > 1 << 20,
        "noise PNG is only {} bytes",
        over_record_limit.len()
    );
    let good = sample_image("chelsea.png");

    let t = |c: &str| format!("cameras/{c}/frames");
    publish(
        mqtt.port,
        &[
            (t("corrupt"), corrupt_jpeg),
            (t("empty"), Vec::new()),
            (t("tiny"), one_pixel),
            (t("huge"), too_big),
            (t("noise"), over_record_limit.clone()),
            (t("good"), good.clone()),
        ],
    );

    let letters = kafka.read("fovea.deadletter", 5, WAIT);
    let results = kafka.read("fovea.results", 2, WAIT);
    let frames = kafka.read("fovea.frames", 1, WAIT);
    let mut kinds: HashMap<String, DeadLetter> = HashMap::new();
    for record in &letters {
        let d = DeadLetter::decode(record.payload().unwrap()).unwrap();
        assert_eq!(
            header(record, h::ERROR_KIND).as_deref(),
            Some(d.kind.as_str())
        );
        assert!(!d.reason.is_empty());
        kinds.insert(d.camera_id.clone(), d);
    }
    assert_eq!(letters.len(), 5, "dead letters: {:?}", kinds.keys());
    assert_eq!(kinds["corrupt"].kind, "decode-failed");
    assert!(
        kinds["corrupt"].reason.contains("could not be decoded"),
        "{}",
        kinds["corrupt"].reason
    );
    assert_eq!(kinds["empty"].kind, "empty-payload");
    assert_eq!(kinds["tiny"].kind, "too-small");
    assert_eq!(
        kinds["tiny"].reason,
        "image is 1x1 pixels; the minimum is 16x16"
    );
    assert_eq!(kinds["huge"].kind, "too-large");
    assert!(
        kinds["huge"]
            .reason
            .contains("exceeds mqtt.max_frame_bytes")
    );
    assert_eq!(kinds["huge"].payload_size, 25 << 20);
    assert!(kinds["huge"].payload_truncated);
    assert_eq!(kinds["noise"].kind, "record-too-large");
    assert_eq!(
        kinds["noise"].payload_size as usize,
        over_record_limit.len()
    );
    assert!(kinds["noise"].reason.contains("kafka.record_limit_bytes"));
    // Small bad payloads travel with their dead letter, for inspection.
    assert_eq!(
        kinds["tiny"].payload_size,
        kinds["tiny"].payload.len() as u64
    );

    // The oversized frame still has its result, and the good frame after the bad ones went through.
    let results: HashMap<String, InferenceResult> = results
        .iter()
        .map(|r| InferenceResult::decode(r.payload().unwrap()).unwrap())
        .map(|r| (r.camera_id.clone(), r))
        .collect();
    assert_eq!(results.len(), 2, "results for {:?}", results.keys());
    let noise = results["noise"].frame.clone().unwrap();
    assert_eq!(noise.size_policy, "dead-letter");
    assert_eq!(noise.topic, "fovea.deadletter");
    assert_eq!(results["good"].status(), Status::Ok);
    assert_eq!(frames.len(), 1);
    let frame = Frame::decode(frames[0].payload().unwrap()).unwrap();
    assert!(frame.data == good.as_slice());
    assert!(
        node.proc.is_running(),
        "node died: {}",
        node.proc.log_text()
    );
}

#[test]
fn config_with_two_mistakes_reports_both_and_fails() {
    let dir = temp_dir();
    let path = dir.path().join("bad.toml");
    std::fs::write(
        &path,
        "[mqtt]\nhostt = \"x\"\n\n[kafka]\npartitions = \"three\"\n",
    )
    .unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fovea"))
        .arg("validate")
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "stderr: {stderr}");
    assert!(stderr.contains("mqtt.hostt"), "stderr: {stderr}");
    assert!(stderr.contains("kafka.partitions"), "stderr: {stderr}");

    // `run` refuses the same file, non-zero, before touching any broker.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_fovea"))
        .args(["run", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("kafka.partitions"));
}

#[test]
fn sigterm_drains_and_exits_cleanly() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let mut node = Node::start(dir.path(), &node_config(&mqtt, &kafka, ""));
    publish(
        mqtt.port,
        &[("cameras/c1/frames".into(), sample_image("rocket.jpg"))],
    );
    assert_eq!(kafka.read("fovea.results", 1, WAIT).len(), 1);
    node.proc.signal("TERM");
    assert_eq!(
        node.proc.wait(Duration::from_secs(25)),
        Some(0),
        "{}",
        node.proc.log_text()
    );
    assert!(
        node.proc.log_text().contains(": 1 frames in, 1 acked"),
        "{}",
        node.proc.log_text()
    );
}

#[test]
fn skip_stale_policy_stores_frames_but_skips_inference() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let extra = "inference.when_behind = \"skip_stale\"\ninference.max_frame_age_ms = 1";
    let config = node_config(&mqtt, &kafka, extra);
    let _node = Node::start(dir.path(), &config);
    // Eight frames at once on one worker: all but the first wait longer than 1 ms.
    let photo = sample_image("coffee.png");
    let messages: Vec<_> = (1..=8u64)
        .map(|seq| {
            let envelope = Frame {
                sequence: seq,
                data: photo.clone().into(),
                ..Frame::default()
            };
            ("cameras/busy/frames".to_string(), envelope.encode_to_vec())
        })
        .collect();
    publish(mqtt.port, &messages);
    let results = kafka.read("fovea.results", 8, WAIT);
    let frames = kafka.read("fovea.frames", 8, WAIT);
    assert_eq!(
        (results.len(), frames.len()),
        (8, 8),
        "every frame is stored and has a result"
    );
    let results: Vec<InferenceResult> = results
        .iter()
        .map(|r| InferenceResult::decode(r.payload().unwrap()).unwrap())
        .collect();
    let skipped = results
        .iter()
        .filter(|r| r.status() == Status::SkippedStale)
        .count();
    assert!(skipped >= 1, "no frame was skipped");
    for r in results
        .iter()
        .filter(|r| r.status() == Status::SkippedStale)
    {
        assert!(r.outputs.is_empty());
        assert!(
            r.status_detail.contains("max_frame_age_ms = 1"),
            "{}",
            r.status_detail
        );
    }
    // Per-camera order is kept whatever the workers did.
    let order: Vec<u64> = results.iter().map(|r| r.camera_sequence).collect();
    assert_eq!(order, (1..=8).collect::<Vec<_>>());
}
