#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Nothing acknowledged is lost when something *refuses*: camera metadata too large for a
//! record, a reason too long for a dead letter, a producer whose limit is below what fovea was
//! told. Real mosquitto, a real Kafka-protocol broker, the real binary; each test counts what was
//! published, what the node acknowledged (`fovea_frames_acked_total`) and what is in Kafka.

mod harness;

use fovea_proto::headers as h;
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult};
use harness::*;
use prost::Message as _;
use rdkafka::message::Message as _;
use std::collections::HashMap;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(90);

fn envelope(
    camera: &str,
    sequence: u64,
    data: Vec<u8>,
    metadata: HashMap<String, String>,
) -> Vec<u8> {
    Frame {
        camera_id: camera.into(),
        sequence,
        data: data.into(),
        metadata,
        ..Frame::default()
    }
    .encode_to_vec()
}

#[test]
fn every_frame_ends_as_records_that_fit_whatever_its_metadata_or_reason() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    // A 128 KiB record limit (the default is 1 MiB) so that camera metadata at its bound and
    // the photos themselves press against the limit with payloads of test size.
    let limit = 131_072;
    let node = Node::start(
        dir.path(),
        &node_config(
            &mqtt,
            &kafka,
            &format!("kafka.record_limit_bytes = {limit}"),
        ),
    );
    let photo = sample_image("chelsea.png");
    let big_metadata: HashMap<_, _> = (0..40)
        .map(|i| (format!("k{i:02}"), "v".repeat(50_000)))
        .collect();
    let near_bound: HashMap<_, _> = [("site".to_string(), "s".repeat(15_000))].into();
    let t = |c: &str| format!("cameras/{c}/frames");
    publish(
        mqtt.port,
        &[
            // 2 MiB of metadata: refused at the door, the evidence kept.
            (
                t("meta2m"),
                envelope("meta2m", 1, photo.clone(), big_metadata),
            ),
            // Metadata under its bound: travels in the result, which still fits.
            (
                t("meta60k"),
                envelope("meta60k", 1, photo.clone(), near_bound),
            ),
            // An envelope naming a 1 MiB camera id: a dead letter whose reason would be 1 MiB.
            (
                t("mismatch"),
                envelope(&"x".repeat(1 << 20), 1, photo.clone(), HashMap::new()),
            ),
        ],
    );
    node.wait_metric("fovea_frames_acked_total", 3.0);
    let letters = kafka.read("fovea.deadletter", 2, WAIT);
    let results = kafka.read("fovea.results", 1, WAIT);
    let frames = kafka.read("fovea.frames", 2, WAIT);
    for record in letters.iter().chain(&results).chain(&frames) {
        let size = record.payload().map_or(0, <[u8]>::len)
            + record.key().map_or(0, <[u8]>::len)
            + fovea::records::headers_of(record)
                .iter()
                .map(|(k, v)| k.len() + v.len())
                .sum::<usize>();
        assert!(
            size + 512 <= limit,
            "a record of {size} bytes on {}",
            record.topic()
        );
    }
    let by_camera: HashMap<String, DeadLetter> = letters
        .iter()
        .map(|r| DeadLetter::decode(r.payload().unwrap()).unwrap())
        .map(|d| (d.camera_id.clone(), d))
        .collect();
    assert_eq!(letters.len(), 2, "dead letters: {:?}", by_camera.keys());
    let meta = &by_camera["meta2m"];
    assert_eq!(meta.kind, "metadata-too-large");
    assert!(
        meta.reason.contains("2000120 bytes in 40 entries"),
        "{}",
        meta.reason
    );
    assert!(meta.payload_truncated && meta.payload_size > 2_000_000);
    let mismatch = &by_camera["mismatch"];
    assert_eq!(mismatch.kind, "camera-mismatch");
    assert!(
        mismatch.reason.contains(fovea::records::TRUNCATION_MARKER),
        "the 1 MiB reason is cut: {} bytes",
        mismatch.reason.len()
    );
    assert_eq!(results.len(), 1, "one result: meta60k's");
    let result = InferenceResult::decode(results[0].payload().unwrap()).unwrap();
    assert_eq!(result.camera_id, "meta60k");
    assert_eq!(
        result.metadata["site"].len(),
        15_000,
        "metadata under its bound travels whole"
    );
    assert_eq!(result.frame.unwrap().size_policy, "chunked");
    assert_eq!(
        header(&frames[0], h::SIZE_POLICY).as_deref(),
        Some("chunked")
    );
    // Sent 3, acked 3, and each is in Kafka as a result or a dead letter.
    assert_eq!(letters.len() + results.len(), 3);
}

#[test]
fn a_producer_limit_below_the_record_limit_gives_record_refused_dead_letters_without_flapping() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let mut kafka = Kafka::start(dir.path(), "edge");
    // The producer's own limit below kafka.record_limit_bytes (1 MiB): what a cluster with a
    // smaller limit than the one fovea was configured with does to a 240 KB photo.
    let node = Node::start(
        dir.path(),
        &node_config(
            &mqtt,
            &kafka,
            r#"kafka.producer = { "message.max.bytes" = "200000" }"#,
        ),
    );
    let big = sample_image("chelsea.png");
    assert!(big.len() > 200_000);
    let small = small_jpegs();
    assert!(small.iter().all(|j| j.len() < 150_000));
    let t = |c: &str| format!("cameras/{c}/frames");
    let mut batch: Vec<(String, Vec<u8>)> = (0..3)
        .map(|i| (t(&format!("big{i}")), big.clone()))
        .collect();
    batch.extend(small.iter().take(3).cloned().map(|j| (t("small"), j)));
    publish(mqtt.port, &batch);
    let body = node.wait_metric("fovea_frames_acked_total", 6.0);
    assert_eq!(
        metric(&body, "fovea_records_refused_total{kind=\"frame\"}"),
        Some(3.0)
    );
    assert_eq!(
        metric(&body, "fovea_local_broker_state{state=\"online\"}"),
        Some(1.0)
    );

    // The same refusal met while draining the spool: the broker away while frames arrive.
    kafka.stop();
    let mut later: Vec<(String, Vec<u8>)> = (3..5)
        .map(|i| (t(&format!("big{i}")), big.clone()))
        .collect();
    later.push((t("small"), small[3].clone()));
    publish(mqtt.port, &later);
    node.wait_metric("fovea_frames_acked_total", 9.0);
    kafka.restart();
    let body = node.wait_metric("fovea_records_refused_total{kind=\"frame\"}", 5.0);
    let deadline = Instant::now() + WAIT;
    let mut body = body;
    while metric(&body, "fovea_local_broker_state{state=\"online\"}") != Some(1.0)
        || metric(&body, "fovea_spool_records{class=\"frame\"}") != Some(0.0)
    {
        assert!(Instant::now() < deadline, "spool never drained: {body}");
        std::thread::sleep(Duration::from_millis(200));
        body = node.http_get("/metrics").1;
    }

    let results = kafka.read("fovea.results", 9, WAIT);
    let letters = kafka.read("fovea.deadletter", 5, WAIT);
    let frames = kafka.read("fovea.frames", 4, WAIT);
    assert_eq!(results.len(), 9, "every acked frame has its result");
    assert_eq!(frames.len(), 4, "the small frames");
    let refused: Vec<DeadLetter> = letters
        .iter()
        .map(|r| DeadLetter::decode(r.payload().unwrap()).unwrap())
        .collect();
    assert_eq!(
        refused.len(),
        5,
        "one record-refused dead letter per big frame"
    );
    let result_ids: Vec<String> = results
        .iter()
        .map(|r| {
            InferenceResult::decode(r.payload().unwrap())
                .unwrap()
                .record_id
        })
        .collect();
    for d in &refused {
        assert_eq!(d.kind, "record-refused");
        assert!(d.reason.contains("fovea.v1.Frame"), "{}", d.reason);
        assert!(d.camera_id.starts_with("big"), "{}", d.camera_id);
        assert!(
            result_ids.contains(&d.record_id),
            "the dead letter names the frame's record id"
        );
    }
    // No flapping: one outage (online -> offline -> catch-up -> online), not a loop over the
    // refused records.
    let log = node.proc.log_text();
    let offline = log.matches("-> offline").count();
    assert!(offline <= 2, "went offline {offline} times:\n{log}");
}
