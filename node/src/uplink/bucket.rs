//! Token bucket for the uplink's bandwidth cap on a metered link.
//!
//! The bucket holds up to `burst` bytes of credit and refills at `rate` bytes per second. Taking
//! more than the credit puts the bucket into debt and returns how long the caller must wait before
//! sending, rather than refusing: a record larger than the burst must still go (refusing it would
//! stall the partition forever), it just goes later, and the debt holds back the records after it
//! so the average stays at the rate.
//!
//! Pure and clock-injected: the caller passes `now`, so tests simulate minutes in microseconds.

use std::time::{Duration, Instant};

/// A bytes-per-second cap with a bounded burst.
#[derive(Debug, Clone)]
pub struct TokenBucket {
    /// Refill rate in bytes per second; 0 = unlimited.
    rate: f64,
    /// Most credit that can build up while idle: the largest burst sent at line speed.
    burst: f64,
    /// Current credit in bytes; negative while in debt (the caller is waiting for it to clear).
    tokens: f64,
    /// When `tokens` was last brought up to date; `None` until the first `take`.
    last: Option<Instant>,
}

impl TokenBucket {
    /// A bucket that starts full (`burst_bytes` of credit). `bytes_per_sec` 0 disables the cap.
    pub fn new(bytes_per_sec: u64, burst_bytes: u64) -> Self {
        Self {
            rate: bytes_per_sec as f64,
            burst: burst_bytes as f64,
            tokens: burst_bytes as f64,
            last: None,
        }
    }

    /// Charges `bytes` and returns how long to wait before sending them (zero if there was
    /// credit). Call once per record, then sleep the returned time; later calls account for the
    /// wait already owed. A clock that steps back counts as no time passing.
    pub fn take(&mut self, bytes: u64, now: Instant) -> Duration {
        if self.rate <= 0.0 {
            return Duration::ZERO;
        }
        if let Some(last) = self.last {
            let elapsed = now.saturating_duration_since(last).as_secs_f64();
            self.tokens = (self.tokens + elapsed * self.rate).min(self.burst);
        }
        // Never move `last` backwards, or a stepped-back clock would refill twice.
        self.last = Some(self.last.map_or(now, |last| last.max(now)));
        self.tokens -= bytes as f64;
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        let wait = -self.tokens / self.rate;
        // Huge debts at tiny rates: saturate instead of panicking.
        Duration::try_from_secs_f64(wait).unwrap_or(Duration::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic record sizes between 1 and `max` bytes (xorshift; no dependency).
    fn sizes(max: u64) -> impl Iterator<Item = u64> {
        let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
        std::iter::repeat_with(move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state % max + 1
        })
    }

    /// A sender that always has a record ready: sends each as soon as the bucket allows, for
    /// `secs` simulated seconds. Returns (send time, bytes) of every record.
    fn saturate(bucket: &mut TokenBucket, max_record: u64, secs: u64) -> Vec<(Duration, u64)> {
        let start = Instant::now();
        let end = Duration::from_secs(secs);
        let mut clock = Duration::ZERO;
        let mut sent = Vec::new();
        for size in sizes(max_record) {
            clock += bucket.take(size, start + clock);
            if clock >= end {
                break;
            }
            sent.push((clock, size));
        }
        sent
    }

    /// Most bytes sent within any `window` (sliding over the send times).
    fn max_in_window(sent: &[(Duration, u64)], window: Duration) -> u64 {
        let (mut lo, mut sum, mut best) = (0, 0, 0);
        for &(t, bytes) in sent {
            sum += bytes;
            while t - sent[lo].0 > window {
                sum -= sent[lo].1;
                lo += 1;
            }
            best = best.max(sum);
        }
        best
    }

    #[test]
    fn average_stays_within_two_percent_over_30_seconds() {
        let rate = 100_000;
        let mut bucket = TokenBucket::new(rate, 20_000);
        let sent = saturate(&mut bucket, 16_000, 30);
        let total: u64 = sent.iter().map(|s| s.1).sum();
        let average = total as f64 / 30.0;
        let error = (average - rate as f64).abs() / rate as f64;
        assert!(
            error < 0.02,
            "average {average:.0} B/s, {:.2}% off",
            error * 100.0
        );
        assert!(sent.len() > 300, "only {} records", sent.len());
    }

    #[test]
    fn bursts_are_bounded_by_burst_plus_rate() {
        let (rate, burst) = (50_000, 10_000);
        let mut bucket = TokenBucket::new(rate, burst);
        let sent = saturate(&mut bucket, burst, 30);
        for ms in [0, 1, 10, 100, 1000, 5000] {
            let window = Duration::from_millis(ms);
            let most = max_in_window(&sent, window);
            let bound = burst as f64 + rate as f64 * window.as_secs_f64();
            assert!(
                most as f64 <= bound + 1.0,
                "{most} bytes in {ms} ms > {bound}"
            );
        }
        // The first burst does go out at once.
        assert!(max_in_window(&sent, Duration::ZERO) > burst / 2);
    }

    #[test]
    fn idle_credit_is_capped_at_the_burst() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1_000, 5_000);
        assert_eq!(bucket.take(5_000, t0), Duration::ZERO);
        // An hour idle refills only up to the burst.
        let later = t0 + Duration::from_secs(3600);
        assert_eq!(bucket.take(5_000, later), Duration::ZERO);
        assert_eq!(bucket.take(1_000, later), Duration::from_secs(1));
    }

    #[test]
    fn a_record_larger_than_the_burst_goes_later_and_holds_back_the_next() {
        let t0 = Instant::now();
        let mut bucket = TokenBucket::new(1_000, 2_000);
        // 2,000 of credit, 10,000 asked: 8 s of debt.
        assert_eq!(bucket.take(10_000, t0), Duration::from_secs(8));
        // Sent at t0+8 s; the next 1,000 bytes wait another second.
        let sent_at = t0 + Duration::from_secs(8);
        assert_eq!(bucket.take(1_000, sent_at), Duration::from_secs(1));
        // A caller that asks again early waits for the whole debt.
        assert_eq!(bucket.take(500, sent_at), Duration::from_millis(1_500));
    }

    #[test]
    fn zero_rate_is_unlimited() {
        let mut bucket = TokenBucket::new(0, 0);
        let t0 = Instant::now();
        for _ in 0..1000 {
            assert_eq!(bucket.take(u64::MAX, t0), Duration::ZERO);
        }
    }

    #[test]
    fn zero_burst_paces_every_record() {
        let mut bucket = TokenBucket::new(1_000, 0);
        let t0 = Instant::now();
        assert_eq!(bucket.take(250, t0), Duration::from_millis(250));
        let t1 = t0 + Duration::from_millis(250);
        assert_eq!(bucket.take(250, t1), Duration::from_millis(250));
    }

    #[test]
    fn clock_stepping_back_and_huge_debts_do_not_panic() {
        let t0 = Instant::now() + Duration::from_secs(100);
        let mut bucket = TokenBucket::new(1, 0);
        assert_eq!(bucket.take(10, t0), Duration::from_secs(10));
        // Going back in time gives no credit: 10 s of debt plus 10 more.
        assert_eq!(
            bucket.take(10, t0 - Duration::from_secs(50)),
            Duration::from_secs(20)
        );
        assert!(bucket.take(u64::MAX, t0) > Duration::from_secs(u64::MAX / 2));
    }
}
