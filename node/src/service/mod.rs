//! Running as an appliance: what the node tells systemd and the operator's monitoring.
//!
//! - `notify`: the sd_notify protocol (READY, STATUS, WATCHDOG, STOPPING).
//! - `liveness`: whether each stage makes progress; drives the watchdog and `/healthz`.
//! - `health`: the health and readiness checks.
//! - `http`: `/metrics`, `/healthz`, `/readyz`.
//!
//! [`supervise`] ties them together for `fovea run`.

pub mod health;
pub mod http;
pub mod liveness;
pub mod notify;
pub mod run;

use health::Health;
use notify::Notifier;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::watch;

/// How often `STATUS=` is refreshed (and health checked when there is no watchdog).
const STATUS_INTERVAL: Duration = Duration::from_secs(5);

/// Tells systemd `READY=1` once the pipeline takes frames, then feeds the watchdog (when the
/// unit has `WatchdogSec=`) for as long as no stage is stalled, and keeps `STATUS=` current.
/// A stall is logged once when it starts and once when it ends; systemd restarts the node if it
/// lasts a watchdog interval. Returns when `shutdown` turns true.
pub async fn supervise(
    health: Health,
    notifier: Arc<Notifier>,
    started: Instant,
    mut shutdown: watch::Receiver<bool>,
) {
    let watchdog = notify::watchdog_interval();
    let tick = watchdog.map_or(STATUS_INTERVAL, |w| (w / 2).min(STATUS_INTERVAL));
    if let Some(w) = watchdog {
        log::info!(
            "systemd watchdog: {} ms; pinging every {} ms while no stage stalls",
            w.as_millis(),
            tick.as_millis()
        );
    }
    // Ready: wait for the pipeline to start taking frames (models, spool and ingress are up).
    let mut poll = tokio::time::interval(Duration::from_millis(20));
    let mut last_ping = Instant::now();
    while !health.stats.liveness.started() {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = poll.tick() => {}
        }
        // Loading models can take a while on a small box: keep systemd from killing us for it.
        if watchdog.is_some() && last_ping.elapsed() >= tick {
            notifier.watchdog();
            last_ping = Instant::now();
        }
    }
    let took = started.elapsed();
    log::info!("ready: taking frames {} ms after start", took.as_millis());
    notifier.ready(&format!("taking frames ({} ms to start)", took.as_millis()));

    let mut ticks = tokio::time::interval(tick);
    let mut last_status = Instant::now();
    let mut stalled = false;
    loop {
        tokio::select! {
            _ = shutdown.wait_for(|stop| *stop) => return,
            _ = ticks.tick() => {}
        }
        match health.live() {
            Ok(()) => {
                if stalled {
                    log::warn!("the pipeline moves again");
                    stalled = false;
                }
                if watchdog.is_some() {
                    notifier.watchdog();
                }
            }
            Err(why) => {
                if !stalled {
                    log::error!(
                        "pipeline stalled: {why}; {}",
                        if watchdog.is_some() {
                            "no longer feeding the systemd watchdog"
                        } else {
                            "/healthz reports it"
                        }
                    );
                    notifier.status(&format!("stalled: {why}"));
                    stalled = true;
                }
                continue;
            }
        }
        if last_status.elapsed() >= STATUS_INTERVAL {
            notifier.status(&health.status_line());
            last_status = Instant::now();
        }
    }
}
