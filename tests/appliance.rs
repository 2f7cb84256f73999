#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The node as an appliance, end to end with real brokers, ONNX Runtime and models: the
//! Prometheus endpoint counts what the run produced, `/readyz` follows the local broker,
//! `/healthz` notices a stalled stage, systemd hears READY/WATCHDOG/STOPPING, and SIGTERM (once
//! or twice) under load loses no acknowledged frame.

mod harness;

use fovea_proto::v1::Frame;
use harness::*;
use prost::Message as _;
use std::collections::HashSet;
use std::os::unix::net::UnixDatagram;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(90);

/// Polls `f` every 50 ms until it returns Some, at most `timeout`.
fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn envelope(seq: u64, image: &[u8]) -> Vec<u8> {
    Frame {
        sequence: seq,
        data: image.to_vec().into(),
        ..Frame::default()
    }
    .encode_to_vec()
}

#[test]
fn metrics_endpoint_counts_what_the_run_produced() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let node = Node::start(dir.path(), &node_config(&mqtt, &kafka, ""));
    // The node starts offline and probes the broker: wait for it, so that every record goes
    // straight to the broker and the per-stage counts below are exact.
    eventually(WAIT, "ready", || {
        (node.http_get("/readyz").0 == 200).then_some(())
    });

    let mut corrupt_jpeg = vec![0xFF, 0xD8, 0xFF, 0xE0];
    corrupt_jpeg.extend(std::iter::repeat_n(0x5A, 4096));
    // Complete (it ends with the end-of-image marker) but not a picture: decode-failed, not
    // truncated.
    corrupt_jpeg.extend([0xFF, 0xD9]);
    let photos = ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"];
    let mut messages: Vec<(String, Vec<u8>)> = photos
        .iter()
        .map(|p| ("cameras/good/frames".to_string(), sample_image(p)))
        .collect();
    messages.push(("cameras/bad/frames".into(), corrupt_jpeg.clone()));
    messages.push(("cameras/bad/frames".into(), corrupt_jpeg));
    messages.push(("cameras/bad/frames".into(), Vec::new()));
    publish(mqtt.port, &messages);

    let results = kafka.read("fovea.results", 4, WAIT);
    let letters = kafka.read("fovea.deadletter", 3, WAIT);
    assert_eq!((results.len(), letters.len()), (4, 3));

    let body = node.wait_metric("fovea_frames_acked_total", 7.0);
    let m =
        |series: &str| metric(&body, series).unwrap_or_else(|| panic!("no {series} in:\n{body}"));
    assert_eq!(m("fovea_frames_received_total"), 7.0);
    assert_eq!(m("fovea_records_delivered_total{kind=\"result\"}"), 4.0);
    assert_eq!(m("fovea_records_delivered_total{kind=\"frame\"}"), 4.0);
    assert_eq!(
        m("fovea_records_delivered_total{kind=\"dead_letter\"}"),
        3.0
    );
    assert_eq!(
        m("fovea_frames_rejected_total{reason=\"decode-failed\"}"),
        2.0
    );
    assert_eq!(
        m("fovea_frames_rejected_total{reason=\"empty-payload\"}"),
        1.0
    );
    for stage in ["queue", "inference", "local_ack", "total"] {
        assert_eq!(
            m(&format!(
                "fovea_stage_duration_seconds_count{{stage=\"{stage}\"}}"
            )),
            7.0,
            "stage {stage}"
        );
    }
    // Only the four decodable photos reach the models, each through both.
    for model in ["efficientnet-lite0", "ssdlite-person"] {
        let series = format!("fovea_model_inference_seconds_count{{model=\"{model}\"}}");
        assert_eq!(m(&series), 4.0, "{model}");
        let sum = m(&format!(
            "fovea_model_inference_seconds_sum{{model=\"{model}\"}}"
        ));
        assert!(sum > 0.0 && sum < 60.0, "{model}: {sum} s");
    }
    assert_eq!(m("fovea_local_broker_state{state=\"online\"}"), 1.0);
    assert_eq!(m("fovea_mqtt_connected"), 1.0);
    assert_eq!(m("fovea_spool_bytes"), 0.0);
    assert!(m("process_resident_memory_bytes") > 10e6);
    assert_eq!(node.http_get("/healthz").0, 200);
    let (status, ready) = node.http_get("/readyz");
    assert_eq!(status, 200, "{ready}");
    assert!(ready.contains("ok   local broker: online"), "{ready}");
    assert_eq!(node.http_get("/nope").0, 404);
}

#[test]
fn readiness_follows_the_local_broker_and_the_spool_shows_the_backlog() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let mut kafka = Kafka::start(dir.path(), "edge");
    let config = node_config(
        &mqtt,
        &kafka,
        "spool.divert_after_ms = 1000\nspool.probe_interval_ms = 200",
    );
    let node = Node::start(dir.path(), &config);
    let photo = sample_image("coffee.png");
    publish(
        mqtt.port,
        &[("cameras/c1/frames".into(), envelope(1, &photo))],
    );
    node.wait_metric("fovea_frames_acked_total", 1.0);
    eventually(WAIT, "ready", || {
        (node.http_get("/readyz").0 == 200).then_some(())
    });
    // Frame 1 may have come before the first probe reached the broker, and so through the spool:
    // let it drain first, so that what the spool holds below is the outage's frames alone. The
    // outbox is online only with the spool empty; the spool gauge alone can be a second old (it
    // read 0 with frame 1's records still in the spool, and 3 results instead of 2 later).
    node.wait_metric("fovea_local_broker_state{state=\"online\"}", 1.0);
    node.wait_metric("fovea_spool_records{class=\"result\"}", 0.0);

    kafka.stop();
    publish(
        mqtt.port,
        &[
            ("cameras/c1/frames".into(), envelope(2, &photo)),
            ("cameras/c1/frames".into(), envelope(3, &photo)),
        ],
    );
    let report = eventually(WAIT, "not ready while the broker is away", || {
        let (status, body) = node.http_get("/readyz");
        (status == 503).then_some(body)
    });
    assert!(
        report.contains("FAIL local broker: unreachable"),
        "{report}"
    );
    assert_eq!(node.http_get("/healthz").0, 200, "away is not stalled");
    // Both frames are acked once their records are in the spool, which the gauges show.
    let body = node.wait_metric("fovea_frames_acked_total", 3.0);
    let spooled = node.wait_metric("fovea_spool_records{class=\"result\"}", 2.0);
    assert_eq!(
        metric(&body, "fovea_local_broker_state{state=\"offline\"}"),
        Some(1.0)
    );
    assert!(metric(&spooled, "fovea_spool_bytes").unwrap() > 0.0);
    assert!(metric(&spooled, "fovea_records_spooled_total").unwrap() >= 4.0);

    kafka.restart();
    eventually(WAIT, "ready again", || {
        (node.http_get("/readyz").0 == 200).then_some(())
    });
    let body = node.wait_metric("fovea_spool_bytes", 0.0);
    assert!(metric(&body, "fovea_records_drained_total").unwrap() >= 4.0);
    assert_eq!(
        metric(&body, "fovea_spool_oldest_age_seconds"),
        Some(0.0),
        "{body}"
    );
    assert_eq!(kafka.read("fovea.results", 3, WAIT).len(), 3);
}

/// Datagrams received on a notification socket, with when they arrived.
fn listen(path: &std::path::Path) -> Notes {
    let socket = UnixDatagram::bind(path).unwrap();
    let got = Arc::new(Mutex::new(Vec::new()));
    let sink = got.clone();
    std::thread::spawn(move || {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = socket.recv(&mut buf) {
            let text = String::from_utf8_lossy(&buf[..n]).into_owned();
            sink.lock().unwrap().push((Instant::now(), text));
        }
    });
    got
}

fn first(got: &Notes, prefix: &str) -> Option<Instant> {
    got.lock()
        .unwrap()
        .iter()
        .find(|(_, m)| m.starts_with(prefix))
        .map(|(t, _)| *t)
}

type Notes = Arc<Mutex<Vec<(Instant, String)>>>;

/// Starts the node as systemd would with `WatchdogSec` = `watchdog_usec`: a notification socket
/// in `dir`, whose datagrams are collected.
fn launch_under_systemd(dir: &std::path::Path, config: &str, watchdog_usec: &str) -> (Node, Notes) {
    std::fs::write(dir.join("fovea.toml"), config).unwrap();
    let socket = dir.join("notify.sock");
    let got = listen(&socket);
    let env = [
        ("NOTIFY_SOCKET", socket.to_str().unwrap()),
        ("WATCHDOG_USEC", watchdog_usec),
    ];
    (Node::launch_with(dir, &[], &env), got)
}

#[test]
fn systemd_hears_ready_watchdog_pings_and_stopping() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let spawned = Instant::now();
    let config = node_config(&mqtt, &kafka, "");
    let (mut node, got) = launch_under_systemd(dir.path(), &config, "1000000");
    let ready = eventually(WAIT, "READY=1", || first(&got, "READY=1"));
    println!(
        "READY=1 {} ms after spawn",
        ready.duration_since(spawned).as_millis()
    );
    std::thread::sleep(Duration::from_secs(3));
    let pings = got
        .lock()
        .unwrap()
        .iter()
        .filter(|(t, m)| *t > ready && m == "WATCHDOG=1")
        .count();
    // A 1 s watchdog wants a ping at least every 500 ms: 3 s give about 6.
    assert!((4..=10).contains(&pings), "{pings} pings in 3 s");

    let stopping_sent = Instant::now();
    node.proc.signal("TERM");
    assert_eq!(
        node.proc.wait(Duration::from_secs(25)),
        Some(0),
        "{}",
        node.proc.log_text()
    );
    let stopping = eventually(Duration::from_secs(5), "STOPPING=1", || {
        first(&got, "STOPPING=1")
    });
    assert!(stopping >= stopping_sent && stopping > ready);
}

#[test]
fn a_worker_stuck_on_one_frame_fails_healthz_until_it_finishes() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    // A fast watchdog tick so that the supervisor notices a short stall too.
    let config = node_config(&mqtt, &kafka, "health.stall_after_ms = 100");
    let (node, _got) = launch_under_systemd(dir.path(), &config, "100000");
    assert_eq!(node.http_get("/healthz").0, 200);
    // A big noise PNG: decoding and resizing it keeps the worker busy for well over 100 ms.
    let big = noise_png(3000, 5);
    let port = mqtt.port;
    let publisher =
        std::thread::spawn(move || publish(port, &[("cameras/big/frames".into(), big)]));
    let stalled = eventually(WAIT, "a 503 from /healthz", || {
        let (status, body) = node.http_get("/healthz");
        (status == 503).then_some(body)
    });
    assert!(
        stalled.contains("inference worker 0 has been on one frame"),
        "{stalled}"
    );
    publisher.join().unwrap();
    node.wait_metric("fovea_frames_acked_total", 1.0);
    assert_eq!(node.http_get("/healthz").0, 200, "healthy again");
    let log = node.proc.log_text();
    assert!(
        log.contains("pipeline stalled: inference worker 0")
            && log.contains("no longer feeding the systemd watchdog")
            && log.contains("the pipeline moves again"),
        "{log}"
    );
}

/// (camera, sequence) of every frame that has a result in `kafka`.
fn frames_with_results(kafka: &Kafka, want: usize) -> HashSet<(String, u64)> {
    results_by_frame(&kafka.read("fovea.results", want, Duration::from_secs(20)))
        .into_keys()
        .collect()
}

/// The "N frames in, M acked" figures of the node's last "stopped" line.
fn stopped_counts(log: &str) -> (u64, u64) {
    let line = log
        .lines()
        .rev()
        .find(|l| l.contains("stopped after"))
        .unwrap_or_else(|| panic!("no stopped line:\n{log}"));
    let number_before = |word: &str| -> u64 {
        let at = line.find(word).unwrap();
        line[..at]
            .split_whitespace()
            .last()
            .unwrap()
            .parse()
            .unwrap()
    };
    (number_before(" frames in"), number_before(" acked"))
}

#[test]
fn sigterm_under_load_exits_in_time_and_loses_no_acknowledged_frame() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    std::fs::write(
        dir.path().join("fovea.toml"),
        node_config(&mqtt, &kafka, ""),
    )
    .unwrap();
    let drain = 10;
    let mut node = Node::launch_with(dir.path(), &["--drain-timeout", &drain.to_string()], &[]);
    // More than one worker infers: the queue fills and the MQTT broker holds the rest.
    let cameras = 4;
    let load = Load::start(mqtt.port, cameras, 10.0, small_jpegs());
    std::thread::sleep(Duration::from_secs(6));
    node.proc.signal("TERM");
    let signalled = Instant::now();
    let code = node.proc.wait(Duration::from_secs(drain + 10));
    let took = signalled.elapsed();
    let per_camera = load.stop();
    let log = node.proc.log_text();
    assert_eq!(code, Some(0), "{log}");
    assert!(
        took < Duration::from_secs(drain) + Duration::from_millis(1500),
        "exit took {took:?}"
    );
    let (taken, acked) = stopped_counts(&log);
    println!(
        "SIGTERM under load: exit after {} ms; {taken} frames taken, {acked} acked; {} published",
        took.as_millis(),
        per_camera * cameras as u64
    );
    assert!(acked > 0 && acked <= taken, "{log}");
    // Every frame fovea acknowledged is in Kafka.
    let stored = frames_with_results(&kafka, acked as usize);
    assert!(
        stored.len() as u64 >= acked,
        "{} frames in Kafka, {acked} acknowledged",
        stored.len()
    );

    // The rest was never acknowledged, so the MQTT broker delivers it to the next run.
    let node = Node::launch_with(dir.path(), &[], &[]);
    let expected: HashSet<(String, u64)> = (1..=cameras)
        .flat_map(|c| (1..=per_camera).map(move |s| (format!("load-{c}"), s)))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(180);
    loop {
        let stored = frames_with_results(&kafka, expected.len());
        let missing: Vec<_> = expected.difference(&stored).collect();
        if missing.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "{} of {} frames missing, e.g. {:?}; log:\n{}",
            missing.len(),
            expected.len(),
            missing.first(),
            node.proc.log_text()
        );
        std::thread::sleep(Duration::from_secs(2));
    }
}

#[test]
fn drain_deadline_and_second_signal_end_the_process_and_nothing_is_lost() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let mut kafka = Kafka::start(dir.path(), "edge");
    // Records wait up to 30 s for a broker that went away before they are spooled, so a drain
    // with the broker gone cannot finish on its own within the deadlines below.
    std::fs::write(
        dir.path().join("fovea.toml"),
        node_config(&mqtt, &kafka, "spool.divert_after_ms = 30000"),
    )
    .unwrap();
    let photo = sample_image("rocket.jpg");
    let batch = |seqs: std::ops::RangeInclusive<u64>| -> Vec<(String, Vec<u8>)> {
        seqs.map(|s| ("cameras/c1/frames".to_string(), envelope(s, &photo)))
            .collect()
    };

    // 1. A second signal ends the drain at once.
    let mut node = Node::launch_with(dir.path(), &["--drain-timeout", "20"], &[]);
    kafka.stop();
    publish(mqtt.port, &batch(1..=3));
    node.wait_metric("fovea_frames_received_total", 3.0);
    node.proc.signal("TERM");
    std::thread::sleep(Duration::from_millis(500));
    assert!(node.proc.is_running(), "the drain cannot be over yet");
    node.proc.signal("TERM");
    let second = Instant::now();
    assert_eq!(node.proc.wait(Duration::from_secs(10)), Some(0));
    let took = second.elapsed();
    assert!(
        took < Duration::from_millis(1500),
        "second signal: {took:?}"
    );
    assert!(node.proc.log_text().contains("second signal: exiting now"));

    // 2. The drain deadline ends a drain that cannot finish.
    kafka.restart();
    let mut node = Node::launch_with(dir.path(), &["--drain-timeout", "3"], &[]);
    assert_eq!(frames_with_results(&kafka, 3).len(), 3, "redelivered 1..=3");
    kafka.stop();
    publish(mqtt.port, &batch(4..=6));
    node.wait_metric("fovea_frames_received_total", 6.0);
    node.proc.signal("TERM");
    let first = Instant::now();
    assert_eq!(node.proc.wait(Duration::from_secs(15)), Some(0));
    let took = first.elapsed();
    assert!(
        took > Duration::from_secs(3) && took < Duration::from_millis(4500),
        "deadline: {took:?}"
    );
    assert!(node.proc.log_text().contains("drain deadline passed"));

    // 3. Nothing was lost: the un-acked frames come back to the next run.
    kafka.restart();
    let node = Node::launch_with(dir.path(), &[], &[]);
    let stored = eventually(WAIT, "all six frames", || {
        let got = frames_with_results(&kafka, 6);
        (got.len() == 6).then_some(got)
    });
    assert!((1..=6).all(|s| stored.contains(&("c1".to_string(), s))));
    drop(node);
}

#[test]
fn a_metrics_port_in_use_does_not_stop_the_node_and_is_taken_when_free() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let config = node_config(&mqtt, &kafka, "");
    let listen = metrics_listen(&config);
    let squatter = std::net::TcpListener::bind(&listen).unwrap();
    let node = Node::start(dir.path(), &config);
    publish(
        mqtt.port,
        &[("cameras/c1/frames".into(), sample_image("rocket.jpg"))],
    );
    assert_eq!(kafka.read("fovea.results", 1, WAIT).len(), 1);
    assert!(
        node.proc
            .log_text()
            .contains("cannot serve metrics on 127.0.0.1:"),
        "{}",
        node.proc.log_text()
    );
    drop(squatter);
    // Retried every 10 s: the endpoint is ours within one retry.
    eventually(Duration::from_secs(25), "the endpoint", || {
        std::net::TcpStream::connect(&listen).ok()?;
        let (status, body) = node.http_get("/metrics");
        (status == 200 && metric(&body, "fovea_frames_acked_total") == Some(1.0)).then_some(())
    });
}
