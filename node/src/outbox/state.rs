//! The outbox's delivery mode, as an explicit state machine: where does a record go next, straight
//! to the broker or into the spool? Pure logic, one test per transition.
//!
//! ```text
//!            inflight above            inflight below
//!   Online ----------------> Slow ----------------------+
//!     ^  \                    |                         v
//!     |   \ delivery failed   | delivery failed      CatchUp --- drain failed ---> Offline
//!     |    +-------------> Offline <--------------------+  ^                          |
//!     |                                                      |      probe succeeded     |
//!     +------------------- spool drained ---------- CatchUp  +--------------------------+
//! ```
//! - **Online**: the broker takes records promptly; the spool is empty. Records go straight to the
//!   producer and a frame is acked when the broker acked its records.
//! - **Slow**: the broker is reachable but more than `spool.slow_inflight_bytes` wait for its
//!   acknowledgement, or a record sent straight was not acknowledged within
//!   `spool.divert_after_ms` while the broker still answers. New records go to the spool (bounded
//!   memory, prompt acks); in-flight ones finish.
//! - **Offline**: a delivery failed, a probe made after a timeout failed, or the broker was never
//!   reached. Records go to the spool; a probe checks the broker every `spool.probe_interval_ms`.
//! - **CatchUp**: the broker is back; the spool drains oldest first while new records join its
//!   tail (so each camera's records stay in order). When it is empty the outbox is Online again.
//!   A drained record that times out while the broker answers does not leave CatchUp: the drain
//!   backs off instead (`outbox/pace.rs`).
//!
//! *Slow is not away*: a timeout alone does not say which. librdkafka reports a record it could
//! not deliver in time the same way whether the broker is gone or merely slow, so a timeout moves
//! the outbox at most to Slow (it keeps CatchUp); a failed probe, or a refusal, makes it Offline.
//! Changes towards sending more (to CatchUp, to Online) wait out a dwell that grows after each
//! oscillation (`outbox/dwell.rs`); changes towards the spool are never held back.
//!
//! The node starts Offline: the first successful probe also creates the topics, so a node whose
//! broker is down at start still takes frames.

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Online,
    Slow,
    Offline,
    CatchUp,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Event {
    /// A record sent to the broker was refused retriably (not a timeout).
    DeliveryFailed,
    /// A record was not acknowledged within `spool.divert_after_ms`: the broker is slow, or away
    /// (a probe tells which).
    DeliveryTimedOut,
    /// A probe made while Slow or catching up (to check a timeout) found no broker.
    ProbeFailed,
    /// Unacknowledged bytes at the producer crossed `slow_inflight_bytes`.
    InflightAbove,
    /// Unacknowledged bytes fell below half of `slow_inflight_bytes`.
    InflightBelow,
    /// The broker answered a probe (and the topics exist).
    ProbeSucceeded,
    /// The spool is empty and nothing drained is still in flight.
    SpoolDrained,
}

impl Mode {
    /// Whether new records go to the spool rather than straight to the producer.
    pub fn spools(self) -> bool {
        self != Mode::Online
    }

    /// Whether the spool is being drained to the broker.
    pub fn drains(self) -> bool {
        self == Mode::CatchUp
    }

    pub fn next(self, event: Event) -> Mode {
        use {Event::*, Mode::*};
        match (self, event) {
            (Online | Slow | CatchUp, DeliveryFailed) => Offline,
            (Slow | CatchUp, ProbeFailed) => Offline,
            (Online, InflightAbove | DeliveryTimedOut) => Slow,
            (Slow, InflightBelow) => CatchUp,
            (Offline, ProbeSucceeded) => CatchUp,
            (CatchUp, SpoolDrained) => Online,
            (mode, _) => mode,
        }
    }

    /// Whether going from `self` to `to` sends more to the broker (and is therefore held back by
    /// the dwell): towards CatchUp or Online.
    pub fn relaxes_to(self, to: Mode) -> bool {
        self != to && matches!(to, Mode::CatchUp | Mode::Online)
    }

    pub fn name(self) -> &'static str {
        match self {
            Mode::Online => "online",
            Mode::Slow => "slow",
            Mode::Offline => "offline",
            Mode::CatchUp => "catch-up",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Event::*, Mode::*};

    #[test]
    fn online_goes_offline_when_a_delivery_fails() {
        assert_eq!(Online.next(DeliveryFailed), Offline);
    }

    #[test]
    fn online_goes_slow_when_too_much_waits_for_the_broker() {
        assert_eq!(Online.next(InflightAbove), Slow);
    }

    #[test]
    fn slow_catches_up_when_the_broker_keeps_up_again() {
        assert_eq!(Slow.next(InflightBelow), CatchUp);
    }

    #[test]
    fn slow_goes_offline_when_a_delivery_fails() {
        assert_eq!(Slow.next(DeliveryFailed), Offline);
    }

    #[test]
    fn offline_catches_up_when_the_probe_succeeds() {
        assert_eq!(Offline.next(ProbeSucceeded), CatchUp);
    }

    #[test]
    fn catch_up_goes_online_when_the_spool_is_drained() {
        assert_eq!(CatchUp.next(SpoolDrained), Online);
    }

    #[test]
    fn catch_up_goes_offline_when_a_drained_record_fails() {
        assert_eq!(CatchUp.next(DeliveryFailed), Offline);
    }

    #[test]
    fn a_timeout_online_turns_slow_not_offline() {
        assert_eq!(Online.next(DeliveryTimedOut), Slow);
    }

    #[test]
    fn a_timeout_while_slow_or_catching_up_keeps_the_mode() {
        assert_eq!(Slow.next(DeliveryTimedOut), Slow);
        assert_eq!(CatchUp.next(DeliveryTimedOut), CatchUp);
        assert_eq!(Offline.next(DeliveryTimedOut), Offline);
    }

    #[test]
    fn a_failed_probe_while_slow_or_catching_up_goes_offline() {
        assert_eq!(Slow.next(ProbeFailed), Offline);
        assert_eq!(CatchUp.next(ProbeFailed), Offline);
        assert_eq!(Online.next(ProbeFailed), Online);
    }

    #[test]
    fn only_changes_towards_sending_more_relax() {
        assert!(
            Offline.relaxes_to(CatchUp) && Slow.relaxes_to(CatchUp) && CatchUp.relaxes_to(Online)
        );
        assert!(
            !Online.relaxes_to(Slow) && !CatchUp.relaxes_to(Offline) && !Online.relaxes_to(Online)
        );
    }

    #[test]
    fn other_events_change_nothing() {
        for mode in [Online, Slow, Offline, CatchUp] {
            for event in [
                DeliveryFailed,
                DeliveryTimedOut,
                ProbeFailed,
                InflightAbove,
                InflightBelow,
                ProbeSucceeded,
                SpoolDrained,
            ] {
                let expected = match (mode, event) {
                    (Online | Slow | CatchUp, DeliveryFailed) => continue,
                    (Slow | CatchUp, ProbeFailed) => continue,
                    (Online, InflightAbove | DeliveryTimedOut) | (Slow, InflightBelow) => continue,
                    (Offline, ProbeSucceeded) | (CatchUp, SpoolDrained) => continue,
                    _ => mode,
                };
                assert_eq!(mode.next(event), expected, "{mode:?} + {event:?}");
            }
        }
    }

    #[test]
    fn only_online_sends_straight_and_only_catch_up_drains() {
        assert!(!Online.spools() && Slow.spools() && Offline.spools() && CatchUp.spools());
        assert!(CatchUp.drains() && !Online.drains() && !Slow.drains() && !Offline.drains());
    }
}
