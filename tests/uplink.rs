#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The uplink against two real brokers ("edge" and "cloud"): a cloud outage under load, the node
//! SIGKILLed mid-replication, the bandwidth cap, the frame rules, records the cloud refuses for
//! good, and a chunked frame written twice locally. Counts what was sent and what arrived.

mod harness;

use fovea_proto::headers as h;
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult};
use harness::*;
use prost::Message as _;
use rdkafka::ClientConfig;
use rdkafka::message::{Headers as _, Message as _, OwnedMessage, Timestamp};
use rdkafka::producer::{FutureProducer, FutureRecord};
use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

/// A node on `edge` replicating to `cloud`; the classifier only; `uplink_extra` goes into
/// `[uplink]`, `frames` into `[uplink.frames]`.
fn config(
    mqtt: &Mosquitto,
    edge: &Kafka,
    cloud: &Kafka,
    uplink_extra: &str,
    frames: &str,
) -> String {
    let spool = "spool.divert_after_ms = 1000\nspool.probe_interval_ms = 200";
    let base = node_config(mqtt, edge, spool).replace(
        "models = [\"efficientnet-lite0\", \"ssdlite-person\"]",
        "models = [\"efficientnet-lite0\"]",
    );
    format!(
        "{base}\n[uplink]\nenabled = true\nbrokers = \"{}\"\n{uplink_extra}\n\n[uplink.frames]\n{frames}\n",
        cloud.brokers()
    )
}

/// Frame envelopes of `camera` with sequences `seqs`, cycling through the small JPEGs.
fn small_frames(camera: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<(String, Vec<u8>)> {
    let photos = small_jpegs();
    seqs.map(|seq| {
        let f = Frame {
            sequence: seq,
            data: photos[seq as usize % 4].clone().into(),
            ..Frame::default()
        };
        (format!("cameras/{camera}/frames"), f.encode_to_vec())
    })
    .collect()
}

fn ts(m: &OwnedMessage) -> i64 {
    match m.timestamp() {
        Timestamp::CreateTime(t) | Timestamp::LogAppendTime(t) => t,
        Timestamp::NotAvailable => panic!("record without a timestamp"),
    }
}

fn record_ids(records: &[OwnedMessage]) -> Vec<String> {
    records
        .iter()
        .map(|r| header(r, h::RECORD_ID).expect("record id"))
        .collect()
}

/// Reads `topic` until it holds `want` distinct record ids (or the timeout).
fn read_distinct(kafka: &Kafka, topic: &str, want: usize, timeout: Duration) -> Vec<OwnedMessage> {
    let deadline = Instant::now() + timeout;
    loop {
        let records = kafka.read(topic, want, Duration::from_secs(20));
        let distinct: HashSet<_> = record_ids(&records).into_iter().collect();
        if distinct.len() >= want || Instant::now() > deadline {
            return records;
        }
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn cloud_outage_under_load_loses_no_result_and_results_catch_up_before_images() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let edge = Kafka::start(dir.path(), "edge");
    let mut cloud = Kafka::start(dir.path(), "cloud");
    let frames = "enabled = true\nthumbnail_max_side = 64";
    let _node = Node::start(dir.path(), &config(&mqtt, &edge, &cloud, "", frames));
    let load = Load::start(mqtt.port, 3, 5.0, small_jpegs());
    std::thread::sleep(Duration::from_secs(5));
    let stopped_at = now_ms() as i64;
    cloud.stop();
    std::thread::sleep(Duration::from_secs(125));
    let back_at = now_ms() as i64;
    cloud.restart();
    std::thread::sleep(Duration::from_secs(5));
    let per_camera = load.stop();
    let sent = 3 * per_camera as usize;

    let results = read_distinct(&cloud, "fovea.results", sent, Duration::from_secs(240));
    let ids = record_ids(&results);
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(
        distinct.len(),
        sent,
        "results in the cloud: {} distinct of {sent}",
        distinct.len()
    );
    // Duplicates (at least once) are byte-identical records under one id.
    let mut by_id: HashMap<&String, &[u8]> = HashMap::new();
    for (id, r) in ids.iter().zip(&results) {
        let value = r.payload().unwrap();
        assert_eq!(
            *by_id.entry(id).or_insert(value),
            value,
            "{id}: duplicates differ"
        );
        assert_eq!(header(r, "fovea-edge-node").as_deref(), Some("test-node"));
    }

    // Results of frames taken during the outage reached the cloud before any image taken after
    // the uplink's in-flight window had filled (20 s into the outage).
    let frames = read_distinct(&cloud, "fovea.frames", sent, Duration::from_secs(240));
    let outage_results: Vec<i64> = results
        .iter()
        .filter(|r| {
            let res = InferenceResult::decode(r.payload().unwrap()).unwrap();
            (stopped_at..back_at).contains(&res.received_at_ms)
        })
        .map(ts)
        .collect();
    let late_frames: Vec<i64> = frames
        .iter()
        .filter(|f| {
            let frame = Frame::decode(f.payload().unwrap()).unwrap();
            (stopped_at + 20_000..back_at).contains(&frame.received_at_ms)
        })
        .map(ts)
        .collect();
    assert!(
        outage_results.len() > 100 && late_frames.len() > 100,
        "{} / {}",
        outage_results.len(),
        late_frames.len()
    );
    let last_result = outage_results.iter().max().unwrap();
    let first_frame = late_frames.iter().min().unwrap();
    assert!(
        last_result <= first_frame,
        "a result was sent {} ms after the first backlog image",
        last_result - first_frame
    );
    eprintln!(
        "sent {sent} frames; cloud: {} result records ({} distinct), {} frame records; {} \
         results of the outage, {} images of its last {} s",
        results.len(),
        distinct.len(),
        frames.len(),
        outage_results.len(),
        late_frames.len(),
        (back_at - stopped_at - 20_000) / 1000
    );
}

#[test]
fn sigkill_during_replication_loses_nothing_and_does_not_start_over() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let edge = Kafka::start(dir.path(), "edge");
    let cloud = Kafka::start(dir.path(), "cloud");
    let mut node = Node::start(dir.path(), &config(&mqtt, &edge, &cloud, "", ""));
    publish(mqtt.port, &small_frames("k", 1..=150));
    let first = read_distinct(&cloud, "fovea.results", 150, Duration::from_secs(120));
    assert_eq!(record_ids(&first).iter().collect::<HashSet<_>>().len(), 150);
    std::thread::sleep(Duration::from_secs(1)); // the checkpoint is committed every 200 ms

    publish(mqtt.port, &small_frames("k", 151..=300));
    std::thread::sleep(Duration::from_millis(1500));
    node.kill();
    node.restart();
    let all = read_distinct(&cloud, "fovea.results", 300, Duration::from_secs(120));
    let ids = record_ids(&all);
    let distinct: HashSet<&String> = ids.iter().collect();
    assert_eq!(distinct.len(), 300, "no result lost");
    let resent_first_batch = ids
        .iter()
        .filter(|id| {
            id.rsplit('s')
                .next()
                .and_then(|n| n.parse::<u64>().ok())
                .is_some_and(|n| n <= 150)
        })
        .count();
    assert_eq!(
        resent_first_batch, 150,
        "the restart resent results that were already checkpointed"
    );
    assert!(
        ids.len() <= 300 + 150,
        "{} records for 300 results",
        ids.len()
    );
    eprintln!(
        "sent 300 frames; cloud: {} result records, {} distinct, {resent_first_batch} of the \
         150 checkpointed before the kill",
        ids.len(),
        distinct.len()
    );
}

#[test]
fn bandwidth_cap_holds_within_ten_percent_over_30_s() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let edge = Kafka::start(dir.path(), "edge");
    let cloud = Kafka::start(dir.path(), "cloud");
    // Well below what inference feeds the uplink even on a busy machine, so the cap, not the
    // supply, sets the rate.
    let cap: u64 = 100_000;
    let uplink = format!("bandwidth_bytes_per_sec = {cap}\ncompression = \"none\"");
    let _node = Node::start(
        dir.path(),
        &config(&mqtt, &edge, &cloud, &uplink, "enabled = true"),
    );
    // A backlog of ~60 KB frames far above the cap: the uplink is busy for the whole window.
    let photos = small_jpegs();
    let messages: Vec<_> = (0..400u64)
        .map(|i| {
            let f = Frame {
                sequence: i + 1,
                data: photos[i as usize % 4].clone().into(),
                ..Frame::default()
            };
            (format!("cameras/m{}/frames", i % 4), f.encode_to_vec())
        })
        .collect();
    publish(mqtt.port, &messages);
    // Results are replicated before images, so frames flow only once the local results are
    // complete: start the window then, while the frame backlog (24 MB) lasts far beyond it.
    // (Distinct ids: the local outbox delivers at least once, and a loaded machine may make it
    // write a result twice.)
    let local = read_distinct(&edge, "fovea.results", 400, Duration::from_secs(120));
    assert_eq!(
        record_ids(&local).into_iter().collect::<HashSet<_>>().len(),
        400
    );
    let started = now_ms() as i64 + 2_000;
    while (now_ms() as i64) < started + 32_000 {
        std::thread::sleep(Duration::from_millis(500));
    }
    let size = |r: &OwnedMessage| {
        let headers: usize = r
            .headers()
            .map(|hs| {
                hs.iter()
                    .map(|x| x.key.len() + x.value.map_or(0, <[u8]>::len))
                    .sum()
            })
            .unwrap_or(0);
        (r.key().map_or(0, <[u8]>::len) + r.payload().map_or(0, <[u8]>::len) + headers) as u64
    };
    let mut records = cloud.read("fovea.frames", 1, Duration::from_secs(20));
    records.extend(cloud.read("fovea.results", 1, Duration::from_secs(20)));
    let (from, to) = (started, started + 30_000);
    let bytes: u64 = records
        .iter()
        .filter(|r| (from..to).contains(&ts(r)))
        .map(size)
        .sum();
    let rate = bytes as f64 / 30.0;
    assert!(
        (rate - cap as f64).abs() <= cap as f64 * 0.10,
        "{rate:.0} bytes/s over 30 s against a cap of {cap}"
    );
}

#[test]
fn only_frames_matching_the_rules_arrive_as_thumbnails() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let edge = Kafka::start(dir.path(), "edge");
    let cloud = Kafka::start(dir.path(), "cloud");
    let rules =
        "enabled = true\nlabels = [\"Egyptian cat\"]\nmin_score = 0.5\nthumbnail_max_side = 96";
    let node = Node::start(dir.path(), &config(&mqtt, &edge, &cloud, "", rules));
    let mut messages = Vec::new();
    for camera in ["a", "b"] {
        for photo in ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"] {
            messages.push((format!("cameras/{camera}/frames"), sample_image(photo)));
        }
    }
    publish(mqtt.port, &messages);
    let results = read_distinct(&cloud, "fovea.results", 8, Duration::from_secs(90));
    assert_eq!(
        record_ids(&results).iter().collect::<HashSet<_>>().len(),
        8,
        "every result goes up"
    );
    let frames = cloud.read("fovea.frames", 2, Duration::from_secs(30));
    let distinct: HashSet<String> = record_ids(&frames).into_iter().collect();
    assert_eq!(distinct.len(), 2, "only the two cat pictures: {distinct:?}");
    for f in &frames {
        let frame = Frame::decode(f.payload().unwrap()).unwrap();
        assert_eq!(frame.content_type, "image/jpeg");
        let img = image::load_from_memory(&frame.data).unwrap();
        // chelsea.png is 451x300: a 96 px thumbnail keeps the aspect ratio.
        assert_eq!(img.width(), 96);
        assert!(
            (63..=64).contains(&img.height()),
            "{}x{}",
            img.width(),
            img.height()
        );
        assert_eq!((frame.width, frame.height), (img.width(), img.height()));
        let size = format!("{}x{}", img.width(), img.height());
        assert_eq!(header(f, "fovea-thumbnail").as_deref(), Some(size.as_str()));
        assert_eq!(header(f, "fovea-edge-node").as_deref(), Some("test-node"));
    }

    // The endpoint counts the same: 8 results and 2 frames acknowledged by the cloud, each
    // result's replication time observed, nothing left behind.
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    let body = loop {
        let (_, body) = node.http_get("/metrics");
        let lag = metric(&body, "fovea_uplink_lag_records{topic=\"fovea.results\"}");
        if metric(&body, "fovea_uplink_acked_total") == Some(10.0) && lag == Some(0.0) {
            break body;
        }
        assert!(std::time::Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(200));
    };
    let m = |series: &str| metric(&body, series).unwrap_or_else(|| panic!("no {series}"));
    assert_eq!(m("fovea_uplink_records_total{kind=\"result\"}"), 8.0);
    assert_eq!(m("fovea_uplink_records_total{kind=\"frame\"}"), 2.0);
    assert_eq!(m("fovea_uplink_filtered_total"), 6.0);
    assert_eq!(
        m("fovea_stage_duration_seconds_count{stage=\"replication\"}"),
        8.0
    );
}

/// Creates `name` on `kafka` (one partition) with topic `configs`, before anyone writes to it.
/// Writes `records` again, unchanged (key, headers, value, partition), with a client of the
/// test's own; returns how many the broker acknowledged.
fn write_again(kafka: &Kafka, records: &[OwnedMessage]) -> usize {
    let producer: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", kafka.brokers())
        .set("message.max.bytes", "67108864")
        .create()
        .unwrap();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut acked = 0;
        for m in records {
            let mut rec = FutureRecord::to(m.topic())
                .partition(m.partition())
                .key(m.key().unwrap())
                .payload(m.payload().unwrap());
            if let Some(headers) = m.headers() {
                rec = rec.headers(headers.clone());
            }
            if producer.send(rec, Duration::from_secs(30)).await.is_ok() {
                acked += 1;
            }
        }
        acked
    })
}

/// Scrapes the node until `done` holds for the metrics body (or panics with it after `timeout`).
fn wait_for_metrics(node: &Node, timeout: Duration, done: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + timeout;
    loop {
        let (_, body) = node.http_get("/metrics");
        if done(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{body}");
        std::thread::sleep(Duration::from_millis(500));
    }
}

/// Both local topics fully replicated: the checkpoint is at their ends.
fn no_lag(body: &str) -> bool {
    ["fovea.results", "fovea.frames"]
        .iter()
        .all(|t| metric(body, &format!("fovea_uplink_lag_records{{topic=\"{t}\"}}")) == Some(0.0))
}

fn schema(r: &OwnedMessage) -> String {
    header(r, h::SCHEMA).unwrap_or_default()
}

#[test]
fn records_over_the_cloud_limit_are_dead_lettered_locally_and_the_rest_replicated() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let edge = Kafka::start(dir.path(), "edge");
    let cloud = Kafka::start(dir.path(), "cloud");
    // The cloud takes frame batches of 100 kB at most, while the node is told 256 KiB: chunks cut
    // for 256 KiB are refused by the cloud itself (MESSAGE_TOO_LARGE).
    cloud.create_topic("fovea.frames", 1, &[("max.message.bytes", "100000")]);
    let uplink = "record_limit_bytes = 262144\ncompression = \"none\"";
    let frames = "enabled = true\nthumbnail_max_side = 64";
    // mqtt.max_metadata_bytes raised from its 16 KiB default (to half the local 1 MiB record
    // limit, the most it may be) so that a frame with 300 kB of metadata gets past the door.
    let cfg = config(&mqtt, &edge, &cloud, uplink, frames).replacen(
        "[mqtt]\n",
        "[mqtt]\nmax_metadata_bytes = 524288\n",
        1,
    );
    let node = Node::start(dir.path(), &cfg);
    let photos = small_jpegs();
    // Camera b's frame carries 300 kB of camera metadata: its result (which copies it) is over
    // the uplink's 256 KiB and is refused before it is sent; its frame record (a 64 px thumbnail
    // with the metadata) is chunked for 256 KiB and the cloud refuses the first chunk.
    let big = Frame {
        sequence: 1,
        data: photos[0].clone().into(),
        metadata: [("blob".to_string(), noise_text(300_000))].into(),
        ..Frame::default()
    };
    publish(
        mqtt.port,
        &[("cameras/b/frames".into(), big.encode_to_vec())],
    );
    let letters = edge.read("fovea.uplink-deadletter", 2, Duration::from_secs(120));
    assert_eq!(letters.len(), 2, "uplink dead letters: {}", letters.len());
    let mut by_source = HashMap::new();
    for l in &letters {
        assert_eq!(header(l, h::ERROR_KIND).as_deref(), Some("uplink-refused"));
        let letter = DeadLetter::decode(l.payload().unwrap()).unwrap();
        assert_eq!(letter.record_id, "test-node/b/s1");
        assert_eq!(
            (letter.kind.as_str(), letter.camera_id.as_str()),
            ("uplink-refused", "b")
        );
        assert!(letter.payload.is_empty() && letter.payload_truncated);
        assert!(letter.payload_size > 200_000, "{}", letter.payload_size);
        assert_eq!(letter.payload_sha256.len(), 64);
        let topic = letter.source.split('/').next().unwrap().to_string();
        by_source.insert(topic, letter);
    }
    let result_letter = &by_source["kafka:fovea.results"];
    assert!(
        result_letter
            .reason
            .starts_with("too-large: result record of")
            && result_letter
                .reason
                .contains("uplink.record_limit_bytes (262144"),
        "{}",
        result_letter.reason
    );
    let frame_letter = &by_source["kafka:fovea.frames"];
    assert!(
        frame_letter
            .reason
            .starts_with("too-large: the cloud refused the record 1 of 2")
            && frame_letter.reason.contains("MessageSizeTooLarge"),
        "{}",
        frame_letter.reason
    );

    // Then ten small frames of camera a: every one of them and its result reaches the cloud.
    publish(mqtt.port, &small_frames("a", 1..=10));
    let results = read_distinct(&cloud, "fovea.results", 10, Duration::from_secs(120));
    let result_ids: HashSet<String> = record_ids(&results).into_iter().collect();
    let want: HashSet<String> = (1..=10).map(|s| format!("test-node/a/s{s}")).collect();
    assert_eq!(result_ids, want, "results in the cloud");
    let cloud_frames = cloud.read("fovea.frames", 10, Duration::from_secs(60));
    let inline: HashSet<String> = cloud_frames
        .iter()
        .filter(|r| schema(r) == h::SCHEMA_FRAME)
        .map(|r| header(r, h::RECORD_ID).unwrap())
        .collect();
    assert_eq!(inline, want, "frames in the cloud");

    // Counted: 2 refusals, the checkpoint at the end of both local topics.
    let body = wait_for_metrics(&node, Duration::from_secs(60), |b| {
        no_lag(b) && metric(b, "fovea_uplink_refused_total{reason=\"too-large\"}") == Some(2.0)
    });
    let m = |series: &str| metric(&body, series).unwrap_or_else(|| panic!("no {series}"));
    assert_eq!(m("fovea_uplink_records_total{kind=\"result\"}"), 10.0);
    assert_eq!(m("fovea_uplink_records_total{kind=\"frame\"}"), 11.0);
    // 10 results and 10 frames; the second chunk of b's frame may have been taken.
    let acked = m("fovea_uplink_acked_total");
    assert!((20.0..=21.0).contains(&acked), "{acked} acked");
    eprintln!(
        "sent 11 frames + 11 results; cloud acked {acked}; arrived {} results, {} frames ({} \
         records); 2 uplink dead letters",
        result_ids.len(),
        inline.len(),
        cloud_frames.len()
    );
}

#[test]
fn a_chunked_frame_written_twice_locally_does_not_hold_the_checkpoint() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let edge = Kafka::start(dir.path(), "edge");
    let cloud = Kafka::start(dir.path(), "cloud");
    let node = Node::start(
        dir.path(),
        &config(&mqtt, &edge, &cloud, "", "enabled = true"),
    );
    // A 1.1 MB frame: chunked locally (1 MiB limit), and again for the cloud.
    let big = Frame {
        sequence: 1,
        data: noise_png(606, 1).into(),
        ..Frame::default()
    };
    publish(
        mqtt.port,
        &[("cameras/c/frames".into(), big.encode_to_vec())],
    );
    let first = cloud.read("fovea.frames", 2, Duration::from_secs(120));
    let cloud_chunks = first.len();
    assert!(
        first.iter().all(|r| schema(r) == h::SCHEMA_FRAME_CHUNK
            && header(r, "fovea-chunk-count") == Some(cloud_chunks.to_string())),
        "{cloud_chunks} records, not the chunks of one frame"
    );

    // The same chunk records again in the local topic, as a redelivery would leave them.
    let local: Vec<OwnedMessage> = edge
        .read("fovea.frames", 2, Duration::from_secs(30))
        .into_iter()
        .filter(|r| schema(r) == h::SCHEMA_FRAME_CHUNK)
        .collect();
    assert!(local.len() >= 2, "{} local chunks", local.len());
    let rewritten = write_again(&edge, &local);
    assert_eq!(rewritten, local.len());

    // Later frames still go, and the checkpoint reaches the end of both topics.
    publish(mqtt.port, &small_frames("c", 2..=6));
    let frames = read_distinct(&cloud, "fovea.frames", 6, Duration::from_secs(120));
    let ids: HashSet<String> = record_ids(&frames).into_iter().collect();
    let want: HashSet<String> = (1..=6).map(|s| format!("test-node/c/s{s}")).collect();
    assert_eq!(ids, want, "frames in the cloud");
    let again = frames
        .iter()
        .filter(|r| header(*r, h::RECORD_ID).as_deref() == Some("test-node/c/s1"))
        .count();
    assert_eq!(
        again, cloud_chunks,
        "the duplicate frame was not sent again"
    );
    let results = read_distinct(&cloud, "fovea.results", 6, Duration::from_secs(60));
    assert_eq!(
        record_ids(&results)
            .into_iter()
            .collect::<HashSet<_>>()
            .len(),
        6
    );
    let body = wait_for_metrics(&node, Duration::from_secs(60), no_lag);
    assert_eq!(
        metric(&body, "fovea_uplink_records_total{kind=\"frame\"}"),
        Some(6.0)
    );
    eprintln!(
        "local: {} chunk records written twice ({rewritten} acked again); cloud: {} frame \
         records ({} of the chunked frame), {} results; lag 0",
        local.len(),
        frames.len(),
        again,
        results.len()
    );
}
