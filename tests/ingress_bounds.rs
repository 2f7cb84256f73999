#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The ingress cannot be wedged silently or grown without bound (issue 13, items 3 and 4), with
//! real mosquitto, a real Kafka-protocol broker and the real `fovea` binary:
//! - a node that holds MQTT deliveries and acknowledges none (made on purpose with the test-only
//!   `FOVEA_TEST_LOSE_ACK_ON_METADATA` hook, which loses the acks of marked frames) fills the
//!   broker's in-flight window, receives nothing more, and says so: `/readyz` and `/healthz`
//!   503 naming it, `fovea_mqtt_inflight` at the window; restarted, every frame arrives;
//! - 2000 distinct camera ids under the default `mqtt.max_cameras` (1000): 1000 inferred, 1000
//!   `too-many-cameras` dead letters, peak memory bounded, the next frame of a known camera
//!   inferred; an idle camera makes room for a new one;
//! - QoS 0 frames are taken at most once: every one sent is either a result or counted in
//!   `fovea_mqtt_qos0_dropped_total`;
//! - deliveries shed over the budget (spilling off) come back on a renewed session.

mod harness;

use fovea_proto::v1::DeadLetter;
use harness::*;
use prost::Message as _;
use rdkafka::message::Message as _;
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::collections::HashSet;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(120);

/// mosquitto's default `max_inflight_messages`, which the packaged snippet keeps.
const WINDOW: usize = 20;

/// The classifier alone: these tests are about the ingress, and the detector would only make
/// each of their frames take three times longer on CI's two cores.
fn classifier_only(config: String) -> String {
    let config = config.replace(
        r#"models = ["efficientnet-lite0", "ssdlite-person"]"#,
        r#"models = ["efficientnet-lite0"]"#,
    );
    assert!(config.contains(r#"models = ["efficientnet-lite0"]"#));
    config
}

/// A node with the classifier alone and `extra` config, its mosquitto and its broker (bind the
/// fields as `_dir, mqtt, kafka, node`, so that the node drops first and the folder last).
struct Rig {
    node: Node,
    kafka: Kafka,
    mqtt: Mosquitto,
    _dir: tempfile::TempDir,
}

fn rig(extra: &str) -> Rig {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let config = classifier_only(node_config(&mqtt, &kafka, extra));
    let node = Node::start(dir.path(), &config);
    Rig {
        node,
        kafka,
        mqtt,
        _dir: dir,
    }
}

fn wait_for(what: &str, timeout: Duration, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn a_node_that_holds_deliveries_and_acks_none_says_so_and_loses_nothing() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    // 5 s instead of the default 60 s: the same check, a minute less of waiting.
    let config = classifier_only(node_config(&mqtt, &kafka, "health.stall_after_ms = 5000"));
    std::fs::write(dir.path().join("fovea.toml"), &config).unwrap();
    let env = [("FOVEA_TEST_LOSE_ACK_ON_METADATA", "lose")];
    let mut node = Node::launch_with(dir.path(), &[], &env);

    let jpeg = small_jpegs().remove(0);
    let lost = WINDOW + 5;
    let mut messages: Vec<(String, Vec<u8>)> = (1..=lost as u64)
        .map(|seq| {
            let frame = envelope(seq, &jpeg, &[("lose", "1")]);
            ("cameras/w/frames".to_string(), frame)
        })
        .collect();
    messages.push(("cameras/ok/frames".to_string(), envelope(1, &jpeg, &[])));
    publish(mqtt.port, &messages);
    let sent = messages.len();

    // The window fills with frames whose acks are lost; then nothing more comes.
    node.wait_metric("fovea_mqtt_inflight", WINDOW as f64);
    let first = kafka.read("fovea.results", WINDOW, WAIT);
    assert_eq!(
        first.len(),
        WINDOW,
        "the frames the broker sent were written"
    );
    let started = Instant::now();
    let (mut status, mut body) = node.http_get("/readyz");
    while status != 503 && started.elapsed() < Duration::from_secs(30) {
        std::thread::sleep(Duration::from_millis(250));
        (status, body) = node.http_get("/readyz");
    }
    println!(
        "readyz turned {status} {:.1} s after the window filled:\n{body}",
        started.elapsed().as_secs_f64()
    );
    assert_eq!(status, 503, "{body}");
    assert!(
        body.contains(&format!(
            "{WINDOW} MQTT deliveries held un-acked and none acknowledged"
        )),
        "{body}"
    );
    let (health, why) = node.http_get("/healthz");
    assert_eq!(health, 503, "{why}");
    assert!(why.contains("the ingress waits for nothing"), "{why}");
    let (_, metrics) = node.http_get("/metrics");
    assert_eq!(metric(&metrics, "fovea_mqtt_inflight"), Some(WINDOW as f64));
    assert!(metric(&metrics, "fovea_mqtt_ack_wait_seconds").unwrap() >= 5.0);
    assert_eq!(metric(&metrics, "fovea_healthy"), Some(0.0));
    assert!(
        kafka
            .read("fovea.results", WINDOW + 1, Duration::from_secs(2))
            .len()
            == WINDOW,
        "nothing beyond the window arrived while wedged"
    );

    // Restarted without the hook (what the watchdog would do): the broker redelivers the held
    // frames and sends the rest; every frame arrives, the held ones a second time.
    node.proc.signal("KILL");
    node.restart();
    let results = kafka.read("fovea.results", WINDOW + sent, WAIT);
    let ids: HashSet<String> = results
        .iter()
        .map(|r| record_id_of(r).expect("record id"))
        .collect();
    println!(
        "sent {sent}, results {} ({} distinct)",
        results.len(),
        ids.len()
    );
    assert_eq!(ids.len(), sent, "every frame arrived: {ids:?}");
    node.wait_metric("fovea_mqtt_inflight", 0.0);
    let (status, body) = node.http_get("/readyz");
    assert_eq!(status, 200, "{body}");
}

fn record_id_of(r: &rdkafka::message::OwnedMessage) -> Option<String> {
    use rdkafka::message::Headers as _;
    let headers = r.headers()?;
    headers
        .iter()
        .filter(|h| h.key == fovea_proto::headers::RECORD_ID)
        .find_map(|h| Some(String::from_utf8_lossy(h.value?).into_owned()))
}

#[test]
fn thousands_of_camera_ids_are_bounded_by_max_cameras_and_memory_stays_bounded() {
    // The packaged mqtt.max_cameras (1000) and camera_idle_secs (600): nothing is evicted
    // during the test, so exactly the first 1000 cameras are admitted.
    // Bound in this order so that they drop in reverse: the node first, the folder last.
    let Rig {
        _dir,
        mqtt,
        kafka,
        node,
    } = rig("");
    let tiny = {
        let img = image::RgbImage::from_pixel(64, 48, image::Rgb([90, 120, 200]));
        let mut out = Vec::new();
        image::codecs::jpeg::JpegEncoder::new(&mut std::io::Cursor::new(&mut out))
            .encode_image(&img)
            .unwrap();
        out
    };
    let before = peak_rss(node.proc.child.id());
    let cameras = 2000;
    let messages: Vec<(String, Vec<u8>)> = (0..cameras)
        .map(|i| (format!("cameras/c{i:04}/frames"), tiny.clone()))
        .collect();
    let started = Instant::now();
    publish(mqtt.port, &messages);
    let results = kafka.read("fovea.results", 1000, WAIT);
    let letters = kafka.read("fovea.deadletter", 1000, WAIT);
    let m = node.http_get("/metrics").1;
    let spilled = metric(&m, "fovea_mqtt_spilled_total").unwrap_or(0.0);
    let shed = metric(&m, "fovea_mqtt_shed_total").unwrap_or(0.0);
    println!(
        "{cameras} cameras: {} results, {} dead letters in {:.1} s ({spilled} payloads spilled over mqtt.max_in_flight, {shed} deliveries shed)",
        results.len(),
        letters.len(),
        started.elapsed().as_secs_f64()
    );
    assert_eq!(results.len(), 1000);
    assert_eq!(letters.len(), 1000);
    let mut refused = HashSet::new();
    for r in &letters {
        let d = DeadLetter::decode(r.payload().unwrap()).unwrap();
        assert_eq!(d.kind, "too-many-cameras", "{}", d.reason);
        assert_eq!(d.camera_id, "_unknown");
        refused.insert(d.reason.split('"').nth(1).unwrap().to_string());
    }
    let expected: HashSet<String> = (1000..cameras).map(|i| format!("c{i:04}")).collect();
    assert_eq!(refused, expected, "the 1000 cameras beyond the first 1000");
    // A known camera goes on; a new one is still refused.
    publish(
        mqtt.port,
        &[
            ("cameras/c0007/frames".to_string(), tiny.clone()),
            ("cameras/newcomer/frames".to_string(), tiny.clone()),
        ],
    );
    assert_eq!(kafka.read("fovea.results", 1001, WAIT).len(), 1001);
    assert_eq!(kafka.read("fovea.deadletter", 1001, WAIT).len(), 1001);
    let after = peak_rss(node.proc.child.id());
    println!(
        "peak RSS {} MiB before, {} MiB after the cameras",
        before >> 20,
        after >> 20
    );
    // Bound: 1000 cameras' state is a few hundred bytes each; the rest is the model and buffers.
    assert!(
        after < before + (64 << 20),
        "peak RSS grew by {} MiB",
        (after - before) >> 20
    );
    node.wait_metric("fovea_mqtt_inflight", 0.0);
}

#[test]
fn an_idle_camera_makes_room_for_a_new_one() {
    // Three cameras and 8 s of idleness, so that a test can wait for it (and the first three
    // frames are surely inferred before d comes).
    // Bound in this order so that they drop in reverse: the node first, the folder last.
    let Rig {
        _dir,
        mqtt,
        kafka,
        node,
    } = rig("mqtt.max_cameras = 3\nmqtt.camera_idle_secs = 8");
    let jpeg = small_jpegs().remove(1);
    let frame = |camera: &str| (format!("cameras/{camera}/frames"), jpeg.clone());
    publish(mqtt.port, &[frame("a"), frame("b"), frame("c")]);
    assert_eq!(kafka.read("fovea.results", 3, WAIT).len(), 3);
    // d comes while a, b and c were seen less than a second ago: refused.
    publish(mqtt.port, &[frame("d")]);
    let letters = kafka.read("fovea.deadletter", 1, WAIT);
    let d = DeadLetter::decode(letters[0].payload().unwrap()).unwrap();
    assert_eq!(d.kind, "too-many-cameras");
    assert!(d.reason.contains("\"d\""), "{}", d.reason);
    std::thread::sleep(Duration::from_secs(8));
    publish(mqtt.port, &[frame("d"), frame("a")]);
    let results = kafka.read("fovea.results", 5, WAIT);
    assert_eq!(results.len(), 5, "d admitted once the others were idle");
    assert_eq!(
        kafka
            .read("fovea.deadletter", 2, Duration::from_secs(3))
            .len(),
        1
    );
    drop(node);
}

#[test]
fn qos0_frames_are_each_a_result_or_counted_as_dropped() {
    // Bound in this order so that they drop in reverse: the node first, the folder last.
    let Rig {
        _dir,
        mqtt,
        kafka,
        node,
    } = rig("");
    let jpegs = small_jpegs();
    let sent = 300;
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut opts = MqttOptions::new("qos0-camera", "127.0.0.1", mqtt.port);
        opts.set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut events) = AsyncClient::new(opts, 512);
        let poller = tokio::spawn(async move {
            loop {
                match events.poll().await {
                    // The QoS 1 marker after the QoS 0 frames: all were written to the broker.
                    Ok(Event::Incoming(Packet::PubAck(_))) => return,
                    Ok(_) => {}
                    Err(e) => panic!("mqtt: {e}"),
                }
            }
        });
        for i in 0..sent {
            let payload = jpegs[i % jpegs.len()].clone();
            client
                .publish("cameras/q/frames", QoS::AtMostOnce, false, payload)
                .await
                .unwrap();
        }
        client
            .publish(
                "cameras/marker/frames",
                QoS::AtLeastOnce,
                false,
                jpegs[0].clone(),
            )
            .await
            .unwrap();
        tokio::time::timeout(Duration::from_secs(60), poller)
            .await
            .unwrap()
            .unwrap();
        let _ = client.disconnect().await;
    });
    // Wait until the node has taken everything it will take.
    let (mut dropped, mut taken) = (0.0, 0);
    wait_for("every QoS 0 frame accounted for", WAIT, || {
        let (_, m) = node.http_get("/metrics");
        dropped = metric(&m, "fovea_mqtt_qos0_dropped_total").unwrap_or(0.0);
        // The marker is taken too.
        taken = metric(&m, "fovea_frames_received_total").unwrap_or(0.0) as usize;
        taken + dropped as usize > sent
    });
    let records = kafka.read("fovea.results", taken, WAIT);
    let q = records
        .iter()
        .filter(|r| r.key() == Some(b"q".as_slice()))
        .count();
    println!("QoS 0: sent {sent}, {q} results, {dropped} dropped by fovea");
    assert_eq!(
        q + dropped as usize,
        sent,
        "each QoS 0 frame is a result or a drop"
    );
    assert!(q > 0);
}

/// The last resort when mosquitto sends past its window: with spilling off and the least
/// `mqtt.max_in_flight` (20), a burst of frames makes fovea shed deliveries, renew its session
/// once it has acked what it holds, and get them again; every frame arrives, nothing is held at
/// the end. (The packaged settings spill instead: tests/backlog.rs.)
#[test]
fn deliveries_shed_over_the_budget_come_back_on_a_renewed_session() {
    // Bound in this order so that they drop in reverse: the node first, the folder last.
    let Rig {
        _dir,
        mqtt,
        kafka,
        node,
    } = rig("mqtt.max_in_flight = 20\nmqtt.spill_max_bytes = 0");
    let jpegs = small_jpegs();
    let sent = 300;
    let messages: Vec<(String, Vec<u8>)> = (0..sent)
        .map(|i| {
            (
                format!("cameras/burst-{}/frames", i % 3),
                envelope(i as u64 / 3 + 1, &jpegs[i % jpegs.len()], &[]),
            )
        })
        .collect();
    publish(mqtt.port, &messages);
    let results = kafka.read("fovea.results", sent, WAIT);
    let ids: HashSet<String> = results.iter().filter_map(record_id_of).collect();
    let metrics = node.http_get("/metrics").1;
    let shed = metric(&metrics, "fovea_mqtt_shed_total").unwrap_or(0.0);
    let renewals = session_renewals(&node);
    println!(
        "sent {sent}: {} results ({} distinct), {shed} deliveries shed, {renewals} session renewals",
        results.len(),
        ids.len()
    );
    assert_eq!(ids.len(), sent, "every frame arrived");
    assert!(
        shed > 0.0,
        "mosquitto 2.0.11 sends past its window, so fovea sheds"
    );
    assert!(renewals >= 1);
    assert_eq!(metric(&metrics, "fovea_mqtt_spilled_total"), Some(0.0));
    node.wait_metric("fovea_mqtt_inflight", 0.0);
}
