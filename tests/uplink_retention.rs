#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The uplink against records the edge broker deletes by retention before the cloud has them
//! (issue 12, "no silent loss to retention"): the lost frames are counted and logged, everything
//! retained is replicated, every result arrives, and replication goes on; an old unreplicated
//! result makes `/readyz` warn. Real brokers ("edge" and "cloud"), real photos.

mod harness;

use fovea_proto::headers as h;
use fovea_proto::v1::Frame;
use harness::*;
use prost::Message as _;
use rdkafka::consumer::Consumer as _;
use rdkafka::message::OwnedMessage;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// A node on `edge` replicating to `cloud` with the classifier only; `extra` in the harness's
/// `section.key = value` form, `uplink_extra` into `[uplink]`, `frames` into `[uplink.frames]`.
fn config(
    mqtt: &Mosquitto,
    edge: &Kafka,
    cloud: &Kafka,
    extra: &str,
    uplink_extra: &str,
    frames: &str,
) -> String {
    let base = node_config(mqtt, edge, extra).replace(
        "models = [\"efficientnet-lite0\", \"ssdlite-person\"]",
        "models = [\"efficientnet-lite0\"]",
    );
    format!(
        "{base}\n[uplink]\nenabled = true\nbrokers = \"{}\"\n{uplink_extra}\n\n[uplink.frames]\n{frames}\n",
        cloud.brokers()
    )
}

/// Frame envelopes of camera `cam-1` with sequences `seqs`, each the 112 KB rocket photo.
fn rockets(seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, Vec<u8>)> {
    let photo = sample_image("rocket.jpg");
    seqs.map(|seq| {
        let f = Frame {
            sequence: seq,
            data: photo.clone().into(),
            ..Frame::default()
        };
        ("cameras/cam-1/frames".to_string(), f.encode_to_vec())
    })
    .collect()
}

fn ids(records: &[OwnedMessage]) -> HashSet<String> {
    records
        .iter()
        .map(|r| header(r, h::RECORD_ID).expect("record id"))
        .collect()
}

/// Reads `topic` until it holds `want` distinct record ids (or the timeout).
fn distinct(kafka: &Kafka, topic: &str, want: usize, timeout: Duration) -> HashSet<String> {
    let deadline = Instant::now() + timeout;
    loop {
        let got = ids(&kafka.read(topic, want, Duration::from_secs(15)));
        if got.len() >= want || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

/// (partition, low, high) of every partition of `topic` that holds or held records.
fn watermarks(kafka: &Kafka, topic: &str) -> Vec<(i32, i64, i64)> {
    let consumer = kafka.consumer();
    let md = consumer
        .fetch_metadata(Some(topic), Duration::from_secs(10))
        .expect("metadata");
    let partitions = md.topics().first().map_or(0, |t| t.partitions().len()) as i32;
    (0..partitions)
        .map(|p| {
            let (low, high) = consumer
                .fetch_watermarks(topic, p, Duration::from_secs(10))
                .expect("watermarks");
            (p, low, high)
        })
        .filter(|(_, _, high)| *high > 0)
        .collect()
}

fn wait_until(what: &str, timeout: Duration, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !ok() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

#[test]
fn frames_deleted_by_retention_during_an_outage_are_counted_and_replication_goes_on() {
    const N: usize = 25;
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    // The edge sweeps expired records every 2 s (the packaged unit: every minute), so the test
    // waits seconds, not minutes, for the frames topic to shed its oldest frames.
    let edge = Kafka::start_sweeping_every(dir.path(), "edge", "2s");
    let mut cloud = Kafka::start(dir.path(), "cloud");
    // Frames keep 1 MiB per partition (the least the config allows: the record limit): about 9
    // photos of 112 KB; results keep their default (72 h).
    let extra = "kafka.retention.frames.retention_bytes = 1048576";
    let cfg = config(
        &mqtt,
        &edge,
        &cloud,
        extra,
        "",
        "enabled = true\nthumbnail_max_side = 64",
    );
    let mut node = Node::start(dir.path(), &cfg);

    // One frame before the outage: replicated, so the uplink has a checkpoint on the frames.
    publish(mqtt.port, &rockets(0..=0));
    assert_eq!(
        distinct(&cloud, "fovea.frames", 1, Duration::from_secs(60)).len(),
        1,
        "the first frame never reached the cloud"
    );
    std::thread::sleep(Duration::from_secs(2)); // its commit (every 200 ms)
    let first = watermarks(&edge, "fovea.frames");
    assert_eq!(first.len(), 1, "one camera, one partition: {first:?}");
    let (partition, _, checkpoint) = first[0];

    cloud.stop();
    publish(mqtt.port, &rockets(1..=N as u64));
    // Every frame in the edge broker, then a sweep (or two) that deleted the oldest ones.
    wait_until(
        "the frames in the edge broker",
        Duration::from_secs(120),
        || watermarks(&edge, "fovea.frames")[0].2 >= checkpoint + N as i64,
    );
    wait_until(
        "the edge's retention sweep",
        Duration::from_secs(30),
        || watermarks(&edge, "fovea.frames")[0].1 > checkpoint,
    );
    std::thread::sleep(Duration::from_secs(5)); // further sweeps find nothing more to delete
    let (_, low, high) = watermarks(&edge, "fovea.frames")[0];
    assert_eq!(high, checkpoint + N as i64);
    let retained = (high - low) as usize;
    println!("edge frames/{partition}: checkpoint {checkpoint}, log start {low}, end {high}");
    assert!(retained < N && retained > 0, "retained {retained} of {N}");

    // The node restarts during the outage (the frames it had read ahead are gone with the
    // process): its checkpoint is below the log start. librdkafka's default reset would jump to
    // the end and replicate none of the retained frames.
    let first_log = node.stop();
    node.restart();
    cloud.restart();

    // Every result, exactly once after dedupe by record id.
    let results = distinct(&cloud, "fovea.results", N + 1, Duration::from_secs(180));
    assert_eq!(results.len(), N + 1, "results in the cloud");
    // The retained frames arrive; the expired ones are counted.
    let frames = distinct(
        &cloud,
        "fovea.frames",
        1 + retained,
        Duration::from_secs(180),
    );
    let arrived = frames.len() - 1;
    let (_, body) = node.http_get("/metrics");
    let series = format!(
        "fovea_uplink_expired_records_total{{topic=\"fovea.frames\",partition=\"{partition}\"}}"
    );
    let expired = metric(&body, &series).unwrap_or(0.0) as usize;
    let log = node.proc.log_text();
    println!(
        "sent {N} frames in the outage: {arrived} arrived, {expired} counted expired; results \
         {}",
        results.len()
    );
    assert_eq!(arrived, retained, "every retained frame is replicated");
    assert_eq!(arrived + expired, N, "arrived + expired = sent");
    let range = format!(
        "{expired} records of fovea.frames/{partition} (offsets {checkpoint}..{})",
        low - 1
    );
    assert_eq!(
        log.matches("expired from the local broker before they were replicated")
            .count(),
        1,
        "one warning per gap: {log}"
    );
    if let Some(line) = log
        .lines()
        .find(|l| l.contains("expired from the local broker"))
    {
        println!("{line}");
    }
    assert!(log.contains(&range), "no warning with {range:?}: {log}");
    assert!(!first_log.contains("expired from the local broker"));

    // Replication goes on: a frame published now arrives, and the checkpoint passed the gap.
    publish(mqtt.port, &rockets(N as u64 + 1..=N as u64 + 1));
    let frames = distinct(
        &cloud,
        "fovea.frames",
        retained + 2,
        Duration::from_secs(60),
    );
    assert_eq!(frames.len(), retained + 2, "the frame after the gap");
    let results = distinct(&cloud, "fovea.results", N + 2, Duration::from_secs(60));
    assert_eq!(results.len(), N + 2);
    std::thread::sleep(Duration::from_secs(2));
    let (status, out, _) = fovea(&[
        "status",
        "--config",
        dir.path().join("fovea.toml").to_str().unwrap(),
    ]);
    println!("fovea status: {status:?}\n{out}");
    assert!(
        out.contains("lag fovea.frames: 0 records") && !out.contains("below the log start"),
        "the checkpoint passed the gap: {out}"
    );
    // Frames decode as frames (thumbnails of the photos).
    let sample = cloud.read("fovea.frames", 1, Duration::from_secs(10));
    assert!(Frame::decode(rdkafka::Message::payload(&sample[0]).unwrap()).is_ok());
}

#[test]
fn an_old_unreplicated_result_makes_readyz_warn_and_the_node_stays_ready() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let edge = Kafka::start(dir.path(), "edge");
    let mut cloud = Kafka::start(dir.path(), "cloud");
    cloud.stop();
    // Results are deleted after 20 s; the warning comes at half of it.
    let extra = "kafka.retention.results.retention_ms = 20000";
    let cfg = config(
        &mqtt,
        &edge,
        &cloud,
        extra,
        "retention_warn_share = 0.5",
        "",
    );
    let node = Node::start(dir.path(), &cfg);
    publish(mqtt.port, &rockets(0..=2));
    let written = Instant::now();
    wait_until(
        "the results in the edge broker",
        Duration::from_secs(60),
        || {
            watermarks(&edge, "fovea.results")
                .iter()
                .map(|(_, _, high)| high)
                .sum::<i64>()
                >= 3
        },
    );
    let mut warned = None;
    while written.elapsed() < Duration::from_secs(30) {
        let (status, body) = node.http_get("/readyz");
        if body.contains("warn uplink retention: fovea.results") {
            warned = Some((status, body, written.elapsed()));
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    let (status, body, after) = warned.expect("/readyz never warned");
    println!("warned after {after:?} (status {status}):\n{body}");
    assert_eq!(status, 200, "a warning keeps the node ready: {body}");
    assert!(after < Duration::from_secs(16), "warned after {after:?}");
    assert!(body.contains("of its 20 s retention"), "{body}");
    let (_, metrics) = node.http_get("/metrics");
    let ratio = metric(
        &metrics,
        "fovea_uplink_retention_used_ratio{topic=\"fovea.results\"}",
    )
    .expect("ratio metric");
    let age = metric(
        &metrics,
        "fovea_uplink_oldest_unreplicated_age_seconds{topic=\"fovea.results\"}",
    )
    .expect("age metric");
    println!("ratio {ratio}, age {age} s");
    assert!(ratio >= 0.5, "ratio {ratio}");
    assert!(
        (age / 20.0 - ratio).abs() < 0.1,
        "age {age} s, ratio {ratio}"
    );
}
