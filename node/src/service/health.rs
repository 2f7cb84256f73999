//! What `/healthz` and `/readyz` answer, and what the watchdog and `STATUS=` say.
//!
//! - Healthy (live): no stage is stalled (see [`super::liveness`]). Unhealthy means "restart me":
//!   the watchdog stops, systemd restarts the node.
//! - Ready: healthy, taking frames, connected to the MQTT broker, and the local Kafka broker
//!   reachable. Not ready is not fatal: a node whose broker is away still takes frames into the
//!   spool, but someone should look. The cloud link is reported, never required: the uplink
//!   catches up when the cloud is back.
//! - Held deliveries: the MQTT broker sends fovea at most its in-flight window of deliveries
//!   un-acked; if fovea holds some and acknowledges none for `stall_after`, nothing more reaches
//!   it, whatever the cause (a lost ack, a stage waiting forever). With the local broker online
//!   that is a wedge: unhealthy, naming what the ingress waits for, and the watchdog restarts
//!   the node (the held deliveries are redelivered). With the local broker away or slow, acks
//!   wait for the spool, which is back-pressure with a known cause: not ready, but a restart
//!   would not help, so it stays healthy.
//! - Warnings: lines marked `warn` say that something will go wrong if nobody acts, while the node
//!   still does its job. The uplink warns when the oldest unreplicated record of a local topic has
//!   used `uplink.retention_warn_share` of the topic's `retention.ms`: the local broker is about
//!   to delete records the cloud does not have. That keeps the node ready (status 200): it still
//!   takes frames, and taking it out of service would lose frames without bringing the cloud
//!   back; the warning is for whoever reads `/readyz`, and the ratio is on `/metrics` to alert on.

use crate::outbox::state::Mode;
use crate::stats::Stats;
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

#[derive(Clone)]
pub struct Health {
    pub stats: Arc<Stats>,
    pub stall_after: Duration,
    pub uplink_enabled: bool,
    /// `uplink.retention_warn_share`: the share of a topic's retention the oldest unreplicated
    /// record may reach before a warning.
    pub retention_warn_share: f64,
}

/// One line of the readiness report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Check {
    pub name: &'static str,
    /// Whether readiness depends on it and it holds. Informational lines are always ok.
    pub ok: bool,
    /// Ok for readiness, but someone should act (shown as `warn`).
    pub warn: bool,
    pub detail: String,
}

impl Health {
    /// Ok, or why the node is stalled.
    pub fn live(&self) -> Result<(), String> {
        let now = Instant::now();
        if let Some(why) = self.stats.liveness.stalled(self.stall_after, now) {
            return Err(why);
        }
        match self.held_stuck(now) {
            Some((true, why)) => Err(why),
            _ => Ok(()),
        }
    }

    /// MQTT deliveries held with none acknowledged for longer than `stall_after`: whether that
    /// is a wedge (the local broker is online, so nothing outside explains it) and what it is.
    fn held_stuck(&self, now: Instant) -> Option<(bool, String)> {
        let s = &self.stats;
        let stuck = s.mqtt_held.stuck_for(now)?;
        if stuck <= self.stall_after {
            return None;
        }
        let held = format!(
            "{} MQTT deliveries held un-acked and none acknowledged for {:.0} s, so the broker sends no more",
            s.mqtt_held.count(),
            stuck.as_secs_f64()
        );
        match s.local_broker() {
            Some(Mode::Online) | None => {
                Some((true, format!("{held}; {}", s.ingress_wait().describe())))
            }
            Some(mode) => Some((
                false,
                format!(
                    "{held}: the local broker is {} and the spool holds them back",
                    mode.name()
                ),
            )),
        }
    }

    pub fn checks(&self) -> Vec<Check> {
        let s = &self.stats;
        let mut checks = Vec::new();
        let (ok, detail) = match (s.liveness.started(), self.live()) {
            (_, Err(why)) => (false, format!("stalled: {why}")),
            (false, Ok(())) => (false, "starting".to_string()),
            (true, Ok(())) => (true, "taking frames".to_string()),
        };
        checks.push(Check {
            name: "pipeline",
            ok,
            warn: false,
            detail,
        });
        let connected = s.mqtt_connected.load(Ordering::Relaxed);
        let stuck = self.held_stuck(Instant::now());
        checks.push(Check {
            name: "mqtt",
            ok: connected && stuck.is_none(),
            warn: false,
            detail: match (connected, stuck) {
                (_, Some((_, why))) => why,
                (true, None) => format!(
                    "connected, {} deliveries held un-acked",
                    s.mqtt_held.count()
                ),
                (false, None) => "not connected".into(),
            },
        });
        let (ok, detail) = match s.local_broker() {
            None => (false, "not started"),
            Some(Mode::Online) => (true, "online"),
            Some(Mode::Slow) => (true, "slow: new records go to the spool"),
            Some(Mode::CatchUp) => (true, "reachable: draining the spool"),
            Some(Mode::Offline) => (false, "unreachable: records go to the spool"),
        };
        checks.push(Check {
            name: "local broker",
            ok,
            warn: false,
            detail: detail.into(),
        });
        if let Ok(Some(spool)) = s.spool.lock().map(|g| g.clone()) {
            checks.push(Check {
                name: "spool",
                ok: true,
                warn: false,
                detail: format!(
                    "{} records, {} of {} bytes",
                    spool.total_records, spool.total_bytes, spool.max_bytes
                ),
            });
        }
        if self.uplink_enabled {
            let lag: i64 = s
                .uplink_lag
                .lock()
                .map(|m| m.values().sum())
                .unwrap_or_default();
            checks.push(Check {
                name: "uplink",
                ok: true,
                warn: false,
                detail: format!(
                    "{} records acknowledged by the cloud, {lag} behind",
                    Stats::get(&s.uplink_acked)
                ),
            });
            let retention = s
                .uplink_retention
                .lock()
                .map(|m| m.clone())
                .unwrap_or_default();
            for (topic, u) in retention {
                if u.retention_ms > 0 && u.ratio() >= self.retention_warn_share {
                    checks.push(Check {
                        name: "uplink retention",
                        ok: true,
                        warn: true,
                        detail: format!(
                            "{topic}: oldest unreplicated record is {:.0} s old, {:.0}% of its \
                             {:.0} s retention (records older than that are deleted unreplicated)",
                            u.oldest_age_seconds,
                            u.ratio() * 100.0,
                            u.retention_ms as f64 / 1000.0
                        ),
                    });
                }
            }
        }
        checks
    }

    pub fn ready(&self) -> bool {
        self.checks().iter().all(|c| c.ok)
    }

    /// The readiness report as text, one check per line.
    pub fn report(&self) -> String {
        let mut out = String::new();
        for c in self.checks() {
            let mark = match (c.ok, c.warn) {
                (false, _) => "FAIL",
                (true, true) => "warn",
                (true, false) => "ok  ",
            };
            let _ = writeln!(out, "{mark} {}: {}", c.name, c.detail);
        }
        out
    }

    /// One line for systemd's `STATUS=`.
    pub fn status_line(&self) -> String {
        let s = &self.stats;
        let broker = s.local_broker().map_or("starting", Mode::name);
        format!(
            "{} frames in, {} acked, {} dead letters; local broker {broker}; {} spooled",
            Stats::get(&s.frames_in),
            Stats::get(&s.acked),
            Stats::get(&s.dead_letters),
            Stats::get(&s.spooled),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn health() -> Health {
        Health {
            stats: Arc::new(Stats::default()),
            stall_after: Duration::from_secs(10),
            uplink_enabled: false,
            retention_warn_share: 0.8,
        }
    }

    #[test]
    fn not_ready_until_started_connected_and_broker_reached() {
        let h = health();
        assert!(!h.ready());
        assert!(
            h.report().contains("FAIL pipeline: starting"),
            "{}",
            h.report()
        );
        h.stats.liveness.set_started();
        h.stats.mqtt_connected.store(true, Ordering::Relaxed);
        h.stats.set_local_broker(Mode::Offline);
        assert!(!h.ready());
        assert!(h.report().contains("FAIL local broker: unreachable"));
        h.stats.set_local_broker(Mode::CatchUp);
        assert!(h.ready(), "{}", h.report());
        h.stats.mqtt_connected.store(false, Ordering::Relaxed);
        assert!(!h.ready());
        assert!(h.live().is_ok(), "not ready is not unhealthy");
    }

    #[test]
    fn a_stalled_worker_makes_the_node_unhealthy_and_unready() {
        let mut h = health();
        h.stall_after = Duration::from_millis(1);
        h.stats.liveness.set_started();
        h.stats.mqtt_connected.store(true, Ordering::Relaxed);
        h.stats.set_local_broker(Mode::Online);
        h.stats.liveness.worker_busy(0);
        std::thread::sleep(Duration::from_millis(20));
        assert!(h.live().unwrap_err().contains("worker 0"));
        assert!(!h.ready());
        h.stats.liveness.worker_idle(0);
        assert!(h.live().is_ok());
        assert!(h.ready());
    }

    fn held_delivery(h: &Health) -> crate::job::Ack {
        let client =
            rumqttc::AsyncClient::new(rumqttc::MqttOptions::new("t", "localhost", 1883), 4).0;
        let mut publish =
            rumqttc::Publish::new("cameras/a/frames", rumqttc::QoS::AtLeastOnce, vec![]);
        publish.pkid = 1;
        crate::job::Ack::new(client, &publish, &h.stats.mqtt_held)
    }

    #[test]
    fn deliveries_held_with_no_ack_make_a_wedge_naming_what_the_ingress_waits_for() {
        let mut h = health();
        h.stall_after = Duration::from_millis(5);
        h.stats.liveness.set_started();
        h.stats.mqtt_connected.store(true, Ordering::Relaxed);
        h.stats.set_local_broker(Mode::Online);
        let ack = held_delivery(&h);
        assert!(h.live().is_ok(), "held for less than stall_after");
        assert!(
            h.report()
                .contains("ok   mqtt: connected, 1 deliveries held"),
            "{}",
            h.report()
        );
        h.stats.set_ingress_wait(crate::stats::IngressWait::Workers);
        std::thread::sleep(Duration::from_millis(30));
        let why = h.live().unwrap_err();
        assert!(why.contains("1 MQTT deliveries held un-acked"), "{why}");
        assert!(why.contains("inference queue"), "{why}");
        assert!(
            h.report().contains("FAIL mqtt: 1 MQTT deliveries held"),
            "{}",
            h.report()
        );
        // The local broker away explains it: not ready, but a restart would not help.
        h.stats.set_local_broker(Mode::Offline);
        assert!(h.live().is_ok());
        assert!(
            h.report().contains("the local broker is offline"),
            "{}",
            h.report()
        );
        h.stats.set_local_broker(Mode::Online);
        drop(ack);
        assert!(h.live().is_ok(), "nothing held: nothing stuck");
        assert!(h.ready(), "{}", h.report());
    }

    #[test]
    fn an_old_unreplicated_record_warns_but_keeps_the_node_ready() {
        use crate::uplink::backlog::RetentionUse;
        let mut h = health();
        h.uplink_enabled = true;
        h.retention_warn_share = 0.5;
        h.stats.liveness.set_started();
        h.stats.mqtt_connected.store(true, Ordering::Relaxed);
        h.stats.set_local_broker(Mode::Online);
        let set = |age: f64, retention_ms: i64| {
            let mut map = h.stats.uplink_retention.lock().unwrap();
            map.insert(
                "fovea.results".to_string(),
                RetentionUse {
                    oldest_age_seconds: age,
                    retention_ms,
                },
            );
        };
        set(9.0, 20_000);
        assert!(!h.report().contains("retention"), "{}", h.report());
        set(10.0, 20_000);
        let report = h.report();
        assert!(
            report.contains(
                "warn uplink retention: fovea.results: oldest unreplicated record is 10 s old, \
                 50% of its 20 s retention"
            ),
            "{report}"
        );
        assert!(h.ready(), "a warning keeps the node ready: {report}");
        set(1e6, -1);
        assert!(
            !h.report().contains("retention"),
            "no time limit: no warning"
        );
    }
}
