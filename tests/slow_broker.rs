//! A local broker that answers, but slowly (issue 12, item 4): a throttling proxy between fovea
//! and nisshi makes some acknowledgements take longer than `spool.divert_after_ms` while the
//! broker keeps answering. The outbox must treat that as slow, not away: frames keep being
//! acknowledged (through the spool), the spool drains at the rate the broker takes, the mode
//! changes only a few times and never to offline, and every acknowledged frame reaches Kafka.
//!
//! fovea delivers at least once: a record librdkafka timed out may have been written anyway, and
//! the spool sends it again. So Kafka may hold a record twice, but only ever under the same
//! `fovea-record-id` (a consumer drops the second); two different record ids for one frame would
//! be a frame produced twice, which is a bug. The test counts and prints the duplicates.
//! Packaged defaults throughout (divert_after_ms = 5000, probe_interval_ms = 1000).

mod harness;

use harness::*;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::{Duration, Instant};

const CAMERAS: usize = 4;
const FPS: f64 = 5.0;
/// The packaged `spool.divert_after_ms`.
const DIVERT_AFTER: Duration = Duration::from_secs(5);
/// How long the broker is slow.
const SLOW_FOR: Duration = Duration::from_secs(45);

fn scrape(node: &Node) -> String {
    node.http_get("/metrics").1
}

fn value(body: &str, series: &str) -> f64 {
    metric(body, series).unwrap_or(0.0)
}

/// Every `fovea_outbox_mode_changes_total{from,to}` series, as "from -> to".
fn mode_changes(body: &str) -> BTreeMap<String, f64> {
    body.lines()
        .filter_map(|l| l.strip_prefix("fovea_outbox_mode_changes_total{"))
        .filter_map(|l| {
            let (labels, n) = l.rsplit_once(' ')?;
            let label = |k: &str| {
                let at = labels.find(&format!("{k}=\""))? + k.len() + 2;
                Some(labels[at..].split('"').next()?.to_string())
            };
            Some((
                format!("{} -> {}", label("from")?, label("to")?),
                n.parse().ok()?,
            ))
        })
        .collect()
}

fn changes_between(before: &str, after: &str) -> BTreeMap<String, f64> {
    let before = mode_changes(before);
    mode_changes(after)
        .into_iter()
        .map(|(k, n)| {
            let d = n - before.get(&k).copied().unwrap_or(0.0);
            (k, d)
        })
        .filter(|(_, n)| *n > 0.0)
        .collect()
}

/// The sum of every series of `name` (whatever its labels).
fn sum(body: &str, name: &str) -> f64 {
    body.lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) || l.starts_with(&format!("{name} ")))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

fn spooled_now(body: &str) -> f64 {
    ["frame", "result", "dead_letter"]
        .iter()
        .map(|c| value(body, &format!("fovea_spool_records{{class=\"{c}\"}}")))
        .sum()
}

#[test]
fn a_slow_broker_is_not_an_away_broker() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let (broker_port, proxy_port) = (free_port(), free_port());
    let proxy = SlowProxy::start(proxy_port, broker_port);
    let kafka = Kafka::start_behind(dir.path(), "edge", broker_port, proxy_port);
    // Only the classifier runs (15 ms a frame, not 40 with the detector): one worker must keep
    // up with 20 frames/s on a loaded 2-core machine, so that what this test sees is the slow
    // broker and not inference falling behind (a backlog of frames at MQTT is issue 13's case).
    let config = node_config(&mqtt, &kafka, "")
        .replace(&kafka.brokers(), &format!("127.0.0.1:{proxy_port}"))
        .replace(
            r#"models = ["efficientnet-lite0", "ssdlite-person"]"#,
            r#"models = ["efficientnet-lite0"]"#,
        );
    assert!(config.contains(r#"models = ["efficientnet-lite0"]"#));
    let node = Node::start(dir.path(), &config);
    let deadline = Instant::now() + Duration::from_secs(60);
    while value(&scrape(&node), "fovea_local_broker_state{state=\"online\"}") != 1.0 {
        assert!(
            Instant::now() < deadline,
            "never online:\n{}",
            node.proc.log_text()
        );
        std::thread::sleep(Duration::from_millis(200));
    }

    let load = Load::start(mqtt.port, CAMERAS, FPS, small_jpegs());
    std::thread::sleep(Duration::from_secs(5));
    let before = scrape(&node);
    // Slow but answering: 30 ms per 16 KiB chunk and 300 KB/s each way, below the ~1 MB/s of
    // frames and results the load makes, so acknowledgements fall behind by more than 5 s.
    proxy.set_slow(Duration::from_millis(30), 300_000);
    let slow_from = Instant::now();
    let acked_before = value(&before, "fovea_frames_acked_total");
    let (mut last_acked, mut last_rise) = (acked_before, slow_from);
    let mut longest_gap = Duration::ZERO;
    let mut min_window = f64::MAX;
    let mut max_pause = 0.0f64;
    let mut max_spool = 0.0f64;
    let mut modes_seen = HashSet::new();
    while slow_from.elapsed() < SLOW_FOR {
        std::thread::sleep(Duration::from_millis(250));
        let body = scrape(&node);
        let acked = value(&body, "fovea_frames_acked_total");
        if acked > last_acked {
            longest_gap = longest_gap.max(last_rise.elapsed());
            (last_acked, last_rise) = (acked, Instant::now());
        }
        min_window = min_window.min(value(&body, "fovea_outbox_drain_window"));
        max_pause = max_pause.max(value(&body, "fovea_outbox_drain_pause_seconds"));
        max_spool = max_spool.max(value(&body, "fovea_spool_records{class=\"frame\"}"));
        for mode in ["online", "slow", "offline", "catch-up"] {
            if value(
                &body,
                &format!("fovea_local_broker_state{{state=\"{mode}\"}}"),
            ) == 1.0
            {
                modes_seen.insert(mode);
            }
        }
    }
    longest_gap = longest_gap.max(last_rise.elapsed());
    let slow_end = scrape(&node);
    proxy.set_fast();
    std::thread::sleep(Duration::from_secs(5));
    let per_camera = load.stop();
    let sent = per_camera * CAMERAS as u64;

    // Every frame acknowledged, the spool drained and the outbox online again.
    let fast_from = Instant::now();
    let deadline = fast_from + Duration::from_secs(120);
    let mut first_drained = None;
    let fin = loop {
        let body = scrape(&node);
        // The workers may still be behind the load (two models per frame on a shared machine).
        let all_acked = value(&body, "fovea_frames_acked_total") >= sent as f64;
        let drained = spooled_now(&body) == 0.0
            && value(&body, "fovea_local_broker_state{state=\"online\"}") == 1.0;
        if drained && first_drained.is_none() {
            first_drained = Some(fast_from.elapsed());
        }
        if all_acked && drained {
            break body;
        }
        assert!(
            Instant::now() < deadline,
            "not all acked, spool not drained or not online ({sent} sent):\n{body}"
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    let all_done = fast_from.elapsed();

    let slow_timeouts = value(&slow_end, "fovea_outbox_slow_timeouts_total");
    let changes = changes_between(&before, &fin);
    let n_changes: f64 = changes.values().sum();
    eprintln!(
        "sent {sent}, acked {} ({} in the slow phase), spooled {}, drained {}, delivered {}, \
         delivery failures {}, slow timeouts {slow_timeouts}, longest ack gap {longest_gap:?}, \
         mode changes {n_changes} {changes:?}, modes seen while slow {modes_seen:?}, \
         min drain window {min_window}, max drain pause {max_pause} s, \
         max frames in spool {max_spool}, dwell at the end of the slow phase {} s; after the \
         broker was fast again: spool empty and online after {first_drained:?}, every frame \
         acked after {all_done:?}",
        value(&fin, "fovea_frames_acked_total"),
        value(&slow_end, "fovea_frames_acked_total") - acked_before,
        value(&fin, "fovea_records_spooled_total"),
        value(&fin, "fovea_records_drained_total"),
        sum(&fin, "fovea_records_delivered_total"),
        value(&fin, "fovea_delivery_failures_total"),
        value(&slow_end, "fovea_outbox_mode_dwell_seconds"),
    );
    // The node's own account of its modes and its MQTT session (the temp dir, and the log with
    // it, is gone once the test ends).
    let log = node.proc.log_text();
    let lines: Vec<&str> = log
        .lines()
        .filter(|l| {
            !l.contains(" DEBUG ")
                && ["fovea::outbox: ", "fovea::ingress::mqtt", " ERROR "]
                    .iter()
                    .any(|w| l.contains(w))
        })
        .collect();
    let shown = &lines[lines.len().saturating_sub(80)..];
    eprintln!(
        "node log, outbox and MQTT (the last {} of {} lines):\n{}",
        shown.len(),
        lines.len(),
        shown.join("\n")
    );
    // Once each: more would be MQTT redeliveries (a session that dropped), which at least once
    // allows but which this test does not expect.
    assert_eq!(value(&fin, "fovea_frames_acked_total"), sent as f64);
    // The broker was slow enough: deliveries timed out while it answered, the spool took
    // frames, and the drain cut its window (256, halved once per flight that timed out).
    assert!(slow_timeouts > 0.0, "not slow enough:\n{slow_end}");
    assert!(value(&fin, "fovea_records_spooled_total") > 0.0);
    assert!(
        min_window < 256.0,
        "the drain window was never cut:\n{slow_end}"
    );
    // Frames kept being acknowledged. While frames go straight, one waits for the broker at
    // most divert_after (librdkafka's message timeout) before it turns the outbox slow and
    // goes to the spool; librdkafka checks message timeouts once a second; from then on the
    // spool acknowledges every frame after one append and flush. Add a 20 ms tick, the 250 ms
    // scrape and 1.75 s for a spool flush and the workers on a loaded 2-core machine: no gap
    // reaches divert_after + 3 s.
    let gap_bound = DIVERT_AFTER + Duration::from_secs(3);
    assert!(
        longest_gap < gap_bound,
        "no acks for {longest_gap:?} (bound {gap_bound:?})"
    );
    // Slow is not away: no change to offline (only a refusal or a failed probe makes one, and
    // the broker answered throughout).
    let offline: f64 = changes
        .iter()
        .filter(|(k, _)| k.ends_with("-> offline"))
        .map(|(_, n)| n)
        .sum();
    assert_eq!(offline, 0.0, "a slow broker is not away: {changes:?}");
    // The bound from the design: a cycle online -> slow -> catch-up -> online needs two changes
    // towards sending more, each waiting out the dwell (at least 2 s), and a record sent
    // straight once online again to time out (divert_after, 5 s), so cycles start at least 9 s
    // apart. Records time out only while the broker is slow and up to divert_after after
    // (the 5 s fast phase covers that): at most 1 + 50 / 9 = 6 cycles of 3 changes, 18. (With
    // the packaged defaults the dwell does not double here: online lasts divert_after, longer
    // than the two dwells an oscillation is counted within.) Expected when the load outruns
    // what the slow broker takes: 3, the spool never empties while it is slow.
    assert!(n_changes <= 18.0, "{n_changes} mode changes: {changes:?}");
    assert!(
        changes.get("online -> slow").is_some_and(|n| *n >= 1.0),
        "never slow: {changes:?}"
    );

    // Every acknowledged frame is in Kafka, by record id; duplicates only as the same record.
    let want: HashSet<(String, u64)> = (1..=CAMERAS)
        .flat_map(|c| (1..=per_camera).map(move |s| (format!("load-{c}"), s)))
        .collect();
    for (topic, by) in [
        ("fovea.results", results_by_frame as fn(&[_]) -> ByFrame),
        ("fovea.frames", frames_by_frame),
    ] {
        // Record ids per frame, decoded as the records arrive (reading until every frame is
        // there: a count of records says nothing when some are duplicates).
        let mut got: HashMap<(String, u64), HashMap<String, usize>> = HashMap::new();
        let mut seen = 0;
        let records = kafka.read_until(topic, Duration::from_secs(120), |out| {
            for (key, ids) in by(&out[seen..]) {
                for id in ids {
                    *got.entry(key.clone()).or_default().entry(id).or_default() += 1;
                }
            }
            seen = out.len();
            want.iter().all(|k| got.contains_key(k))
        });
        for (key, ids) in by(&records[seen..]) {
            for id in ids {
                *got.entry(key.clone()).or_default().entry(id).or_default() += 1;
            }
        }
        let missing: Vec<_> = want.iter().filter(|k| !got.contains_key(*k)).collect();
        let unexpected: Vec<_> = got.keys().filter(|k| !want.contains(*k)).collect();
        let two_ids: Vec<_> = got.iter().filter(|(_, ids)| ids.len() > 1).collect();
        let dups: usize = got
            .values()
            .flat_map(|ids| ids.values())
            .map(|n| n - 1)
            .sum();
        let dup_frames = got
            .values()
            .filter(|ids| ids.values().any(|n| *n > 1))
            .count();
        eprintln!(
            "{topic}: {} records for {} frames, {} missing, {dups} duplicates (of {dup_frames} \
             frames, each under its own record id), {} frames under two record ids",
            records.len(),
            got.len(),
            missing.len(),
            two_ids.len()
        );
        assert!(missing.is_empty(), "{topic}: frames missing: {missing:?}");
        assert!(
            unexpected.is_empty(),
            "{topic}: frames nobody sent: {unexpected:?}"
        );
        assert!(
            two_ids.is_empty(),
            "{topic}: frames under more than one record id: {two_ids:?}"
        );
        assert_eq!(records.len(), want.len() + dups, "{topic}: records counted");
    }
}
