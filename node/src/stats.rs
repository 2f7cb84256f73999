//! Counters and per-stage latencies of the pipeline, shared by every stage.
//!
//! Kept deliberately simple (atomics and a bounded sample buffer per stage) so that the hot path
//! pays a few nanoseconds; the benchmark and the end-of-run log read it. The Prometheus endpoint
//! (a later issue) will export the same numbers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
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
    /// MQTT arrival -> PUBACK sent (the whole path).
    Total,
}

pub const STAGES: [Stage; 4] = [Stage::Queue, Stage::Inference, Stage::Kafka, Stage::Total];

impl Stage {
    pub fn name(self) -> &'static str {
        match self {
            Stage::Queue => "queue",
            Stage::Inference => "inference",
            Stage::Kafka => "kafka",
            Stage::Total => "total",
        }
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
    /// Uplink: results and frames sent to the cloud, record bytes sent, frames not replicated.
    pub uplink_results: AtomicU64,
    pub uplink_frames: AtomicU64,
    pub uplink_bytes: AtomicU64,
    pub uplink_filtered: AtomicU64,
    /// Uplink records the cloud acknowledged.
    pub uplink_acked: AtomicU64,
    samples: [Mutex<Ring>; 4],
}

#[derive(Debug, Default)]
struct Ring {
    values_us: Vec<u32>,
    next: usize,
}

impl Stats {
    pub fn incr(counter: &AtomicU64) {
        counter.fetch_add(1, Ordering::Relaxed);
    }

    pub fn record(&self, stage: Stage, d: Duration) {
        let us = d.as_micros().min(u32::MAX as u128) as u32;
        let idx = STAGES.iter().position(|s| *s == stage).unwrap_or(0);
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
        let idx = STAGES.iter().position(|s| *s == stage)?;
        let mut v = self.samples[idx].lock().ok()?.values_us.clone();
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
    }
}
