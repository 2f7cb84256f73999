#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Faults on the way to the local broker, with real mosquitto, a real Kafka-protocol broker and
//! the real `fovea` binary: the broker stopped under load, the node SIGKILLed, the spool full, a
//! corrupt spool, no broker at start. Each test counts what was sent and what arrived.

mod harness;

use harness::*;
use std::collections::HashSet;
use std::time::{Duration, Instant};

/// Classifier only (the load tests need the CPU), a short divert time so an outage is noticed
/// quickly, and any extra settings.
fn config(mqtt: &Mosquitto, kafka_port: u16, extra: &str) -> String {
    let models = repo_root().join("models");
    format!(
        r#"
[node]
id = "fault-node"
state_dir = "state"

[mqtt]
port = {mqtt}

[kafka]
brokers = "127.0.0.1:{kafka_port}"

[inference]
onnxruntime_library = "{ort}"

[spool]
divert_after_ms = 1000
probe_interval_ms = 200
{extra}

[metrics]
listen = "127.0.0.1:{metrics}"

[[models]]
path = "{models}/efficientnet-lite0"

[[routes]]
cameras = "*"
models = ["efficientnet-lite0"]
"#,
        mqtt = mqtt.port,
        metrics = free_port(),
        ort = ort_library().display(),
        models = models.display(),
    )
}

/// Waits until `topic` holds a record for every (camera, seq) in `expected`; returns the records.
fn wait_for_all(
    kafka: &Kafka,
    topic: &str,
    expected: &HashSet<(String, u64)>,
    timeout: Duration,
    by_frame: fn(&[rdkafka::message::OwnedMessage]) -> ByFrame,
) -> ByFrame {
    let deadline = Instant::now() + timeout;
    loop {
        let got = by_frame(&kafka.read(topic, expected.len(), Duration::from_secs(20)));
        let missing = expected.iter().filter(|k| !got.contains_key(*k)).count();
        if missing == 0 || Instant::now() > deadline {
            return got;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

fn expected(cameras: usize, per_camera: u64) -> HashSet<(String, u64)> {
    (1..=cameras)
        .flat_map(|c| (1..=per_camera).map(move |s| (format!("load-{c}"), s)))
        .collect()
}

/// Every expected frame arrived; duplicates (at-least-once) carry one and the same record id.
fn assert_complete(what: &str, got: &ByFrame, want: &HashSet<(String, u64)>) {
    let missing: Vec<_> = want.iter().filter(|k| !got.contains_key(*k)).collect();
    assert!(
        missing.is_empty(),
        "{what}: {} of {} missing, e.g. {:?}",
        missing.len(),
        want.len(),
        missing.iter().take(5).collect::<Vec<_>>()
    );
    let extra: Vec<_> = got.keys().filter(|k| !want.contains(*k)).collect();
    assert!(extra.is_empty(), "{what}: unexpected {extra:?}");
    for (key, ids) in got {
        let distinct: HashSet<_> = ids.iter().collect();
        assert_eq!(
            distinct.len(),
            1,
            "{what}: duplicates of {key:?} with different ids: {ids:?}"
        );
        assert_eq!(ids[0], format!("fault-node/{}/s{}", key.0, key.1));
    }
}

/// Every expected frame and its result reached Kafka (see [`assert_complete`]).
fn assert_all_arrived(kafka: &Kafka, want: &HashSet<(String, u64)>, timeout: Duration) {
    let results = wait_for_all(kafka, "fovea.results", want, timeout, results_by_frame);
    assert_complete("results", &results, want);
    let frames = wait_for_all(kafka, "fovea.frames", want, timeout, frames_by_frame);
    assert_complete("frames", &frames, want);
}

#[test]
fn broker_outage_under_load_loses_nothing_even_across_a_crash() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let mut kafka = Kafka::start(dir.path(), "edge");
    let mut node = Node::start(dir.path(), &config(&mqtt, kafka.port, ""));
    let load = Load::start(mqtt.port, 5, 5.0, small_jpegs());

    std::thread::sleep(Duration::from_secs(5));
    kafka.stop();
    std::thread::sleep(Duration::from_secs(30));
    // A crash while offline: the spool it leaves behind must be replayed.
    node.kill();
    node.restart();
    std::thread::sleep(Duration::from_secs(32));
    kafka.restart();
    std::thread::sleep(Duration::from_secs(5));
    let per_camera = load.stop();
    assert!(
        per_camera >= 5 * 70,
        "load sent only {per_camera} frames per camera"
    );

    assert_all_arrived(&kafka, &expected(5, per_camera), Duration::from_secs(180));
    let log = node.stop();
    assert!(log.contains("offline -> catch-up"), "{log}");
}

#[test]
fn sigkill_at_random_moments_loses_no_acknowledged_frame() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let mut node = Node::start(dir.path(), &config(&mqtt, kafka.port, ""));
    let load = Load::start(mqtt.port, 3, 5.0, small_jpegs());
    // Deterministic "random" pauses between kills, 0.5 to 3.5 s.
    let mut state = 0x9e37_79b9_u32;
    for _ in 0..6 {
        state ^= state << 13;
        state ^= state >> 17;
        state ^= state << 5;
        std::thread::sleep(Duration::from_millis(500 + u64::from(state % 3000)));
        node.kill();
        node.restart();
    }
    std::thread::sleep(Duration::from_secs(2));
    let per_camera = load.stop();
    assert_all_arrived(&kafka, &expected(3, per_camera), Duration::from_secs(120));
}

/// (camera, sequence) for sequences 1..=count.
fn numbered(camera: &str, count: u64) -> HashSet<(String, u64)> {
    (1..=count).map(|s| (camera.to_string(), s)).collect()
}

fn publish_numbered(mqtt: &Mosquitto, camera: &str, count: u64, image: &[u8]) {
    use fovea_proto::v1::Frame;
    use prost::Message as _;
    let messages: Vec<_> = (1..=count)
        .map(|seq| {
            let f = Frame {
                sequence: seq,
                data: image.to_vec().into(),
                ..Frame::default()
            };
            (format!("cameras/{camera}/frames"), f.encode_to_vec())
        })
        .collect();
    publish(mqtt.port, &messages);
}

/// Waits until the node's log says `count` frames were spooled and acked (it logs each flush).
fn wait_log(node: &Node, needle: &str, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    while !node.proc.log_text().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "never logged {needle:?}:\n{}",
            node.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn full_spool_drops_the_oldest_frames_and_counts_every_drop() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka_port = free_port();
    // 1 MiB of spool; 20 frames of ~240 KB while the broker is away: most frames must go.
    let mut node = Node::start(
        dir.path(),
        &config(&mqtt, kafka_port, "max_bytes = 1048576"),
    );
    let image = sample_image("chelsea.png");
    publish_numbered(&mqtt, "full", 20, &image);
    wait_log(&node, "spooled: 20 frame(s) acked", Duration::from_secs(60));

    let kafka = Kafka::start_on(dir.path(), "edge", kafka_port);
    let all = numbered("full", 20);
    let results = wait_for_all(
        &kafka,
        "fovea.results",
        &all,
        Duration::from_secs(60),
        results_by_frame,
    );
    assert_eq!(results.len(), 20, "every result is kept");
    let frames = frames_by_frame(&kafka.read("fovea.frames", 20, Duration::from_secs(10)));
    let missing: Vec<u64> = (1..=20)
        .filter(|s| !frames.contains_key(&("full".to_string(), *s)))
        .collect();
    assert!(
        !missing.is_empty() && frames.len() >= 2,
        "frames kept: {}",
        frames.len()
    );
    // The oldest went first: what is missing is a prefix of the sequence.
    assert_eq!(missing, (1..=missing.len() as u64).collect::<Vec<_>>());
    node.stop();

    let spool_dir = dir.path().join("state/spool");
    let (code, stats, err) = fovea(&["spool", "stats", "--dir", spool_dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    let dropped: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("dropped frame/spool-full-oldest: "))
        .and_then(|n| n.trim().parse().ok())
        .unwrap_or_else(|| panic!("no drop counter in:\n{stats}"));
    assert_eq!(
        dropped,
        missing.len() as u64,
        "drop counter vs frames missing\n{stats}"
    );
}

#[test]
fn full_spool_with_backpressure_keeps_every_frame() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka_port = free_port();
    let extra = "max_bytes = 1048576\nwhen_full = \"backpressure\"";
    let node = Node::start(dir.path(), &config(&mqtt, kafka_port, extra));
    let image = sample_image("chelsea.png");
    publish_numbered(&mqtt, "full", 12, &image);
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !node.proc.log_text().contains("spooled: 12 frame(s)"),
        "backpressure did not hold frames back"
    );
    let kafka = Kafka::start_on(dir.path(), "edge", kafka_port);
    let all = numbered("full", 12);
    let frames = wait_for_all(
        &kafka,
        "fovea.frames",
        &all,
        Duration::from_secs(90),
        frames_by_frame,
    );
    assert_eq!(
        frames.len(),
        12,
        "every frame arrives once the spool drains"
    );
}

#[test]
fn corrupt_spool_on_start_is_quarantined_and_the_rest_drains() {
    use fovea::spool::{Class, SledSpool, Spool, SpoolOptions, SpoolRecord, WhenFull};
    let dir = temp_dir();
    let spool_dir = dir.path().join("state/spool");
    std::fs::create_dir_all(&spool_dir).unwrap();
    {
        let opts = SpoolOptions {
            dir: spool_dir.clone(),
            max_bytes: 1 << 30,
            when_full: WhenFull::DropOldestFrames,
        };
        let (mut spool, _) = SledSpool::open(opts).unwrap();
        for i in 0..10u8 {
            let record = SpoolRecord {
                class: Class::Result,
                topic: "fovea.results".into(),
                key: "cam".into(),
                headers: vec![("fovea-record-id".into(), format!("old/cam/s{i}"))],
                value: vec![i; 100],
                created_ms: 1,
            };
            spool.append(&record).unwrap();
        }
        spool.flush().unwrap();
    }
    fovea::spool::inject_raw_for_tests(&spool_dir, b"FS\x01garbage that is no record").unwrap();
    let (code, report, err) = fovea(&["spool", "verify", "--dir", spool_dir.to_str().unwrap()]);
    assert_eq!(
        code,
        Some(1),
        "verify must fail on a corrupt record: {report}{err}"
    );
    assert!(report.contains("corrupt"), "{report}");

    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let mut node = Node::start(dir.path(), &config(&mqtt, kafka.port, ""));
    let drained = kafka.read("fovea.results", 10, Duration::from_secs(60));
    assert_eq!(drained.len(), 10, "intact records drain");
    let log = node.stop();
    assert!(
        log.contains("quarantine"),
        "the node reports the quarantine:\n{log}"
    );
    let (code, report, err) = fovea(&["spool", "verify", "--dir", spool_dir.to_str().unwrap()]);
    assert_eq!(
        code,
        Some(0),
        "after quarantine the spool verifies: {report}{err}"
    );
    assert!(report.contains("quarantined so far: 1"), "{report}");
}

#[test]
fn broker_down_at_start_then_appearing_gets_everything() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka_port = free_port();
    let node = Node::start(dir.path(), &config(&mqtt, kafka_port, ""));
    publish_numbered(&mqtt, "early", 5, &sample_image("coffee.png"));
    wait_log(&node, "spooled: 5 frame(s) acked", Duration::from_secs(60));
    let kafka = Kafka::start_on(dir.path(), "edge", kafka_port);
    let all = numbered("early", 5);
    let results = wait_for_all(
        &kafka,
        "fovea.results",
        &all,
        Duration::from_secs(60),
        results_by_frame,
    );
    let frames = wait_for_all(
        &kafka,
        "fovea.frames",
        &all,
        Duration::from_secs(60),
        frames_by_frame,
    );
    assert_eq!((results.len(), frames.len()), (5, 5));
}
