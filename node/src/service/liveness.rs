//! Is the pipeline making progress? The answer feeds systemd's watchdog and `/healthz`.
//!
//! A bare timer would keep a wedged node alive, so each stage reports what it is doing: a worker
//! marks when it took its current frame and when it finished it, and the outbox marks every turn
//! of its loop (which turns at least every 20 ms, busy or idle). The node is stalled when a worker
//! has spent longer than the limit on one frame, or the outbox has not turned for that long. Idle
//! stages are not stalled: no frames is not a fault. Waiting for the MQTT broker or the queue is
//! not work either, so the ingress is judged by readiness (connected or not), not here. If the
//! async runtime itself is wedged, the watchdog task that asks this question does not run, and
//! systemd hears nothing either.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Worker slots tracked: the config allows at most this many workers.
pub const MAX_WORKERS: usize = 64;

#[derive(Debug)]
pub struct Liveness {
    epoch: Instant,
    /// Per worker: 1 + milliseconds since `epoch` at which its current frame started; 0 = idle.
    workers: Vec<AtomicU64>,
    /// 1 + milliseconds since `epoch` of the outbox loop's last turn; 0 = not running.
    outbox_turn: AtomicU64,
    /// Set once the pipeline takes frames (models loaded, spool open, ingress started).
    started: AtomicBool,
}

impl Default for Liveness {
    fn default() -> Self {
        Liveness {
            epoch: Instant::now(),
            workers: (0..MAX_WORKERS).map(|_| AtomicU64::new(0)).collect(),
            outbox_turn: AtomicU64::new(0),
            started: AtomicBool::new(false),
        }
    }
}

impl Liveness {
    fn stamp(&self, at: Instant) -> u64 {
        1 + at.saturating_duration_since(self.epoch).as_millis() as u64
    }

    fn age(&self, stamp: u64, now: Instant) -> Duration {
        now.saturating_duration_since(self.epoch + Duration::from_millis(stamp - 1))
    }

    /// Worker `slot` took a frame.
    pub fn worker_busy(&self, slot: usize) {
        if let Some(w) = self.workers.get(slot) {
            w.store(self.stamp(Instant::now()), Ordering::Relaxed);
        }
    }

    /// Worker `slot` finished its frame.
    pub fn worker_idle(&self, slot: usize) {
        if let Some(w) = self.workers.get(slot) {
            w.store(0, Ordering::Relaxed);
        }
    }

    /// The outbox loop turned.
    pub fn outbox_turned(&self) {
        self.outbox_turn
            .store(self.stamp(Instant::now()), Ordering::Relaxed);
    }

    /// The outbox loop ended (shutdown): it is no longer expected to turn.
    pub fn outbox_stopped(&self) {
        self.outbox_turn.store(0, Ordering::Relaxed);
    }

    pub fn set_started(&self) {
        self.started.store(true, Ordering::Relaxed);
    }

    pub fn started(&self) -> bool {
        self.started.load(Ordering::Relaxed)
    }

    /// Why the pipeline is stalled at `now`, if it is: the first stage stuck for more than `limit`.
    pub fn stalled(&self, limit: Duration, now: Instant) -> Option<String> {
        for (slot, w) in self.workers.iter().enumerate() {
            let since = w.load(Ordering::Relaxed);
            if since != 0 && self.age(since, now) > limit {
                return Some(format!(
                    "inference worker {slot} has been on one frame for {:.1} s",
                    self.age(since, now).as_secs_f64()
                ));
            }
        }
        let turn = self.outbox_turn.load(Ordering::Relaxed);
        if turn != 0 && self.age(turn, now) > limit {
            return Some(format!(
                "the outbox has not turned for {:.1} s",
                self.age(turn, now).as_secs_f64()
            ));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const LIMIT: Duration = Duration::from_secs(10);

    #[test]
    fn idle_pipeline_is_not_stalled() {
        let l = Liveness::default();
        assert_eq!(l.stalled(LIMIT, Instant::now() + LIMIT * 100), None);
    }

    #[test]
    fn worker_stuck_on_one_frame_is_stalled_until_it_finishes() {
        let l = Liveness::default();
        l.worker_busy(3);
        let now = Instant::now();
        assert_eq!(l.stalled(LIMIT, now + LIMIT / 2), None);
        let why = l.stalled(LIMIT, now + LIMIT * 2).expect("stalled");
        assert!(why.contains("worker 3"), "{why}");
        l.worker_idle(3);
        assert_eq!(l.stalled(LIMIT, now + LIMIT * 2), None);
    }

    #[test]
    fn outbox_that_stops_turning_is_stalled_unless_it_stopped() {
        let l = Liveness::default();
        l.outbox_turned();
        let now = Instant::now();
        assert_eq!(l.stalled(LIMIT, now + LIMIT / 2), None);
        assert!(
            l.stalled(LIMIT, now + LIMIT * 2)
                .unwrap()
                .contains("outbox")
        );
        l.outbox_turned();
        assert_eq!(l.stalled(LIMIT, Instant::now()), None);
        l.outbox_stopped();
        assert_eq!(l.stalled(LIMIT, now + LIMIT * 100), None);
    }

    #[test]
    fn slots_beyond_the_maximum_are_ignored() {
        let l = Liveness::default();
        l.worker_busy(MAX_WORKERS + 1);
        l.worker_idle(MAX_WORKERS + 1);
        assert_eq!(l.stalled(LIMIT, Instant::now() + LIMIT * 2), None);
    }
}
