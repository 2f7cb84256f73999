#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Faults on the way to the local broker, with real mosquitto, a real Kafka-protocol broker and
//! the real `fovea` binary: the broker stopped under load, the node SIGKILLed, the spool full
//! (also with chunked frames), the spool's file system full, a corrupt spool, no broker at
//! start. Each test counts what was sent, acked and arrived.

mod harness;

use fovea_proto::chunks::{HEADER_CHUNK_COUNT, HEADER_CHUNK_INDEX};
use fovea_proto::headers as h;
use harness::*;
use rdkafka::message::OwnedMessage;
use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::time::{Duration, Instant};

/// Classifier only (the load tests need the CPU), a short divert time so an outage is noticed
/// quickly, and any extra `[spool]` settings.
fn config(mqtt: &Mosquitto, kafka_port: u16, extra: &str) -> String {
    config_with(mqtt, kafka_port, "", extra)
}

/// [`config`] with extra `[kafka]` settings too.
fn config_with(mqtt: &Mosquitto, kafka_port: u16, kafka_extra: &str, extra: &str) -> String {
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
{kafka_extra}

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

// ---- frames in chunks, and a full file system ----

/// Records of at most 64 KiB instead of the packaged 1 MiB, so that the sample photos (240 to
/// 790 KB) travel as 4 to 13 chunks.
const SMALL_RECORDS: &str = "record_limit_bytes = 65536";

/// A camera's image split into chunk records: one photo, `coffee.png` (467 KB, 8 chunks of 64 KiB).
fn coffee() -> Vec<u8> {
    sample_image("coffee.png")
}

/// The chunk indexes seen for each frame record id on the frames topic, and the count they
/// announce (a frame in one record: count 1, index 0).
type ChunkSets = HashMap<String, (usize, HashSet<usize>)>;

fn chunk_sets(records: &[OwnedMessage]) -> ChunkSets {
    let mut out = ChunkSets::new();
    for r in records {
        let id = header(r, h::RECORD_ID).expect("record id");
        let num = |name: &str, default: usize| {
            header(r, name).map_or(default, |v| v.parse().expect("chunk header"))
        };
        let e = out.entry(id).or_default();
        e.0 = num(HEADER_CHUNK_COUNT, 1);
        e.1.insert(num(HEADER_CHUNK_INDEX, 0));
    }
    out
}

/// Reads the frames topic until `frames` frames arrived whole (or `timeout` passed).
fn wait_for_frames(kafka: &Kafka, frames: usize, timeout: Duration) -> ChunkSets {
    let deadline = Instant::now() + timeout;
    let mut want = frames;
    loop {
        let sets = chunk_sets(&kafka.read("fovea.frames", want, Duration::from_secs(20)));
        let whole = sets.values().filter(|(n, got)| got.len() == *n).count();
        if whole >= frames || Instant::now() > deadline {
            return sets;
        }
        want = frames * sets.values().map(|(n, _)| *n).max().unwrap_or(1);
        std::thread::sleep(Duration::from_secs(2));
    }
}

/// No frame in Kafka lacks a chunk.
fn assert_no_partial_frame(sets: &ChunkSets) {
    for (id, (count, got)) in sets {
        let missing: Vec<usize> = (0..*count).filter(|i| !got.contains(i)).collect();
        assert!(
            missing.is_empty(),
            "{id}: chunks {missing:?} of {count} never arrived"
        );
    }
}

/// The camera sequences of the files `fovea frames export` wrote for `camera` (`s7.png` -> 7),
/// each checked byte for byte against `image`.
fn exported_sequences(out: &Path, camera: &str, image: &[u8]) -> Vec<u64> {
    let mut seqs: Vec<u64> = std::fs::read_dir(out.join(camera))
        .map(|d| d.map(|e| e.unwrap().path()).collect::<Vec<_>>())
        .unwrap_or_default()
        .iter()
        .map(|path| {
            assert!(std::fs::read(path).unwrap() == image, "{}", path.display());
            let stem = path.file_stem().and_then(|s| s.to_str()).unwrap();
            stem.strip_prefix('s').and_then(|n| n.parse().ok()).unwrap()
        })
        .collect();
    seqs.sort_unstable();
    seqs
}

/// Starts the local broker on `port` and waits until every result of `camera`'s frames
/// 1..=`count` arrived (once each id).
fn broker_returns(dir: &Path, port: u16, camera: &str, count: u64) -> Kafka {
    let kafka = Kafka::start_on(dir, "edge", port);
    let all = numbered(camera, count);
    let timeout = Duration::from_secs(120);
    let results = wait_for_all(&kafka, "fovea.results", &all, timeout, results_by_frame);
    assert_complete("results", &results, &all);
    kafka
}

fn scrape(node: &Node, series: &str) -> f64 {
    let (_, body) = node.http_get("/metrics");
    metric(&body, series).unwrap_or_else(|| panic!("no {series} in:\n{body}"))
}

#[test]
fn backpressure_holds_a_chunked_frame_larger_than_the_free_spool_whole_and_unacked() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka_port = free_port();
    // Not the packaged defaults: 64 KiB records (not 1 MiB) so that coffee.png goes as 8 chunks,
    // and a spool of 1 MiB (the least allowed; not 1 GiB) that holds two such frames and leaves
    // room for more than one chunk, not for the third frame: where checking the first chunk
    // alone let a frame in part-way.
    let spool = "max_bytes = 1048576\nwhen_full = \"backpressure\"";
    let node = Node::start(
        dir.path(),
        &config_with(&mqtt, kafka_port, SMALL_RECORDS, spool),
    );
    let image = coffee();
    publish_numbered(&mqtt, "held", 6, &image);
    wait_log(&node, "spooled: 2 frame(s) acked", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(5));
    assert!(
        !node.proc.log_text().contains("spooled: 3 frame(s)"),
        "the third frame must wait un-acked"
    );
    assert_eq!(scrape(&node, "fovea_frames_acked_total"), 2.0);
    assert_eq!(scrape(&node, "fovea_frames_dropped_total"), 0.0);
    let free = 1_048_576.0 - scrape(&node, "fovea_spool_bytes");
    assert!(
        free > 65_536.0 && free < image.len() as f64,
        "room for a chunk, not for a frame: {free} bytes free"
    );
    let frame_records = scrape(&node, "fovea_spool_records{class=\"frame\"}");
    println!(
        "broker away: 2 of 6 frames acked, {frame_records} chunk records spooled, {free} bytes free"
    );

    // The broker returns: the spool drains, then the held frames (still queued at mosquitto)
    // are written.
    let kafka = broker_returns(dir.path(), kafka_port, "held", 6);
    let sets = wait_for_frames(&kafka, 6, Duration::from_secs(120));
    assert_no_partial_frame(&sets);
    assert_eq!(sets.len(), 6, "{:?}", sets.keys().collect::<Vec<_>>());
    let chunks = sets.values().map(|(n, _)| *n).max().unwrap();
    assert!(chunks >= 7, "coffee.png in {chunks} chunks");
    assert_eq!(
        frame_records,
        (2 * chunks) as f64,
        "two whole frames were spooled"
    );
    let out = dir.path().join("export");
    let summary = export_frames(&kafka, &out);
    assert!(summary.contains(" 0 incomplete, 0 failed"), "{summary}");
    assert_eq!(
        exported_sequences(&out, "held", &image),
        (1..=6).collect::<Vec<_>>()
    );
    assert_eq!(scrape(&node, "fovea_frames_acked_total"), 6.0);
    assert_eq!(scrape(&node, "fovea_frames_dropped_total"), 0.0);
}

#[test]
fn drop_oldest_frames_drops_chunked_frames_whole_and_counts_them() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka_port = free_port();
    // Not the packaged defaults: 64 KiB records (not 1 MiB) so that coffee.png goes as 8 chunks,
    // a 1 MiB spool (not 1 GiB) that holds two such frames: of 10, most must go.
    let mut node = Node::start(
        dir.path(),
        &config_with(&mqtt, kafka_port, SMALL_RECORDS, "max_bytes = 1048576"),
    );
    let image = coffee();
    publish_numbered(&mqtt, "drop", 10, &image);
    wait_log(&node, "spooled: 10 frame(s) acked", Duration::from_secs(60));
    let dropped = scrape(&node, "fovea_frames_dropped_total");

    let kafka = broker_returns(dir.path(), kafka_port, "drop", 10);
    let kept = 10usize.saturating_sub(dropped as usize).max(1);
    let sets = wait_for_frames(&kafka, kept, Duration::from_secs(60));
    assert_no_partial_frame(&sets);
    let out = dir.path().join("export");
    let summary = export_frames(&kafka, &out);
    assert!(summary.contains(" 0 incomplete, 0 failed"), "{summary}");
    let arrived = exported_sequences(&out, "drop", &image);
    assert!(
        (1..=3).contains(&arrived.len()),
        "frames kept: {arrived:?} ({dropped} dropped)"
    );
    // The oldest went first, and the counter is the number of frames missing, not of chunks.
    assert_eq!(
        arrived,
        ((11 - arrived.len() as u64)..=10).collect::<Vec<_>>()
    );
    assert_eq!(
        dropped as usize,
        10 - arrived.len(),
        "drop counter vs frames missing"
    );
    println!("frames kept {arrived:?}, {dropped} dropped whole; {summary}");
    node.stop();
    let spool_dir = dir.path().join("state/spool");
    let (code, stats, err) = fovea(&["spool", "stats", "--dir", spool_dir.to_str().unwrap()]);
    assert_eq!(code, Some(0), "{err}");
    assert!(
        stats.contains(&format!(
            "dropped frame/spool-full-oldest: {}",
            10 - arrived.len()
        )),
        "{stats}"
    );
}

#[test]
fn a_spool_on_a_full_file_system_keeps_frames_unacked_and_loses_nothing() {
    let dir = temp_dir();
    // 16 MiB for the spool, whose max_bytes stays at the packaged 1 GiB: the disk is the limit.
    let Some(_fs) = Tmpfs::mount(&dir.path().join("spool-fs"), 16) else {
        return;
    };
    let mqtt = Mosquitto::start(dir.path());
    let kafka_port = free_port();
    let spool = format!("dir = \"{}\"", dir.path().join("spool-fs/spool").display());
    let node = Node::start(dir.path(), &config(&mqtt, kafka_port, &spool));
    // astronaut.png (792 KB, one record of its own file): about 15 fit beside the reserve.
    let image = sample_image("astronaut.png");
    publish_numbered(&mqtt, "disk", 30, &image);
    wait_log(&node, "the file system is full", Duration::from_secs(60));
    std::thread::sleep(Duration::from_secs(3));
    let acked = scrape(&node, "fovea_frames_acked_total");
    assert!((5.0..30.0).contains(&acked), "{acked} frames acked");
    assert!(
        scrape(
            &node,
            "fovea_spool_write_failures_total{reason=\"disk-full\"}"
        ) >= 1.0
    );
    assert_eq!(scrape(&node, "fovea_frames_dropped_total"), 0.0);
    assert_eq!(scrape(&node, "fovea_spool_records{class=\"frame\"}"), acked);
    let log = node.proc.log_text();
    assert!(!log.contains("panicked"), "{log}");
    println!(
        "the 16 MiB file system took {acked} of 30 frames; {} disk-full retries",
        scrape(
            &node,
            "fovea_spool_write_failures_total{reason=\"disk-full\"}"
        )
    );
    assert!(
        log.matches("the file system is full").count() <= 2,
        "logged at most every 10 s:\n{log}"
    );

    // The broker returns: what was acked drains, the rest comes from mosquitto. All 30 arrive.
    let kafka = Kafka::start_on(dir.path(), "edge", kafka_port);
    assert_all_arrived(&kafka, &numbered("disk", 30), Duration::from_secs(120));
    assert_eq!(scrape(&node, "fovea_frames_acked_total"), 30.0);
    assert_eq!(scrape(&node, "fovea_frames_dropped_total"), 0.0);
}
