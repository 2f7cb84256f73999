//! Reconnect delays: exponential with full jitter, so that a fleet of nodes that lost the same
//! broker does not come back in lock-step.

use rand::Rng;
use std::time::Duration;

#[derive(Debug, Clone)]
pub struct Backoff {
    min: Duration,
    max: Duration,
    attempt: u32,
}

impl Backoff {
    pub fn new(min: Duration, max: Duration) -> Self {
        Backoff {
            min,
            max: max.max(min),
            attempt: 0,
        }
    }

    /// The delay before the next attempt: uniformly random in [min, min * 2^attempt], capped at max.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .min
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        if ceiling <= self.min {
            return self.min;
        }
        rand::rng().random_range(self.min..=ceiling)
    }

    /// Called after a successful connection.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }

    pub fn attempts(&self) -> u32 {
        self.attempt
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_within_bounds_and_resets() {
        let (min, max) = (Duration::from_millis(100), Duration::from_secs(5));
        let mut b = Backoff::new(min, max);
        assert_eq!(b.next_delay(), min);
        let mut ceilings_hit = 0;
        for i in 1..30 {
            let d = b.next_delay();
            let ceiling = min.saturating_mul(1 << i.min(20)).min(max);
            assert!(d >= min && d <= ceiling, "attempt {i}: {d:?}");
            if d > min * 2 {
                ceilings_hit += 1;
            }
        }
        assert!(ceilings_hit > 0, "jittered delays never grew");
        b.reset();
        assert_eq!(b.attempts(), 0);
        assert_eq!(b.next_delay(), min);
    }
}
