//! Renders [`Stats`] and [`Health`] in the Prometheus text exposition format (version 0.0.4).
//!
//! Names follow Prometheus conventions: `fovea_` prefix, `_total` for counters, `_seconds` and
//! `_bytes` for units, labels for the dimension that varies (stage, model, kind, reason). The
//! stages of one frame's way, in order: `queue` (MQTT receive -> a worker takes it), `inference`,
//! `local_ack` (handed to the producer -> the local broker acknowledged), `total` (MQTT receive ->
//! PUBACK), and `replication` (in the local broker -> acknowledged by the cloud).

use super::histogram::{BOUNDS, Histogram};
use crate::outbox::state::Mode;
use crate::service::health::Health;
use crate::stats::{STAGES, Stage, Stats};
use std::fmt::Write as _;
use std::sync::atomic::AtomicU64;

/// The content type Prometheus expects for this format.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// Everything about the process that is not in [`Stats`].
pub struct Process {
    pub version: &'static str,
    pub node_id: String,
    /// Unix seconds at which the process started.
    pub start_time: f64,
}

pub fn render(health: &Health, process: &Process) -> String {
    let s = &*health.stats;
    let mut out = Out(String::with_capacity(16 * 1024));

    out.help(
        "fovea_build_info",
        "gauge",
        "Version and node id of this fovea.",
    );
    out.line(
        "fovea_build_info",
        &[("version", process.version), ("node", &process.node_id)],
        1.0,
    );
    out.help(
        "process_start_time_seconds",
        "gauge",
        "Start time of the process, Unix seconds.",
    );
    out.line("process_start_time_seconds", &[], process.start_time);
    if let Some(rss) = resident_bytes() {
        out.help(
            "process_resident_memory_bytes",
            "gauge",
            "Resident memory of the process.",
        );
        out.line("process_resident_memory_bytes", &[], rss as f64);
    }

    out.help(
        "fovea_healthy",
        "gauge",
        "1 unless a stage is stalled (then the systemd watchdog is not fed).",
    );
    out.line("fovea_healthy", &[], flag(health.live().is_ok()));
    out.help(
        "fovea_ready",
        "gauge",
        "1 when taking frames, connected to MQTT and the local broker reachable (/readyz).",
    );
    out.line("fovea_ready", &[], flag(health.ready()));
    out.help(
        "fovea_mqtt_connected",
        "gauge",
        "1 while the MQTT session is up.",
    );
    out.line(
        "fovea_mqtt_connected",
        &[],
        flag(s.mqtt_connected.load(std::sync::atomic::Ordering::Relaxed)),
    );
    mqtt(&mut out, s);
    out.help(
        "fovea_local_broker_state",
        "gauge",
        "Delivery mode of the outbox: 1 for the current one.",
    );
    let current = s.local_broker();
    for mode in [Mode::Online, Mode::Slow, Mode::Offline, Mode::CatchUp] {
        out.line(
            "fovea_local_broker_state",
            &[("state", mode.name())],
            flag(current == Some(mode)),
        );
    }

    outbox(&mut out, s);
    counters(&mut out, s);
    spool(&mut out, s);
    disk(&mut out, s);
    uplink(&mut out, s);

    out.help(
        "fovea_stage_duration_seconds",
        "histogram",
        "Time each stage of a frame's way took: queue, inference, local_ack, total (MQTT receive to PUBACK), replication (local broker to cloud ack).",
    );
    for stage in STAGES {
        out.histogram(
            "fovea_stage_duration_seconds",
            ("stage", stage_label(stage)),
            s.histogram(stage),
        );
    }
    out.help(
        "fovea_model_inference_seconds",
        "histogram",
        "ONNX Runtime time of one model on one frame.",
    );
    for (model, h) in s.model_histograms() {
        out.histogram("fovea_model_inference_seconds", ("model", &model), &h);
    }
    out.0
}

fn counters(out: &mut Out, s: &Stats) {
    let simple: [(&str, &str, &AtomicU64); 9] = [
        (
            "fovea_frames_received_total",
            "Frames taken from MQTT (whole frames, after chunk reassembly).",
            &s.frames_in,
        ),
        (
            "fovea_frames_acked_total",
            "Frames acknowledged to MQTT: every record durable in the local broker or the spool.",
            &s.acked,
        ),
        (
            "fovea_frames_skipped_total",
            "Frames stored but not inferred because they were stale (when_behind = skip_stale).",
            &s.skipped_stale,
        ),
        (
            "fovea_records_spooled_total",
            "Records written to the disk spool because the local broker was away or slow.",
            &s.spooled,
        ),
        (
            "fovea_records_drained_total",
            "Spooled records delivered to the local broker.",
            &s.drained,
        ),
        (
            "fovea_frames_dropped_total",
            "Spooled frames dropped to make room (spool full; see fovea_spool_dropped_records).",
            &s.spool_dropped,
        ),
        (
            "fovea_delivery_failures_total",
            "Records the producer refused or a broker failed (they are spooled or retried).",
            &s.delivery_failures,
        ),
        (
            "fovea_records_given_up_total",
            "Dead letters the local broker refused for good: nothing could stand in for them (logged with their record id).",
            &s.records_given_up,
        ),
        (
            "fovea_producer_rebuilds_total",
            "Local producers rebuilt after a fatal error.",
            &s.producer_rebuilds,
        ),
    ];
    for (name, help, counter) in simple {
        out.help(name, "counter", help);
        out.line(name, &[], Stats::get(counter) as f64);
    }
    out.help(
        "fovea_records_refused_total",
        "counter",
        "Records the local broker refused for good (too large, invalid, not authorized), by kind; each was replaced by a record-refused dead letter.",
    );
    for (class, n) in s.refused() {
        out.line(
            "fovea_records_refused_total",
            &[("kind", class_label(class))],
            n as f64,
        );
    }
    out.help(
        "fovea_records_delivered_total",
        "counter",
        "Records the local broker acknowledged (sent straight or drained from the spool), by kind; a chunked frame counts each chunk.",
    );
    for (kind, counter) in [
        ("frame", &s.frames_out),
        ("result", &s.results_out),
        ("dead_letter", &s.dead_letters),
    ] {
        out.line(
            "fovea_records_delivered_total",
            &[("kind", kind)],
            Stats::get(counter) as f64,
        );
    }
    out.help(
        "fovea_spool_write_failures_total",
        "counter",
        "Spool appends and flushes that failed, by reason (disk-full, error); the frames stay un-acked at the MQTT broker and are retried.",
    );
    let failures = s
        .spool_write_failures
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    for reason in ["disk-full", "error"] {
        let n = failures.get(reason).copied().unwrap_or(0);
        out.line(
            "fovea_spool_write_failures_total",
            &[("reason", reason)],
            n as f64,
        );
    }
    out.help(
        "fovea_frames_rejected_total",
        "counter",
        "Frames turned into dead letters, by reason.",
    );
    let rejected = s.rejected.lock().map(|m| m.clone()).unwrap_or_default();
    for (reason, n) in rejected {
        out.line(
            "fovea_frames_rejected_total",
            &[("reason", &reason)],
            n as f64,
        );
    }
}

fn spool(out: &mut Out, s: &Stats) {
    let Some(spool) = s.spool.lock().ok().and_then(|g| g.clone()) else {
        return;
    };
    out.help("fovea_spool_bytes", "gauge", "Record bytes in the spool.");
    out.line("fovea_spool_bytes", &[], spool.total_bytes as f64);
    out.help("fovea_spool_max_bytes", "gauge", "The spool's byte bound.");
    out.line("fovea_spool_max_bytes", &[], spool.max_bytes as f64);
    out.help(
        "fovea_spool_records",
        "gauge",
        "Records in the spool, by class.",
    );
    let mut classes: Vec<_> = spool.records.iter().collect();
    classes.sort_by_key(|(c, _)| c.name());
    for (class, n) in classes {
        out.line("fovea_spool_records", &[("class", class.name())], *n as f64);
    }
    out.help(
        "fovea_spool_oldest_age_seconds",
        "gauge",
        "Age of the oldest spooled record: how far the local broker is behind (0 when empty).",
    );
    let age = spool
        .oldest_created_ms
        .map_or(0.0, |ms| (crate::job::now_ms() - ms).max(0) as f64 / 1000.0);
    out.line("fovea_spool_oldest_age_seconds", &[], age);
    out.help(
        "fovea_spool_dropped_records",
        "gauge",
        "Records the full spool dropped since it was created, by class and reason (persisted).",
    );
    for ((class, reason), n) in &spool.dropped {
        out.line(
            "fovea_spool_dropped_records",
            &[("class", class), ("reason", reason)],
            *n as f64,
        );
    }
    out.help(
        "fovea_spool_quarantined_records",
        "gauge",
        "Corrupt records set aside since the spool was created.",
    );
    out.line(
        "fovea_spool_quarantined_records",
        &[],
        spool.quarantined as f64,
    );
}

/// The disk budget's parts (README "Disk"): what each holds, may hold, and the free space left.
fn disk(out: &mut Out, s: &Stats) {
    let samples = s.disk.lock().map(|d| d.clone()).unwrap_or_default();
    if samples.is_empty() {
        return;
    }
    let bounded = [
        (
            "fovea_disk_bytes",
            "Bytes on disk in each part's folder (spool, local_broker, claim_checks); sampled every 30 s.",
            samples.iter().map(|d| d.used).collect::<Vec<_>>(),
        ),
        (
            "fovea_disk_budget_bytes",
            "Bytes each part may grow to (its config bound); absent when unbounded.",
            samples.iter().map(|d| d.budget).collect(),
        ),
    ];
    for (name, help, values) in bounded {
        out.help(name, "gauge", help);
        for (d, value) in samples.iter().zip(values) {
            if let Some(v) = value {
                out.line(name, &[("part", d.part)], v as f64);
            }
        }
    }
    out.help(
        "fovea_disk_free_bytes",
        "gauge",
        "Free bytes on the filesystem of each part.",
    );
    for d in &samples {
        out.line("fovea_disk_free_bytes", &[("part", d.part)], d.free as f64);
    }
}

fn uplink(out: &mut Out, s: &Stats) {
    out.help(
        "fovea_uplink_records_total",
        "counter",
        "Records handed to the cloud producer, by kind.",
    );
    out.line(
        "fovea_uplink_records_total",
        &[("kind", "result")],
        Stats::get(&s.uplink_results) as f64,
    );
    out.line(
        "fovea_uplink_records_total",
        &[("kind", "frame")],
        Stats::get(&s.uplink_frames) as f64,
    );
    for (name, help, counter) in [
        (
            "fovea_uplink_acked_total",
            "Records the cloud acknowledged.",
            &s.uplink_acked,
        ),
        (
            "fovea_uplink_bytes_total",
            "Record bytes sent to the cloud.",
            &s.uplink_bytes,
        ),
        (
            "fovea_uplink_filtered_total",
            "Frames the uplink rules kept at the edge.",
            &s.uplink_filtered,
        ),
    ] {
        out.help(name, "counter", help);
        out.line(name, &[], Stats::get(counter) as f64);
    }
    out.help(
        "fovea_uplink_refused_total",
        "counter",
        "Records the uplink gave up on for good (refused by the cloud, or over \
         uplink.record_limit_bytes), each recorded in the local uplink dead-letter topic, by reason.",
    );
    let refused = s
        .uplink_refused
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    for (reason, n) in refused {
        out.line(
            "fovea_uplink_refused_total",
            &[("reason", &reason)],
            n as f64,
        );
    }
    let lag = s.uplink_lag.lock().map(|m| m.clone()).unwrap_or_default();
    if !lag.is_empty() {
        out.help(
            "fovea_uplink_lag_records",
            "gauge",
            "Records in the local broker not yet replicated to the cloud, by local topic.",
        );
        for (topic, n) in lag {
            out.line("fovea_uplink_lag_records", &[("topic", &topic)], n as f64);
        }
    }
    let expired = s
        .uplink_expired
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    out.help(
        "fovea_uplink_expired_records_total",
        "counter",
        "Local records deleted by the local broker's retention before the uplink replicated \
         them (lost to the cloud), by local topic and partition.",
    );
    for ((topic, partition), n) in expired {
        out.line(
            "fovea_uplink_expired_records_total",
            &[("topic", &topic), ("partition", &partition.to_string())],
            n as f64,
        );
    }
    let retention = s
        .uplink_retention
        .lock()
        .map(|m| m.clone())
        .unwrap_or_default();
    if !retention.is_empty() {
        out.help(
            "fovea_uplink_oldest_unreplicated_age_seconds",
            "gauge",
            "Age of the oldest local record not yet replicated to the cloud, by local topic (0 \
             when caught up).",
        );
        for (topic, u) in &retention {
            out.line(
                "fovea_uplink_oldest_unreplicated_age_seconds",
                &[("topic", topic)],
                u.oldest_age_seconds,
            );
        }
        out.help(
            "fovea_uplink_retention_used_ratio",
            "gauge",
            "That age over the local topic's retention.ms: at 1 its records are deleted before \
             the cloud has them (0 without a time limit).",
        );
        for (topic, u) in &retention {
            out.line(
                "fovea_uplink_retention_used_ratio",
                &[("topic", topic)],
                u.ratio(),
            );
        }
    }
}

/// The outbox's mode changes and its pacing while the broker is slow.
fn outbox(out: &mut Out, s: &Stats) {
    out.help(
        "fovea_outbox_mode_changes_total",
        "counter",
        "Changes of the outbox's delivery mode (fovea_local_broker_state), by from and to.",
    );
    if let Ok(map) = s.mode_changes.lock() {
        for ((from, to), n) in map.iter() {
            out.line(
                "fovea_outbox_mode_changes_total",
                &[("from", from), ("to", to)],
                *n as f64,
            );
        }
    }
    let gauge = |c: &AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
    out.help(
        "fovea_outbox_drain_window",
        "gauge",
        "Spooled records the drain keeps in flight at most: halved when a drained record times out while the broker answers, widened by one per window acknowledged.",
    );
    out.line("fovea_outbox_drain_window", &[], gauge(&s.drain_window));
    out.help(
        "fovea_outbox_drain_pause_seconds",
        "gauge",
        "How long the drain still waits after a timeout (grows on repeated timeouts).",
    );
    out.line(
        "fovea_outbox_drain_pause_seconds",
        &[],
        gauge(&s.drain_pause_ms) / 1000.0,
    );
    out.help(
        "fovea_outbox_mode_dwell_seconds",
        "gauge",
        "How long a mode must last before the outbox sends more (to catch-up, to online); doubles after each oscillation.",
    );
    out.line(
        "fovea_outbox_mode_dwell_seconds",
        &[],
        gauge(&s.mode_dwell_ms) / 1000.0,
    );
    out.help(
        "fovea_outbox_slow_timeouts_total",
        "counter",
        "Records not acknowledged within spool.divert_after_ms while the broker still answered (slow, not away): spooled or retried, never dropped.",
    );
    out.line(
        "fovea_outbox_slow_timeouts_total",
        &[],
        gauge(&s.slow_timeouts),
    );
}

/// The ingress: what it holds for the MQTT broker, chunks, best-effort drops, cameras.
fn mqtt(out: &mut Out, s: &Stats) {
    let g = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed) as f64;
    out.help(
        "fovea_mqtt_inflight",
        "gauge",
        "MQTT deliveries received and not yet acknowledged (the broker's in-flight window for fovea).",
    );
    out.line("fovea_mqtt_inflight", &[], s.mqtt_held.count() as f64);
    out.help(
        "fovea_mqtt_inflight_bytes",
        "gauge",
        "Payload bytes of the MQTT deliveries held un-acknowledged (mqtt.max_in_flight_bytes).",
    );
    out.line("fovea_mqtt_inflight_bytes", &[], s.mqtt_held.bytes() as f64);
    out.help(
        "fovea_mqtt_ack_wait_seconds",
        "gauge",
        "How long deliveries have been held with none acknowledged; 0 when none are held.",
    );
    let stuck = s.mqtt_held.stuck_for(std::time::Instant::now());
    out.line(
        "fovea_mqtt_ack_wait_seconds",
        &[],
        stuck.map_or(0.0, |d| d.as_secs_f64()),
    );
    out.help(
        "fovea_mqtt_chunks_stored_total",
        "counter",
        "Chunks of chunked uploads stored under state_dir and acknowledged before their frame was whole.",
    );
    out.line("fovea_mqtt_chunks_stored_total", &[], g(&s.chunks_stored));
    out.help(
        "fovea_mqtt_qos0_dropped_total",
        "counter",
        "QoS 0 frames dropped because the inference queue had no room (QoS 0 is at most once).",
    );
    out.line("fovea_mqtt_qos0_dropped_total", &[], g(&s.qos0_dropped));
    out.help(
        "fovea_mqtt_shed_total",
        "counter",
        "QoS 1 deliveries left un-acked beyond mqtt.max_in_flight held ones; the broker sends them again on a renewed session.",
    );
    out.line("fovea_mqtt_shed_total", &[], g(&s.mqtt_shed));
    out.help(
        "fovea_mqtt_spilled_total",
        "counter",
        "QoS 1 deliveries over the memory budget whose payload waited in state_dir/ingress-spill.",
    );
    out.line("fovea_mqtt_spilled_total", &[], g(&s.mqtt_spilled));
    out.help(
        "fovea_mqtt_spill_bytes",
        "gauge",
        "Payload bytes waiting in state_dir/ingress-spill (mqtt.spill_max_bytes).",
    );
    out.line("fovea_mqtt_spill_bytes", &[], g(&s.mqtt_spill_bytes));
    out.help(
        "fovea_cameras",
        "gauge",
        "Cameras the node keeps state for (mqtt.max_cameras).",
    );
    out.line("fovea_cameras", &[], g(&s.cameras_known));
    out.help(
        "fovea_cameras_evicted_total",
        "counter",
        "Cameras forgotten after mqtt.camera_idle_secs without a frame and nothing in flight.",
    );
    out.line("fovea_cameras_evicted_total", &[], g(&s.cameras_evicted));
}

fn stage_label(stage: Stage) -> &'static str {
    match stage {
        Stage::Kafka => "local_ack",
        other => other.name(),
    }
}

fn flag(b: bool) -> f64 {
    if b { 1.0 } else { 0.0 }
}

/// Resident set size from /proc (Linux); None elsewhere.
fn resident_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

struct Out(String);

impl Out {
    fn help(&mut self, name: &str, kind: &str, help: &str) {
        let _ = writeln!(self.0, "# HELP {name} {help}");
        let _ = writeln!(self.0, "# TYPE {name} {kind}");
    }

    fn line(&mut self, name: &str, labels: &[(&str, &str)], value: f64) {
        self.0.push_str(name);
        if !labels.is_empty() {
            self.0.push('{');
            for (i, (k, v)) in labels.iter().enumerate() {
                if i > 0 {
                    self.0.push(',');
                }
                let _ = write!(self.0, "{k}=\"{}\"", escape(v));
            }
            self.0.push('}');
        }
        let _ = writeln!(self.0, " {value}");
    }

    fn histogram(&mut self, name: &str, label: (&str, &str), h: &Histogram) {
        let snap = h.snapshot();
        let bucket = format!("{name}_bucket");
        for (bound, n) in BOUNDS.iter().zip(&snap.cumulative) {
            self.line(&bucket, &[label, ("le", &bound.to_string())], *n as f64);
        }
        self.line(&bucket, &[label, ("le", "+Inf")], snap.count as f64);
        self.line(&format!("{name}_sum"), &[label], snap.sum_seconds);
        self.line(&format!("{name}_count"), &[label], snap.count as f64);
    }
}

/// Label values escape backslash, double quote and newline.
fn escape(v: &str) -> String {
    v.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

fn class_label(class: crate::spool::Class) -> &'static str {
    match class {
        crate::spool::Class::Frame => "frame",
        crate::spool::Class::Result => "result",
        crate::spool::Class::DeadLetter => "dead_letter",
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    fn sample(text: &str, series: &str) -> Option<f64> {
        text.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
    }

    #[test]
    fn renders_counters_histograms_and_labels() {
        let stats = Arc::new(Stats::default());
        Stats::incr(&stats.frames_in);
        Stats::incr(&stats.frames_in);
        stats.reject("decode-failed");
        stats.uplink_refuse("too-large");
        stats.uplink_refuse("too-large");
        stats.record(Stage::Inference, Duration::from_millis(12));
        stats.record(Stage::Kafka, Duration::from_millis(3));
        stats.record_model("efficientnet-lite0", Duration::from_millis(11));
        stats.set_local_broker(Mode::Offline);
        stats.uplink_expire("fovea.frames", 2, 17);
        stats.uplink_expire("fovea.frames", 2, 3);
        stats.uplink_retention.lock().unwrap().insert(
            "fovea.results".into(),
            crate::uplink::backlog::RetentionUse {
                oldest_age_seconds: 15.0,
                retention_ms: 20_000,
            },
        );
        let health = Health {
            stats,
            stall_after: Duration::from_secs(60),
            uplink_enabled: false,
            retention_warn_share: 0.8,
        };
        let text = render(
            &health,
            &Process {
                version: "1.2.3",
                node_id: "edge \"1\"".into(),
                start_time: 1.5,
            },
        );
        assert_eq!(sample(&text, "fovea_frames_received_total"), Some(2.0));
        assert_eq!(
            sample(
                &text,
                "fovea_frames_rejected_total{reason=\"decode-failed\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "fovea_uplink_refused_total{reason=\"too-large\"}"),
            Some(2.0)
        );
        assert_eq!(
            sample(
                &text,
                "fovea_uplink_expired_records_total{topic=\"fovea.frames\",partition=\"2\"}"
            ),
            Some(20.0)
        );
        assert_eq!(
            sample(
                &text,
                "fovea_uplink_oldest_unreplicated_age_seconds{topic=\"fovea.results\"}"
            ),
            Some(15.0)
        );
        assert_eq!(
            sample(
                &text,
                "fovea_uplink_retention_used_ratio{topic=\"fovea.results\"}"
            ),
            Some(0.75)
        );
        assert_eq!(
            sample(
                &text,
                "fovea_stage_duration_seconds_bucket{stage=\"inference\",le=\"0.01\"}"
            ),
            Some(0.0)
        );
        assert_eq!(
            sample(
                &text,
                "fovea_stage_duration_seconds_bucket{stage=\"inference\",le=\"0.025\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "fovea_stage_duration_seconds_count{stage=\"local_ack\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(
                &text,
                "fovea_model_inference_seconds_count{model=\"efficientnet-lite0\"}"
            ),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "fovea_local_broker_state{state=\"offline\"}"),
            Some(1.0)
        );
        assert_eq!(
            sample(&text, "fovea_local_broker_state{state=\"online\"}"),
            Some(0.0)
        );
        assert_eq!(sample(&text, "fovea_ready"), Some(0.0));
        assert!(text.contains("node=\"edge \\\"1\\\"\""), "{text}");
        // Every sample line belongs to a declared metric family.
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            let name = line.split(['{', ' ']).next().unwrap();
            let family = name
                .trim_end_matches("_bucket")
                .trim_end_matches("_sum")
                .trim_end_matches("_count");
            assert!(
                text.contains(&format!("# TYPE {family} "))
                    || text.contains(&format!("# TYPE {name} ")),
                "{line}"
            );
        }
    }
}
