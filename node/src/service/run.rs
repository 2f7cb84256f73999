//! `fovea run`: the node as a service. Starts the endpoint, the pipeline and the supervisor, and
//! stops them in order on SIGTERM/SIGINT.
//!
//! Shutdown: the first signal says `STOPPING=1` and stops taking frames; frames in flight are
//! finished (or spooled, if the broker is away) and acknowledged, the spool and producer are
//! flushed. That has at most `drain` (keep it below the unit's `TimeoutStopSec`); what is still
//! un-acked then stays with the MQTT broker and is delivered again after the restart. A second
//! signal ends the process at once, with the same guarantee.

use super::health::Health;
use super::notify::Notifier;
use crate::config::Config;
use crate::metrics::exposition::Process;
use crate::pipeline;
use crate::stats::Stats;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};
use tokio::signal::unix::{SignalKind, signal};
use tokio::sync::watch;

/// How often a metrics address that could not be bound is tried again.
const BIND_RETRY: Duration = Duration::from_secs(10);

/// Binds `listen` and serves the endpoint. An address in use is an error for the operator, not a
/// reason to stop taking frames: it is logged and tried again until it works.
async fn serve_endpoint(
    listen: String,
    health: Health,
    process: Arc<Process>,
    stop: watch::Receiver<bool>,
) {
    let mut attempts = 0u64;
    let listener = loop {
        match tokio::net::TcpListener::bind(&listen).await {
            Ok(listener) => break listener,
            Err(e) => {
                attempts += 1;
                if attempts == 1 {
                    log::error!(
                        "cannot serve metrics on {listen} (metrics.listen): {e}; the node runs \
                         on and tries again every {} s",
                        BIND_RETRY.as_secs()
                    );
                }
                tokio::time::sleep(BIND_RETRY).await;
            }
        }
    };
    match listener.local_addr() {
        Ok(addr) if attempts > 0 => {
            log::warn!("metrics on http://{addr}/metrics after {attempts} failed attempt(s)")
        }
        Ok(addr) => log::info!("metrics on http://{addr}/metrics, health on /healthz and /readyz"),
        Err(_) => {}
    }
    super::http::serve(listener, health, process, stop).await;
}

pub async fn run(cfg: Config, drain: Duration) -> anyhow::Result<()> {
    let started = Instant::now();
    let start_time = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    // Signals first: a SIGTERM while models load must not kill the process mid-write.
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let notifier = Arc::new(Notifier::from_env());
    let stats = Arc::new(Stats::default());
    let health = Health {
        stats: stats.clone(),
        stall_after: Duration::from_millis(cfg.health.stall_after_ms),
        uplink_enabled: cfg.uplink.enabled,
        retention_warn_share: cfg.uplink.retention_warn_share,
    };
    let (stop_tx, stop_rx) = watch::channel(false);
    // The endpoint outlives the drain (the last figures can be scraped); it ends with the process.
    let (_endpoint_tx, endpoint_rx) = watch::channel(false);
    if !cfg.metrics.listen.is_empty() {
        let process = Arc::new(Process {
            version: env!("CARGO_PKG_VERSION"),
            node_id: cfg.node_id(),
            start_time,
        });
        tokio::spawn(serve_endpoint(
            cfg.metrics.listen.clone(),
            health.clone(),
            process,
            endpoint_rx,
        ));
    }

    tokio::spawn(crate::disk::sampler(
        crate::disk::parts(&cfg),
        stats.clone(),
    ));
    let prepared = pipeline::prepare(cfg)?;
    tokio::spawn(super::supervise(
        health.clone(),
        notifier.clone(),
        started,
        stop_rx.clone(),
    ));
    let mut node = tokio::spawn(pipeline::run(prepared, stop_rx, stats.clone()));
    let signal_name = tokio::select! {
        result = &mut node => return result?,
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    log::info!(
        "{signal_name}: no longer taking frames; draining for at most {} s",
        drain.as_secs()
    );
    notifier.stopping(&format!(
        "draining for at most {} s: {}",
        drain.as_secs(),
        health.status_line()
    ));
    let draining = Instant::now();
    let _ = stop_tx.send(true);
    tokio::select! {
        result = &mut node => result??,
        _ = tokio::time::sleep(drain) => log::warn!(
            "drain deadline passed; exiting with frames in flight (un-acked: the MQTT broker delivers them again)"
        ),
        _ = term.recv() => log::warn!("second signal: exiting now (un-acked frames are delivered again)"),
        _ = int.recv() => log::warn!("second signal: exiting now (un-acked frames are delivered again)"),
    }
    log::info!(
        "stopped after {:.1} s of drain: {} frames in, {} acked, {} results, {} frames, {} dead letters, {} skipped",
        draining.elapsed().as_secs_f64(),
        Stats::get(&stats.frames_in),
        Stats::get(&stats.acked),
        Stats::get(&stats.results_out),
        Stats::get(&stats.frames_out),
        Stats::get(&stats.dead_letters),
        Stats::get(&stats.skipped_stale)
    );
    Ok(())
}
