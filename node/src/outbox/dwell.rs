//! The rate limit on the outbox's mode changes: a change towards sending more to the broker
//! (to CatchUp, to Online) waits until the current mode has lasted the dwell; a change towards
//! the spool (to Slow, to Offline) never waits, since it is what keeps frames acknowledged.
//!
//! Changes before the outbox first backed off are not held: a node starts Offline by
//! construction, not because its broker failed, and its way online (offline -> catch-up ->
//! online) would otherwise spool every frame for a dwell after each start.
//!
//! The dwell doubles (up to `max`) after each oscillation, i.e. when the outbox has to back off
//! again soon (within two dwells) after it relaxed: a broker that is slow under load should not
//! flip the outbox every few seconds. It falls back to `min` once a mode has lasted four dwells.
//! Pure: time is passed in.

use std::time::{Duration, Instant};

#[derive(Debug, Clone)]
pub struct Dwell {
    min: Duration,
    max: Duration,
    current: Duration,
    last_change: Option<Instant>,
    last_relax: Option<Instant>,
    /// A change towards the spool happened: from then on relaxing waits.
    backed_off: bool,
    oscillations: u64,
}

impl Dwell {
    pub fn new(min: Duration, max: Duration) -> Dwell {
        Dwell {
            min,
            max: max.max(min),
            current: min,
            last_change: None,
            last_relax: None,
            backed_off: false,
            oscillations: 0,
        }
    }

    /// The current dwell.
    pub fn current(&self) -> Duration {
        self.current
    }

    /// Oscillations seen so far (each doubled the dwell, up to its maximum).
    pub fn oscillations(&self) -> u64 {
        self.oscillations
    }

    /// Whether a change towards sending more may happen at `now`.
    pub fn may_relax(&self, now: Instant) -> bool {
        !self.backed_off
            || self
                .last_change
                .is_none_or(|t| now.saturating_duration_since(t) >= self.current)
    }

    /// Records a mode change at `now`; `relaxing`: towards sending more.
    pub fn changed(&mut self, now: Instant, relaxing: bool) {
        let lasted = self.last_change.map(|t| now.saturating_duration_since(t));
        if lasted.is_some_and(|d| d >= self.current * 4) {
            self.current = self.min;
        }
        let soon_after_relaxing = self
            .last_relax
            .is_some_and(|t| now.saturating_duration_since(t) < self.current * 2);
        if !relaxing && soon_after_relaxing {
            self.oscillations += 1;
            self.current = (self.current * 2).min(self.max);
        }
        if relaxing {
            self.last_relax = Some(now);
        } else {
            self.backed_off = true;
        }
        self.last_change = Some(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn relaxing_is_free_until_the_first_back_off_and_then_waits_the_dwell() {
        let t = Instant::now();
        let mut d = Dwell::new(2 * S, 60 * S);
        assert!(d.may_relax(t));
        d.changed(t, true); // offline -> catch-up at start
        assert!(d.may_relax(t), "catch-up -> online at start is not held");
        d.changed(t, true);
        d.changed(t + 10 * S, false); // online -> slow
        assert!(!d.may_relax(t + 11 * S));
        assert!(d.may_relax(t + 12 * S));
    }

    #[test]
    fn backing_off_soon_after_relaxing_doubles_the_dwell_up_to_its_maximum() {
        let t = Instant::now();
        let mut d = Dwell::new(2 * S, 10 * S);
        let mut at = t;
        let mut seen = Vec::new();
        for _ in 0..5 {
            d.changed(at, true); // e.g. catch-up -> online
            at += S;
            d.changed(at, false); // online -> slow, one second later: an oscillation
            seen.push(d.current().as_secs());
            at += d.current();
        }
        assert_eq!(seen, [4, 8, 10, 10, 10]);
        assert_eq!(d.oscillations(), 5);
        assert!(!d.may_relax(at - S));
    }

    #[test]
    fn backing_off_long_after_relaxing_is_no_oscillation() {
        let t = Instant::now();
        let mut d = Dwell::new(2 * S, 60 * S);
        d.changed(t, true);
        d.changed(t + 5 * S, false);
        assert_eq!(d.current(), 2 * S);
        assert_eq!(d.oscillations(), 0);
    }

    #[test]
    fn a_calm_spell_brings_the_dwell_back_to_its_minimum() {
        let t = Instant::now();
        let mut d = Dwell::new(2 * S, 60 * S);
        d.changed(t, true);
        d.changed(t + S, false);
        assert_eq!(d.current(), 4 * S);
        // The next mode lasted 16 s (four dwells): calm.
        d.changed(t + 17 * S, true);
        assert_eq!(d.current(), 2 * S);
    }
}
