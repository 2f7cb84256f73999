#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Hostile input end to end (issue 13, items 5 and 7), with real mosquitto, a real
//! Kafka-protocol broker and the real `fovea` binary:
//! - topics whose camera level is `..`, `.` or a hidden name are acked and dead-lettered as
//!   `bad-camera-id`, and the next good frame is processed;
//! - a worker that panics on one frame (the test-only `FOVEA_TEST_PANIC_ON_METADATA` hook) gives
//!   that frame an `internal-error` dead letter, acks it (not redelivered after a restart) and
//!   goes on with the next;
//! - `fovea frames export` given records written straight into Kafka with camera `../x`, an
//!   absolute path, a frame id `..` and a claim check pointing elsewhere writes nothing outside
//!   its folder, fetches nothing, and says why.

mod harness;

use fovea_proto::headers as h;
use fovea_proto::v1::{ClaimCheck, DeadLetter, Frame, InferenceResult, inference_result::Status};
use harness::*;
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::message::{Header, Message as _, OwnedHeaders};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

const WAIT: Duration = Duration::from_secs(90);

fn letters_of(records: &[rdkafka::message::OwnedMessage]) -> Vec<DeadLetter> {
    records
        .iter()
        .map(|r| {
            let d = DeadLetter::decode(r.payload().unwrap()).unwrap();
            assert_eq!(
                header(r, h::ERROR_KIND).as_deref(),
                Some(d.kind.as_str()),
                "the kind header matches the letter"
            );
            d
        })
        .collect()
}

#[test]
fn bad_camera_ids_are_acked_and_dead_lettered_and_the_next_frame_goes_through() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let node = Node::start(dir.path(), &node_config(&mqtt, &kafka, ""));
    let jpeg = small_jpegs().remove(0);
    let hostile = [
        "cameras/../frames",
        "cameras/./frames",
        "cameras/.hidden/frames",
        "cameras/../chunks",
    ];
    let mut messages: Vec<(String, Vec<u8>)> = hostile
        .iter()
        .map(|t| (t.to_string(), jpeg.clone()))
        .collect();
    messages.push(("cameras/good/frames".to_string(), jpeg.clone()));
    publish(mqtt.port, &messages);

    let letters = letters_of(&kafka.read("fovea.deadletter", hostile.len(), WAIT));
    let results = kafka.read("fovea.results", 1, WAIT);
    assert_eq!(letters.len(), hostile.len(), "{letters:?}");
    let by_source: HashMap<String, &DeadLetter> =
        letters.iter().map(|d| (d.source.clone(), d)).collect();
    for (topic, id, why) in [
        ("cameras/../frames", "\"..\"", "names a folder"),
        ("cameras/./frames", "\".\"", "names a folder"),
        ("cameras/.hidden/frames", "\".hidden\"", "starts with '.'"),
        ("cameras/../chunks", "\"..\"", "names a folder"),
    ] {
        let d = by_source
            .get(&format!("mqtt:{topic}"))
            .unwrap_or_else(|| panic!("no dead letter for {topic}: {letters:?}"));
        assert_eq!(d.kind, "bad-camera-id", "{topic}");
        assert_eq!(
            d.camera_id, "_unknown",
            "the bad id is never a record's camera"
        );
        assert!(
            d.reason.contains(id) && d.reason.contains(why),
            "{topic}: {}",
            d.reason
        );
        assert!(
            d.record_id.starts_with("test-node/_unknown/h"),
            "{}",
            d.record_id
        );
        assert_eq!(d.payload_size as usize, jpeg.len());
    }
    assert_eq!(results.len(), 1);
    let result = InferenceResult::decode(results[0].payload().unwrap()).unwrap();
    assert_eq!(result.camera_id, "good");
    assert_eq!(result.status(), Status::Ok, "{}", result.status_detail);

    // Every one of the five was taken and acked (none left for redelivery).
    let body = node.wait_metric("fovea_frames_acked_total", 5.0);
    assert_eq!(metric(&body, "fovea_frames_received_total"), Some(5.0));
    assert_eq!(
        metric(
            &body,
            "fovea_frames_rejected_total{reason=\"bad-camera-id\"}"
        ),
        Some(4.0),
        "{body}"
    );
}

#[test]
fn a_panic_on_one_frame_is_an_acked_internal_error_and_the_next_frame_is_fine() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    // One worker: the frames after the panic are inferred by the thread that panicked.
    let config = node_config(&mqtt, &kafka, "inference.workers = 1");
    std::fs::write(dir.path().join("fovea.toml"), &config).unwrap();
    let env = [("FOVEA_TEST_PANIC_ON_METADATA", "fovea-test-panic")];
    let mut node = Node::launch_with(dir.path(), &[], &env);
    assert!(
        node.proc
            .log_text()
            .contains("FOVEA_TEST_PANIC_ON_METADATA is set (test-only)"),
        "the armed hook is announced: {}",
        node.proc.log_text()
    );

    let jpegs = small_jpegs();
    let topic = "cameras/cam-p/frames".to_string();
    publish(
        mqtt.port,
        &[
            (topic.clone(), envelope(1, &jpegs[0], &[])),
            (
                topic.clone(),
                envelope(2, &jpegs[1], &[("fovea-test-panic", "1")]),
            ),
            (topic.clone(), envelope(3, &jpegs[2], &[])),
            (topic.clone(), envelope(4, &jpegs[3], &[])),
        ],
    );

    let letters = letters_of(&kafka.read("fovea.deadletter", 1, WAIT));
    let results = kafka.read("fovea.results", 3, WAIT);
    assert_eq!(letters.len(), 1, "{letters:?}");
    let letter = &letters[0];
    assert_eq!(letter.kind, "internal-error");
    assert_eq!(letter.camera_id, "cam-p");
    assert!(
        letter
            .reason
            .contains("panic: FOVEA_TEST_PANIC_ON_METADATA: panicking on test-node/cam-p/s2")
            && letter.reason.contains("workers.rs:"),
        "{}",
        letter.reason
    );
    assert_eq!(
        letter.payload_size as usize,
        envelope(2, &jpegs[1], &[("fovea-test-panic", "1")]).len()
    );
    let mut sequences: Vec<u64> = results
        .iter()
        .map(|r| InferenceResult::decode(r.payload().unwrap()).unwrap())
        .inspect(|r| assert_eq!(r.status(), Status::Ok, "{}", r.status_detail))
        .map(|r| r.camera_sequence)
        .collect();
    sequences.sort();
    assert_eq!(sequences, [1, 3, 4], "the frames around the panic are fine");
    let body = node.wait_metric("fovea_frames_acked_total", 4.0);
    assert_eq!(metric(&body, "fovea_frames_received_total"), Some(4.0));
    assert!(node.proc.is_running(), "{}", node.proc.log_text());

    // Acked means not redelivered: after a restart on the same session nothing comes again.
    node.stop();
    let mut node = Node::launch_with(dir.path(), &[], &env);
    std::thread::sleep(Duration::from_secs(3));
    let (_, body) = node.http_get("/metrics");
    assert_eq!(
        metric(&body, "fovea_frames_received_total"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(
        kafka
            .read("fovea.deadletter", 2, Duration::from_secs(2))
            .len(),
        1
    );
    node.stop();
}

/// Writes `frames` to `topic` as frame records, the way a hostile writer with broker access could.
fn write_frames(kafka: &Kafka, topic: &str, frames: &[Frame]) {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        for f in frames {
            let headers = OwnedHeaders::new().insert(Header {
                key: h::SCHEMA,
                value: Some(h::SCHEMA_FRAME),
            });
            let value = f.encode_to_vec();
            let rec = FutureRecord::to(topic)
                .key(&f.camera_id)
                .payload(&value)
                .headers(headers);
            producer
                .send(rec, Duration::from_secs(30))
                .await
                .expect("record written");
        }
    });
}

/// A loopback listener counting the connections made to it (nothing may be fetched from it).
fn counting_listener() -> (u16, Arc<AtomicUsize>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            seen.fetch_add(1, Ordering::SeqCst);
            drop(conn);
        }
    });
    (port, count)
}

/// Every file under `dir`, relative to it.
fn files_under(dir: &std::path::Path) -> Vec<String> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for entry in std::fs::read_dir(&d).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                stack.push(path);
            } else {
                out.push(path.strip_prefix(dir).unwrap().display().to_string());
            }
        }
    }
    out.sort();
    out
}

#[test]
fn export_of_hostile_records_writes_nothing_outside_and_fetches_nothing() {
    let dir = temp_dir();
    let kafka = Kafka::start(dir.path(), "edge");
    kafka.create_topic("fovea.frames", 1, &[]);
    let (elsewhere, connections) = counting_listener();
    let (allowed_port, allowed_connections) = counting_listener();
    let jpeg = small_jpegs().remove(0);
    let work = dir.path().join("work");
    let out = work.join("export");
    let absolute = dir.path().join("abs-target");
    let frame = |camera: &str, record_id: &str| Frame {
        camera_id: camera.to_string(),
        record_id: record_id.to_string(),
        content_type: "image/jpeg".into(),
        data: jpeg.clone().into(),
        ..Frame::default()
    };
    let claim = |camera: &str, url: String| Frame {
        data: Default::default(),
        claim: Some(ClaimCheck {
            url,
            sha256: "00".repeat(32),
            size: jpeg.len() as u64,
        }),
        ..frame(camera, &format!("n/{camera}/s9"))
    };
    let abs = absolute.display().to_string();
    write_frames(
        &kafka,
        "fovea.frames",
        &[
            frame("../x", "n/../x/s1"),
            frame(&abs, &format!("n/{abs}/s2")),
            frame("cam", "n/cam/.."),
            frame("cam", "n/cam/../../../escaped"),
            claim("cam", format!("http://127.0.0.1:{elsewhere}/blobs/abc")),
            claim(
                "cam",
                format!("http://127.0.0.1:{allowed_port}.evil.example/blobs/abc"),
            ),
            claim(
                "cam",
                format!("http://127.0.0.1:{allowed_port}/blobs/../../etc/passwd"),
            ),
            frame("good", "n/good/s3"),
        ],
    );

    let allow = format!("http://127.0.0.1:{allowed_port}");
    let (code, stdout, stderr) = run_export(&kafka, &out, &["--allow-url", &allow]);
    assert_eq!(code, Some(1), "refusals make export fail: {stdout}{stderr}");
    assert!(
        stdout.contains("exported 2 frame(s) (2 inline, 0 chunked, 0 claim-check)")
            && stdout.contains("0 failed, 6 refused"),
        "{stdout}{stderr}"
    );
    for why in [
        r#"record "n/../x/s1" names camera "../x": it starts with '.'"#,
        &format!(r#"names camera "{abs}""#),
        r#"record id "n/cam/.." does not end in a safe frame id"#,
        &format!(
            "claim check URL \"http://127.0.0.1:{elsewhere}/blobs/abc\" refused: it is not under an allowed prefix ({allow})"
        ),
        ".evil.example/blobs/abc\" refused: it is not under an allowed prefix",
        "refused: its path has '.' or '..' segments",
        "pass --allow-url PREFIX",
    ] {
        assert!(stderr.contains(why), "missing {why:?} in:\n{stderr}");
    }
    // Only the safe frames were written, inside the folder; nothing next to it or elsewhere.
    // (The file names below are what export writes: not a sample photo.)
    let written = ["cam/escaped.jpg", "good/s3.jpg"]; // not a sample photo
    assert_eq!(files_under(&out), written);
    let beside: Vec<String> = written.iter().map(|w| format!("export/{w}")).collect();
    assert_eq!(files_under(&work), beside);
    assert!(!dir.path().join("x").exists() && !absolute.exists());
    assert!(
        !dir.path()
            .join(written[0].trim_start_matches("cam/"))
            .exists()
    );
    assert_eq!(
        connections.load(Ordering::SeqCst),
        0,
        "fetched from elsewhere"
    );
    assert_eq!(
        allowed_connections.load(Ordering::SeqCst),
        0,
        "fetched a refused URL"
    );

    // Without --allow-url and without a readable config no claim check is fetched, and it says why.
    let missing = dir.path().join("no-such.toml");
    let out2 = work.join("export2");
    let (code, _, stderr) = run_export(&kafka, &out2, &["--config", missing.to_str().unwrap()]);
    assert_eq!(code, Some(1));
    assert!(
        stderr.contains("no --allow-url was given and the node's config")
            && stderr.contains("no-such.toml"),
        "{stderr}"
    );
    assert_eq!(connections.load(Ordering::SeqCst), 0);
}
