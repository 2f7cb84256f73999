//! A fixed-bucket latency histogram with atomic counters, for the Prometheus endpoint.
//!
//! Prometheus histograms are cumulative per bucket; we count per bucket (one atomic add on the hot
//! path) and accumulate when rendering. Buckets are fixed for every stage so that dashboards can
//! compare stages and nodes; they span 1 ms (a small JPEG's inference) to 5 minutes (a record that
//! waited out a broker outage in the spool).

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Upper bounds of the buckets, in seconds (`+Inf` is implicit).
pub const BOUNDS: [f64; 16] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0,
];

#[derive(Debug, Default)]
pub struct Histogram {
    /// Observations per bucket; the last one is `+Inf`.
    buckets: [AtomicU64; BOUNDS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A consistent-enough copy for rendering (each field is read once).
#[derive(Debug, Clone, PartialEq)]
pub struct Snapshot {
    /// Cumulative counts per bound of [`BOUNDS`], then `+Inf` (= `count`).
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        let idx = BOUNDS
            .iter()
            .position(|b| secs <= *b)
            .unwrap_or(BOUNDS.len());
        self.buckets[idx].fetch_add(1, Ordering::Relaxed);
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_us.fetch_add(us, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    pub fn snapshot(&self) -> Snapshot {
        let mut running = 0;
        let cumulative: Vec<u64> = self
            .buckets
            .iter()
            .map(|b| {
                running += b.load(Ordering::Relaxed);
                running
            })
            .collect();
        Snapshot {
            // `count` is read from the buckets so that `+Inf` and `_count` agree.
            count: running,
            cumulative,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn observations_land_in_cumulative_buckets() {
        let h = Histogram::default();
        h.observe(Duration::from_micros(500)); // <= 1 ms
        h.observe(Duration::from_millis(1)); // on the bound: <= 1 ms
        h.observe(Duration::from_millis(20)); // <= 25 ms
        h.observe(Duration::from_secs(600)); // +Inf only
        let s = h.snapshot();
        assert_eq!(s.count, 4);
        assert_eq!(s.cumulative.len(), BOUNDS.len() + 1);
        assert_eq!(s.cumulative[0], 2);
        let b25 = BOUNDS.iter().position(|b| *b == 0.025).unwrap();
        assert_eq!(s.cumulative[b25 - 1], 2);
        assert_eq!(s.cumulative[b25], 3);
        assert_eq!(s.cumulative[BOUNDS.len() - 1], 3);
        assert_eq!(s.cumulative[BOUNDS.len()], 4);
        assert!((s.sum_seconds - 600.0215).abs() < 1e-6, "{}", s.sum_seconds);
    }

    #[test]
    fn empty_histogram_renders_zeros() {
        let s = Histogram::default().snapshot();
        assert_eq!(s.count, 0);
        assert!(s.cumulative.iter().all(|c| *c == 0));
    }
}
