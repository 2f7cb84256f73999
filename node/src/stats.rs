//! Counters and per-stage latencies of the pipeline, shared by every stage.
//!
//! Kept deliberately simple (atomics, a fixed-bucket histogram and a bounded sample buffer per
//! stage) so that the hot path pays a few nanoseconds. The benchmark reads the samples (exact
//! quantiles); the Prometheus endpoint ([`crate::metrics`]) renders everything else.

use crate::metrics::histogram::Histogram;
use crate::outbox::state::Mode;
use crate::service::liveness::Liveness;
use crate::spool::{Class, SpoolStats};
use crate::uplink::backlog::RetentionUse;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Samples kept per stage; older ones are overwritten (a ring), so memory stays bounded.
const MAX_SAMPLES: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// MQTT arrival -> a worker picks the frame up.
    Queue,
    /// Decode + preprocess + every model's ONNX run.
    Inference,
    /// Records handed to the producer -> acknowledged by the local broker.
    Kafka,
    /// MQTT arrival -> PUBACK sent (the whole path, straight to the broker or via the spool).
    Total,
    /// Result or frame in the local broker -> acknowledged by the cloud (the uplink).
    Replication,
}

pub const STAGES: [Stage; 5] = [
    Stage::Queue,
    Stage::Inference,
    Stage::Kafka,
    Stage::Total,
    Stage::Replication,
];

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Inference => "inference",
            Stage::Kafka => "kafka",
            Stage::Total => "total",
            Stage::Replication => "replication",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

#[derive(Debug, Default)]
pub struct Stats {
    pub frames_in: AtomicU64,
    pub results_out: AtomicU64,
    pub frames_out: AtomicU64,
    pub dead_letters: AtomicU64,
    pub skipped_stale: AtomicU64,
    pub acked: AtomicU64,
    pub delivery_failures: AtomicU64,
    /// Records written to the spool, drained from it, and frames it dropped when full.
    pub spooled: AtomicU64,
    pub drained: AtomicU64,
    pub spool_dropped: AtomicU64,
    /// Records the local broker refused for good, by class (frame, result, dead letter): each
    /// replaced by a `record-refused` dead letter.
    refused: [AtomicU64; 3],
    /// Dead letters refused for good (nothing can stand in for them).
    pub records_given_up: AtomicU64,
    /// Local producers rebuilt after a fatal error.
    pub producer_rebuilds: AtomicU64,
    /// Uplink: results and frames sent to the cloud, record bytes sent, frames not replicated.
    pub uplink_results: AtomicU64,
    pub uplink_frames: AtomicU64,
    pub uplink_bytes: AtomicU64,
    pub uplink_filtered: AtomicU64,
    /// Uplink records the cloud acknowledged.
    pub uplink_acked: AtomicU64,
    /// Uplink records refused for good (by the cloud, or over `uplink.record_limit_bytes`) whose
    /// local uplink dead letter the local broker acknowledged, by reason (`too-large`, ...).
    pub uplink_refused: Mutex<BTreeMap<String, u64>>,
    /// Records in the local broker not yet replicated (past the uplink's checkpoint), by local
    /// topic, from librdkafka's consumer statistics; empty until known.
    pub uplink_lag: Mutex<BTreeMap<String, i64>>,
    /// Local records that expired before the uplink replicated them, by topic and partition.
    pub uplink_expired: Mutex<BTreeMap<(String, i32), u64>>,
    /// Per local topic the uplink reads: the age of its oldest unreplicated record against the
    /// topic's `retention.ms`, refreshed by the uplink a few times a second.
    pub uplink_retention: Mutex<BTreeMap<String, RetentionUse>>,
    /// Dead letters written, by their kind (`decode-failed`, `too-large`, ...).
    pub rejected: Mutex<BTreeMap<String, u64>>,
    /// Failed spool appends and flushes, by reason (`disk-full`, `error`): each held frames
    /// un-acked for a retry.
    pub spool_write_failures: Mutex<BTreeMap<String, u64>>,
    /// The spool's figures, refreshed by the outbox about once a second.
    pub spool: Mutex<Option<SpoolStats>>,
    /// The disk budget's parts as last sampled (every 30 s, [`crate::disk::sampler`]).
    pub disk: Mutex<Vec<crate::disk::Sample>>,
    /// The outbox's delivery mode ([`Mode`]), see [`Stats::local_broker`].
    local_broker: AtomicU8,
    /// The outbox's mode changes, by (from, to) mode name.
    pub mode_changes: Mutex<BTreeMap<(&'static str, &'static str), u64>>,
    /// The outbox's pacing, copied from its delivery state every tick: drained records allowed
    /// in flight, the drain's pause after a timeout (ms), the dwell before a change towards
    /// sending more (ms), and deliveries that timed out while the broker answered.
    pub drain_window: AtomicU64,
    pub drain_pause_ms: AtomicU64,
    pub mode_dwell_ms: AtomicU64,
    pub slow_timeouts: AtomicU64,
    /// Whether the MQTT session is up (CONNACK seen, no error since).
    pub mqtt_connected: AtomicBool,
    /// MQTT deliveries received and not yet acknowledged (`fovea_mqtt_inflight`), and when one
    /// was last acknowledged: the health check's view of a wedged ingress.
    pub mqtt_held: Arc<crate::job::HeldAcks>,
    /// What the ingress is waiting for, if anything ([`IngressWait`]).
    pub ingress_wait: AtomicU8,
    /// Chunks stored and acked, QoS 0 frames dropped because the inference queue was full,
    /// cameras known now, and cameras forgotten after being idle.
    pub chunks_stored: AtomicU64,
    pub qos0_dropped: AtomicU64,
    /// QoS 1 deliveries shed beyond `mqtt.max_in_flight` (redelivered on a new session).
    pub mqtt_shed: AtomicU64,
    /// QoS 1 deliveries whose payload waited on disk (over the memory budget), and the bytes
    /// spilled now.
    pub mqtt_spilled: AtomicU64,
    pub mqtt_spill_bytes: AtomicU64,
    pub cameras_known: AtomicU64,
    pub cameras_evicted: AtomicU64,
    /// What each stage is doing, for the watchdog and `/healthz`.
    pub liveness: Liveness,
    histograms: [Histogram; STAGES.len()],
    /// ONNX Runtime time per model (one frame, one model).
    per_model: Mutex<BTreeMap<String, Arc<Histogram>>>,
    samples: [Mutex<Ring>; STAGES.len()],
}

/// What the ingress's dispatcher waits for, as `Stats::ingress_wait` holds it: the health check
/// names it when deliveries are held and none acknowledged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum IngressWait {
    Nothing = 0,
    /// A place in the inference queue (`inference.queue_capacity`): the workers are behind.
    Workers = 1,
    /// A large-frame permit (`large_frames.max_in_flight`): large frames are not yet durable.
    LargeFrame = 2,
    /// The chunk store's write (`<state_dir>/chunks`).
    ChunkStore = 3,
}

impl IngressWait {
    pub fn describe(self) -> &'static str {
        match self {
            IngressWait::Nothing => "the ingress waits for nothing",
            IngressWait::Workers => {
                "the ingress waits for a place in the inference queue (workers behind)"
            }
            IngressWait::LargeFrame => {
                "the ingress waits for a large-frame permit (large_frames.max_in_flight frames not yet durable)"
            }
            IngressWait::ChunkStore => "the ingress waits for the chunk store to write",
        }
    }

    fn from_u8(v: u8) -> IngressWait {
        match v {
            1 => IngressWait::Workers,
            2 => IngressWait::LargeFrame,
            3 => IngressWait::ChunkStore,
            _ => IngressWait::Nothing,
        }
    }
}

#[derive(Debug, Default)]
struct Ring {
    values_us: Vec<u32>,
    next: usize,
}

impl Stats {
    pub fn set_ingress_wait(&self, wait: IngressWait) {
        self.ingress_wait.store(wait as u8, Ordering::Relaxed);
    }

    pub fn ingress_wait(&self) -> IngressWait {
        IngressWait::from_u8(self.ingress_wait.load(Ordering::Relaxed))
    }

    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record(&self, stage: Stage, d: Duration) {
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        let idx = stage.index();
        self.histograms[idx].observe(d);
        if let Ok(mut ring) = self.samples[idx].lock() {
            if ring.values_us.len() < MAX_SAMPLES {
                ring.values_us.push(us);
            } else {
                let i = ring.next;
                ring.values_us[i] = us;
                ring.next = (i + 1) % MAX_SAMPLES;
            }
        }
    }

    /// The q-quantile (0..=1) of a stage's recorded latencies, or None without samples.
    pub fn quantile(&self, stage: Stage, q: f64) -> Option<Duration> {
        let mut v = self.samples[stage.index()].lock().ok()?.values_us.clone();
        if v.is_empty() {
            return None;
        }
        v.sort_unstable();
        let rank = ((v.len() - 1) as f64 * q.clamp(0.0, 1.0)).round() as usize;
        Some(Duration::from_micros(v[rank] as u64))
    }

    pub fn get(counter: &AtomicU64) -> u64 {
        counter.load(Ordering::Relaxed)
    }

    /// The counter of records of `class` the local broker acknowledged (straight or drained).
    pub fn delivered(&self, class: Class) -> &AtomicU64 {
        match class {
            Class::Frame => &self.frames_out,
            Class::Result => &self.results_out,
            Class::DeadLetter => &self.dead_letters,
        }
    }

    pub fn histogram(&self, stage: Stage) -> &Histogram {
        &self.histograms[stage.index()]
    }

    /// Records one model's inference time on one frame.
    pub fn record_model(&self, model: &str, d: Duration) {
        let h = {
            let Ok(mut map) = self.per_model.lock() else {
                return;
            };
            map.entry(model.to_string()).or_default().clone()
        };
        h.observe(d);
    }

    /// Per-model inference histograms, by model name.
    pub fn model_histograms(&self) -> Vec<(String, Arc<Histogram>)> {
        self.per_model
            .lock()
            .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
            .unwrap_or_default()
    }

    /// Counts a record of `class` the local broker refused for good.
    pub fn refuse(&self, class: Class) {
        Stats::incr(&self.refused[class_index(class)]);
    }

    /// Records refused for good, by class.
    pub fn refused(&self) -> [(Class, u64); 3] {
        [Class::Frame, Class::Result, Class::DeadLetter]
            .map(|c| (c, Stats::get(&self.refused[class_index(c)])))
    }

    /// Counts a dead letter of `kind`.
    pub fn reject(&self, kind: &str) {
        if let Ok(mut map) = self.rejected.lock() {
            *map.entry(kind.to_string()).or_default() += 1;
        }
    }

    /// Counts a failed spool write (`disk-full` or `error`).
    pub fn spool_write_failure(&self, reason: &str) {
        if let Ok(mut map) = self.spool_write_failures.lock() {
            *map.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// Counts an uplink record refused for good, for `reason`.
    pub fn uplink_refuse(&self, reason: &str) {
        if let Ok(mut map) = self.uplink_refused.lock() {
            *map.entry(reason.to_string()).or_default() += 1;
        }
    }

    /// Counts `records` of `topic/partition` that expired before the uplink replicated them.
    pub fn uplink_expire(&self, topic: &str, partition: i32, records: u64) {
        if let Ok(mut map) = self.uplink_expired.lock() {
            *map.entry((topic.to_string(), partition)).or_default() += records;
        }
    }

    pub fn set_local_broker(&self, mode: Mode) {
        let code = match mode {
            Mode::Online => 1,
            Mode::Slow => 2,
            Mode::Offline => 3,
            Mode::CatchUp => 4,
        };
        self.local_broker.store(code, Ordering::Relaxed);
    }

    /// Counts a change of the outbox's mode.
    pub fn mode_changed(&self, from: Mode, to: Mode) {
        if let Ok(mut map) = self.mode_changes.lock() {
            *map.entry((from.name(), to.name())).or_default() += 1;
        }
    }

    /// Copies the outbox's pacing out for the metrics endpoint.
    pub fn set_pacing(&self, window: usize, pause: Duration, dwell: Duration, slow_timeouts: u64) {
        let ms = |d: Duration| d.as_millis().min(u64::MAX as u128) as u64;
        self.drain_window.store(window as u64, Ordering::Relaxed);
        self.drain_pause_ms.store(ms(pause), Ordering::Relaxed);
        self.mode_dwell_ms.store(ms(dwell), Ordering::Relaxed);
        self.slow_timeouts.store(slow_timeouts, Ordering::Relaxed);
    }

    /// The outbox's delivery mode, or None before the outbox started.
    pub fn local_broker(&self) -> Option<Mode> {
        match self.local_broker.load(Ordering::Relaxed) {
            1 => Some(Mode::Online),
            2 => Some(Mode::Slow),
            3 => Some(Mode::Offline),
            4 => Some(Mode::CatchUp),
            _ => None,
        }
    }
}

fn class_index(class: Class) -> usize {
    match class {
        Class::Frame => 0,
        Class::Result => 1,
        Class::DeadLetter => 2,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantiles_of_recorded_samples() {
        let s = Stats::default();
        assert_eq!(s.quantile(Stage::Queue, 0.5), None);
        for ms in 1..=100 {
            s.record(Stage::Queue, Duration::from_millis(ms));
        }
        let p50 = s.quantile(Stage::Queue, 0.5).unwrap();
        assert!((50..=51).contains(&p50.as_millis()), "{p50:?}");
        assert_eq!(s.quantile(Stage::Queue, 0.99).unwrap().as_millis(), 99);
        assert_eq!(s.quantile(Stage::Total, 0.5), None);
    }

    #[test]
    fn ring_stays_bounded() {
        let s = Stats::default();
        for _ in 0..(MAX_SAMPLES + 10) {
            s.record(Stage::Kafka, Duration::from_micros(5));
        }
        s.record(Stage::Kafka, Duration::from_micros(7));
        assert_eq!(s.samples[2].lock().unwrap().values_us.len(), MAX_SAMPLES);
        assert_eq!(s.histogram(Stage::Kafka).count(), MAX_SAMPLES as u64 + 11);
    }

    #[test]
    fn local_broker_mode_round_trips() {
        let s = Stats::default();
        assert_eq!(s.local_broker(), None);
        for mode in [Mode::Online, Mode::Slow, Mode::Offline, Mode::CatchUp] {
            s.set_local_broker(mode);
            assert_eq!(s.local_broker(), Some(mode));
        }
    }
}
