//! The box's disk is bounded: fovea's topics carry the retention of their class (set at creation,
//! corrected on existing topics), the local broker (nisshi, as packaged) deletes what is past it,
//! `fovea validate` adds up the disk budget, and `/metrics` shows each part.

#![allow(clippy::unwrap_used)]

mod harness;

use harness::*;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, ResourceSpecifier};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::Consumer;
use std::collections::HashMap;
use std::time::{Duration, Instant};

fn admin(kafka: &Kafka) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .create()
        .expect("admin client")
}

/// The retention settings the broker reports for `topic` (only those it reports).
fn retention_of(kafka: &Kafka, topic: &str) -> HashMap<String, String> {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    let found = rt
        .block_on(admin(kafka).describe_configs(
            &[ResourceSpecifier::Topic(topic)],
            &AdminOptions::new().request_timeout(Some(Duration::from_secs(5))),
        ))
        .expect("describe_configs");
    found
        .into_iter()
        .flat_map(|r| r.map(|c| c.entries).unwrap_or_default())
        .filter(|e| e.name.starts_with("retention.") || e.name == "segment.bytes")
        .filter_map(|e| Some((e.name, e.value?)))
        .collect()
}

fn expect(settings: &[(&str, &str)]) -> HashMap<String, String> {
    settings
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

const FRAMES_DEFAULT: [(&str, &str); 3] = [
    ("retention.ms", "21600000"),
    ("retention.bytes", "1073741824"),
    ("segment.bytes", "67108864"),
];
const RESULTS_DEFAULT: [(&str, &str); 3] = [
    ("retention.ms", "259200000"),
    ("retention.bytes", "1073741824"),
    ("segment.bytes", "67108864"),
];
const DEAD_LETTERS_DEFAULT: [(&str, &str); 3] = [
    ("retention.ms", "604800000"),
    ("retention.bytes", "134217728"),
    ("segment.bytes", "16777216"),
];

/// With the packaged default config: new topics get their class's retention; a topic that exists
/// without any (as fovea made them before retention) and one with a wrong retention.ms are
/// corrected; with `correct_existing` off the node only warns.
#[test]
fn topics_carry_their_class_retention_and_existing_ones_are_corrected() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    // What an older fovea left: frames with nothing set, results with a week's retention.ms.
    kafka.create_topic("fovea.frames", 3, &[]);
    kafka.create_topic("fovea.results", 3, &[("retention.ms", "604800000")]);
    std::fs::write(
        dir.path().join("fovea.toml"),
        node_config(&mqtt, &kafka, ""),
    )
    .expect("config");

    // Correcting off: warnings name what differs, nothing changes; the new topic is as configured.
    let mut node = Node::launch_with(
        dir.path(),
        &[],
        &[("FOVEA_KAFKA__RETENTION__CORRECT_EXISTING", "false")],
    );
    let log = wait_for_log(
        &node,
        "topic fovea.deadletter: retention as kafka.retention.dead_letters says",
    );
    for needle in [
        "topic fovea.frames: retention differs from kafka.retention.frames: retention.ms not reported (wanted 21600000)",
        "topic fovea.results: retention differs from kafka.retention.results: retention.ms=604800000 (wanted 259200000)",
    ] {
        assert!(log.contains(needle), "no {needle:?} in: {log}");
    }
    node.stop();
    assert_eq!(retention_of(&kafka, "fovea.frames"), expect(&[]));
    assert_eq!(
        retention_of(&kafka, "fovea.results"),
        expect(&[("retention.ms", "604800000")])
    );
    assert_eq!(
        retention_of(&kafka, "fovea.deadletter"),
        expect(&DEAD_LETTERS_DEFAULT)
    );

    // The default: corrected through IncrementalAlterConfigs, and said so once per topic.
    let mut node = Node::launch_with(dir.path(), &[], &[]);
    let log = wait_for_log(&node, "topic fovea.deadletter: retention as");
    for needle in [
        "topic fovea.frames: retention corrected to kafka.retention.frames; it had retention.ms not reported",
        "topic fovea.results: retention corrected to kafka.retention.results; it had retention.ms=604800000",
    ] {
        assert!(log.contains(needle), "no {needle:?} in: {log}");
    }
    node.stop();
    assert_eq!(
        retention_of(&kafka, "fovea.frames"),
        expect(&FRAMES_DEFAULT)
    );
    assert_eq!(
        retention_of(&kafka, "fovea.results"),
        expect(&RESULTS_DEFAULT)
    );
    assert_eq!(
        retention_of(&kafka, "fovea.deadletter"),
        expect(&DEAD_LETTERS_DEFAULT)
    );
}

/// What nisshi does with the settings, observed: a frames topic capped at 1 MiB per partition
/// (the smallest the config allows: one record of the largest size) keeps only its newest frames
/// after a sweep, while every result stays; the bytes kept stay under the cap.
#[test]
fn the_broker_deletes_frames_past_retention_bytes_and_keeps_the_results() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    // A sweep every 2 s instead of the unit's minute, so the test sees it within seconds.
    let kafka = Kafka::start_sweeping_every(dir.path(), "edge", "2s");
    let cap = 1u64 << 20;
    let config = node_config(
        &mqtt,
        &kafka,
        &format!(
            "kafka.retention.frames.retention_bytes = {cap}\nkafka.data_dir = \"{}\"",
            kafka.data_dir().display()
        ),
    );
    let node = Node::start(dir.path(), &config);
    let photos = ["chelsea.png", "coffee.png", "rocket.jpg", "astronaut.png"];
    let sent = 24;
    let messages: Vec<_> = (0..sent)
        .map(|i| {
            (
                format!("cameras/cam-{}/frames", i % 3),
                sample_image(photos[i % photos.len()]),
            )
        })
        .collect();
    let sent_bytes: usize = messages.iter().map(|(_, p)| p.len()).sum();
    publish(mqtt.port, &messages);
    let results = kafka.read("fovea.results", sent, Duration::from_secs(90));
    assert_eq!(results.len(), sent, "every result is kept");

    // Every frame is written once its result is. Two sweeps (2 s apart) after the last write have
    // run 5 s later; then each partition must be within the cap.
    std::thread::sleep(Duration::from_secs(5));
    let consumer = kafka.consumer();
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut kept, mut deleted) = (0i64, 0i64);
    while Instant::now() < deadline {
        (kept, deleted) = (0, 0);
        for p in 0..3 {
            let (low, high) = consumer
                .fetch_watermarks("fovea.frames", p, Duration::from_secs(5))
                .expect("watermarks");
            kept += high - low;
            deleted += low;
        }
        if deleted > 0 {
            break;
        }
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(
        deleted > 0,
        "no frame was deleted: {sent_bytes} bytes sent against a {cap}-byte cap"
    );
    assert_eq!(kept + deleted, sent as i64, "every frame was written");
    let frames = kafka.read("fovea.frames", kept as usize, Duration::from_secs(30));
    assert_eq!(frames.len() as i64, kept);
    let largest = messages.iter().map(|(_, p)| p.len()).max().unwrap_or(0) as u64;
    let mut per_partition: HashMap<i32, u64> = HashMap::new();
    for f in &frames {
        use rdkafka::Message;
        *per_partition.entry(f.partition()).or_default() +=
            (f.payload().map_or(0, <[u8]>::len) + f.key().map_or(0, <[u8]>::len)) as u64;
    }
    for (p, bytes) in &per_partition {
        // nisshi keeps key + value bytes within the cap, and always the newest record.
        assert!(
            *bytes <= cap.max(largest + 4096),
            "partition {p} keeps {bytes} bytes over a {cap}-byte cap"
        );
    }
    println!(
        "sent {sent} frames ({sent_bytes} bytes); kept {kept}, deleted {deleted}; bytes kept per partition {per_partition:?}"
    );

    // /metrics shows each part of the disk budget (sampled at start, then every 30 s).
    let (_, body) = node.http_get("/metrics");
    let broker_budget = metric(&body, "fovea_disk_budget_bytes{part=\"local_broker\"}")
        .expect("local broker budget");
    // 3 topics x 3 partitions: frames (1 MiB + 64 MiB segment), results, dead letters.
    assert_eq!(
        broker_budget as u64,
        3 * ((cap + (64 << 20)) + (1088 << 20) + (144 << 20))
    );
    assert!(
        metric(&body, "fovea_disk_bytes{part=\"spool\"}").is_some(),
        "{body}"
    );
    let broker_bytes =
        metric(&body, "fovea_disk_bytes{part=\"local_broker\"}").expect("local broker bytes");
    assert!(broker_bytes > 0.0, "the broker's folder holds its database");
    assert!(metric(&body, "fovea_disk_free_bytes{part=\"logs\"}").is_some());
    drop(node);
}

/// `fovea validate` adds up the budget per filesystem: on a 16 MiB filesystem the default spool
/// (1 GiB) cannot fit, and the warning names the part; a spool sized for it fits.
#[test]
fn validate_warns_when_the_budget_exceeds_a_small_filesystem() {
    let dir = temp_dir();
    let Some(_fs) = Tmpfs::mount(&dir.path().join("small"), 16) else {
        return;
    };
    let mqtt_port = free_port();
    let config = |spool: &str, mqtt: &str| {
        format!(
            "[node]\nid = \"t\"\nstate_dir = \"small/state\"\n[mqtt]\nport = {mqtt_port}\n{mqtt}\n\
             [kafka]\ndata_dir = \"\"\n[inference]\nonnxruntime_library = \"{ort}\"\n\
             [spool]\n{spool}\n[[models]]\npath = \"{models}/efficientnet-lite0\"\n\
             [[routes]]\ncameras = \"*\"\nmodels = [\"efficientnet-lite0\"]\n",
            ort = ort_library().display(),
            models = repo_root().join("models").display()
        )
    };
    let path = dir.path().join("fovea.toml");
    std::fs::write(&path, config("", "")).unwrap();
    let (code, out, err) = fovea(&["validate", path.to_str().unwrap()]);
    assert_eq!(
        code,
        Some(0),
        "a warning does not fail validate: {out}{err}"
    );
    assert!(out.contains("spool            1.0 GiB"), "{out}");
    assert!(
        err.contains(
            "warning: disk budget: spool (1.0 GiB) + chunk_uploads (128.0 MiB) + ingress_spill \
             (1.0 GiB) may grow to 2.1 GiB on the filesystem of"
        ) && err.contains("but only 16.0 MiB is free"),
        "{err}"
    );
    // 4 MiB of spool, 2 MiB of chunked uploads (2 x max_frame_bytes), 4 MiB of spill: 10 MiB.
    std::fs::write(
        &path,
        config(
            "max_bytes = 4194304",
            "max_frame_bytes = 1048576\nspill_max_bytes = 4194304",
        ),
    )
    .unwrap();
    let (code, out, err) = fovea(&["validate", path.to_str().unwrap()]);
    assert_eq!(code, Some(0));
    assert!(!err.contains("warning: disk budget"), "{out}{err}");
    assert!(out.contains("spool            4.0 MiB"), "{out}");
}

fn wait_for_log(node: &Node, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let log = node.proc.log_text();
        if log.contains(needle) {
            return log;
        }
        assert!(Instant::now() < deadline, "no {needle:?} in the log: {log}");
        std::thread::sleep(Duration::from_millis(100));
    }
}
