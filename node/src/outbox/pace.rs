//! How many spooled records the drain keeps in flight, and when it may hand out more: AIMD on
//! the drain window, as TCP does with its congestion window, with a pause that grows on repeated
//! timeouts.
//!
//! A drained record that times out while the broker still answers means the broker cannot take
//! that much at once (a big SQLite database, a slow disk): the window halves (once per flight:
//! the records of one flight time out together and say the same thing) and the drain pauses for
//! an exponential, jittered delay ([`Backoff`], the ingress's reconnect delays) so the broker can
//! work off what it holds. Each full window of acknowledgements widens the window by one and
//! resets the pause. So the spool keeps draining, at the rate the broker can take, instead of the
//! outbox flipping between catch-up and offline. Pure: time is passed in.

use crate::ingress::backoff::Backoff;
use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Pace {
    max: usize,
    window: usize,
    /// Acknowledgements since the window last changed.
    acked: usize,
    backoff: Backoff,
    resume_at: Option<Instant>,
    /// Records handed out so far (each drained record remembers its number).
    sends: u64,
    /// Records handed out up to the last cut: their timeouts belong to the flight already cut.
    cut_mark: u64,
    last_timeout: Option<Instant>,
    timeouts: u64,
}

impl Pace {
    pub fn new(max: usize, pause_min: Duration, pause_max: Duration) -> Pace {
        let max = max.max(1);
        Pace {
            max,
            window: max,
            acked: 0,
            backoff: Backoff::new(pause_min, pause_max),
            resume_at: None,
            sends: 0,
            cut_mark: 0,
            last_timeout: None,
            timeouts: 0,
        }
    }

    /// Drained records allowed in flight at once.
    pub fn window(&self) -> usize {
        self.window
    }

    /// How long the drain still waits at `now` (zero when it may go on).
    pub fn pause(&self, now: Instant) -> Duration {
        self.resume_at
            .map_or(Duration::ZERO, |t| t.saturating_duration_since(now))
    }

    /// Drained records that timed out so far.
    pub fn timeouts(&self) -> u64 {
        self.timeouts
    }

    /// When a drained record last timed out.
    pub fn last_timeout(&self) -> Option<Instant> {
        self.last_timeout
    }

    /// Records that may be handed out at `now`, with `in_flight` still unanswered.
    pub fn room(&self, in_flight: usize, now: Instant) -> usize {
        if self.pause(now) > Duration::ZERO {
            return 0;
        }
        self.window.saturating_sub(in_flight)
    }

    /// A record is handed out: its number, for [`Pace::timed_out`].
    pub fn sent(&mut self) -> u64 {
        self.sends += 1;
        self.sends
    }

    /// A drained record was acknowledged.
    pub fn acked(&mut self) {
        self.acked += 1;
        if self.acked >= self.window {
            self.acked = 0;
            self.window = (self.window + 1).min(self.max);
            self.backoff.reset();
        }
    }

    /// Drained record number `sent` timed out at `now`. Returns whether the window was cut (the
    /// first timeout of its flight).
    pub fn timed_out(&mut self, sent: u64, now: Instant) -> bool {
        self.timeouts += 1;
        self.last_timeout = Some(now);
        if sent <= self.cut_mark {
            return false;
        }
        self.cut_mark = self.sends;
        self.window = (self.window / 2).max(1);
        self.acked = 0;
        self.resume_at = Some(now + self.backoff.next_delay());
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MS: Duration = Duration::from_millis(1);

    fn pace() -> Pace {
        Pace::new(16, 100 * MS, 1000 * MS)
    }

    #[test]
    fn starts_with_the_full_window_and_no_pause() {
        let p = pace();
        let now = Instant::now();
        assert_eq!(p.window(), 16);
        assert_eq!(p.room(10, now), 6);
        assert_eq!(p.pause(now), Duration::ZERO);
    }

    #[test]
    fn a_timeout_halves_the_window_once_per_flight_and_pauses() {
        let mut p = pace();
        let now = Instant::now();
        let first: Vec<u64> = (0..16).map(|_| p.sent()).collect();
        assert!(p.timed_out(first[3], now));
        // The rest of that flight times out too: one cut is enough.
        for &n in &first[4..] {
            assert!(!p.timed_out(n, now));
        }
        assert_eq!(p.window(), 8);
        assert_eq!(p.timeouts(), 13);
        assert_eq!(p.room(0, now), 0, "paused");
        assert!(p.pause(now) >= 100 * MS);
        assert_eq!(p.room(0, now + 100 * MS), 8);
        // A record of the next flight times out: cut again.
        let n = p.sent();
        assert!(p.timed_out(n, now + 200 * MS));
        assert_eq!(p.window(), 4);
    }

    #[test]
    fn repeated_timeouts_grow_the_pause_and_never_close_the_window() {
        let mut p = pace();
        let now = Instant::now();
        let mut pauses = Vec::new();
        for _ in 0..10 {
            let n = p.sent();
            p.timed_out(n, now);
            pauses.push(p.pause(now));
        }
        assert_eq!(p.window(), 1, "one record at a time still drains");
        assert!(pauses.iter().all(|d| *d >= 100 * MS && *d <= 1000 * MS));
        assert_eq!(pauses[0], 100 * MS, "the first pause is the shortest");
    }

    #[test]
    fn each_full_window_of_acknowledgements_widens_it_by_one_and_resets_the_pause() {
        let mut p = pace();
        let now = Instant::now();
        for _ in 0..4 {
            let n = p.sent();
            p.timed_out(n, now);
        }
        assert_eq!(p.window(), 1);
        p.acked();
        assert_eq!(p.window(), 2);
        p.acked();
        assert_eq!(p.window(), 2);
        p.acked();
        assert_eq!(p.window(), 3);
        for _ in 0..200 {
            p.acked();
        }
        assert_eq!(p.window(), 16, "capped at the configured window");
        let n = p.sent();
        p.timed_out(n, now);
        assert_eq!(p.pause(now), 100 * MS, "the pause started over");
    }
}
