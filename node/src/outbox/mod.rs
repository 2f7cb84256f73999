//! The outbox: writes every finished job's records to the local Kafka broker, in each camera's
//! arrival order, and acknowledges the camera's MQTT publish only once all of them are durable:
//! acknowledged by the broker, or written to the spool and flushed to disk.
//!
//! Where a record goes, and what a refusal means for it, is decided by the delivery state
//! ([`delivery::Delivery`]: a plain struct, events in, actions out); this loop only does the I/O
//! it asks for and reports back: producing, spooling, flushing, reading and removing spooled
//! records, probing, acknowledging.
//!
//! - `plan`: what to write for a finished job (the size policy, dead letters).
//! - `delivery`: the delivery state, with `state` (the mode machine: online, slow, offline,
//!   catch-up).
//! - `producer`, `topics`: the rdkafka producer behind a small trait, and topic creation.

mod alter_configs;
pub mod delivery;
pub mod dwell;
pub mod pace;
pub mod plan;
pub mod producer;
pub mod retention;
pub mod sequencer;
pub mod state;
pub mod topics;

use crate::config::SpoolConfig;
use crate::job::{Done, JobMeta, now_ms};
use crate::outbox::sequencer::Sequencer;
use crate::records::{Record, RecordKind, Refusal, classify, timed_out};
use crate::spool::{Appended, Spool, SpoolRecord};
use crate::stats::{Stage, Stats};
use delivery::{Action, Delivery, DeliveryConfig, Event, FrameId};
use plan::RecordPlanner;
use producer::Produce;
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};

/// Spooled records handed to the producer at once while draining (the most: a slow broker gets
/// fewer, see `pace`).
const DRAIN_WINDOW: usize = 256;
/// Bounds of the dwell before a mode change towards sending more (see `dwell`): long enough that
/// a broker slow under load does not flip the outbox every few seconds, short enough that a
/// drained spool goes online soon after.
const MIN_DWELL: Duration = Duration::from_secs(2);
const MAX_DWELL: Duration = Duration::from_secs(60);
/// Bounds of the drain's pause after a drained record timed out (see `pace`).
const MIN_PAUSE: Duration = Duration::from_millis(250);
const MAX_PAUSE: Duration = Duration::from_secs(8);
/// Drops and spool write failures are logged at most this often (they are counted always).
const LOG_INTERVAL: Duration = Duration::from_secs(10);
/// After a failed spool write, the next try waits this long (a full disk stays full a while).
const WRITE_RETRY: Duration = Duration::from_millis(250);
/// How often the spool's figures are copied out for the metrics endpoint.
const SPOOL_STATS_INTERVAL: Duration = Duration::from_secs(1);

pub struct Outbox<P: Produce> {
    /// The cameras' frame order, shared with the ingress (see [`crate::job::Cameras`]).
    pub cameras: Arc<crate::job::Cameras>,
    pub producer: P,
    pub planner: RecordPlanner,
    pub stats: Arc<Stats>,
    pub spool: Box<dyn Spool>,
    pub spool_cfg: SpoolConfig,
}

/// A frame on its way: its acknowledgement and timings.
struct Waiting {
    meta: JobMeta,
    /// When its records were planned (for the local-broker stage).
    planned: Instant,
}

/// What the loop keeps beside the delivery state: the frames' acks, the report channel, and
/// rate-limited logging.
struct Run {
    frames: HashMap<FrameId, Waiting>,
    next_id: FrameId,
    reports: UnboundedSender<Event>,
    drops: BTreeMap<String, u64>,
    last_drop_log: Instant,
    last_write_failure_log: Option<Instant>,
    last_write_failure: Option<Instant>,
    last_spool_stats: Option<Instant>,
    spool_acked: u64,
}

impl<P: Produce> Outbox<P> {
    /// Runs until `done` is closed (every worker and the ingress have stopped) and nothing is in
    /// flight, then flushes the spool.
    pub async fn run(mut self, mut done: UnboundedReceiver<Done>) {
        let (reports_tx, mut reports) = unbounded_channel();
        let mut delivery = Delivery::new(
            DeliveryConfig {
                slow_inflight_bytes: self.spool_cfg.slow_inflight_bytes,
                probe_interval: Duration::from_millis(self.spool_cfg.probe_interval_ms),
                drain_window: DRAIN_WINDOW,
                divert_after: Duration::from_millis(self.spool_cfg.divert_after_ms),
                min_dwell: MIN_DWELL,
                max_dwell: MAX_DWELL,
                min_pause: MIN_PAUSE,
                max_pause: MAX_PAUSE,
            },
            self.planner.clone(),
        );
        let mut run = Run {
            frames: HashMap::new(),
            next_id: 0,
            reports: reports_tx,
            drops: BTreeMap::new(),
            last_drop_log: Instant::now(),
            last_write_failure_log: None,
            last_write_failure: None,
            last_spool_stats: None,
            spool_acked: 0,
        };
        let mut sequencer = Sequencer::new(self.cameras.clone());
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut open = true;
        self.stats.set_local_broker(delivery.mode());
        loop {
            self.stats.liveness.outbox_turned();
            tokio::select! {
                item = done.recv(), if open && delivery.accepting() => match item {
                    Some(item) => {
                        let (camera, seq) = (item.meta.camera.clone(), item.meta.node_seq);
                        for ready in sequencer.push(&camera, seq, item) {
                            let event = self.finished(ready, &mut run);
                            let actions = delivery.handle(event, open);
                            self.perform(actions, &mut run).await;
                        }
                    }
                    None => open = false,
                },
                Some(report) = reports.recv() => {
                    let actions = delivery.handle(report, open);
                    self.perform(actions, &mut run).await;
                }
                _ = tick.tick() => {
                    let actions = delivery.handle(Event::Tick { now: Instant::now() }, open);
                    self.perform(actions, &mut run).await;
                    self.stats.set_pacing(
                        delivery.drain_window(),
                        delivery.drain_pause(),
                        delivery.dwell(),
                        delivery.slow_timeouts(),
                    );
                    self.housekeeping(&mut run, false);
                }
            }
            if !open && delivery.settled() && reports.is_empty() {
                if delivery.frames_waiting() > 0 {
                    log::warn!(
                        "{} frame(s) could not be made durable before shutdown; they stay un-acked and will be redelivered",
                        delivery.frames_waiting()
                    );
                }
                break;
            }
        }
        if sequencer.held() > 0 {
            log::error!("{} finished frames never became writable", sequencer.held());
        }
        // Drained records acknowledged since the last tick leave the spool now (were they left, the
        // next start would send them again: a duplicate with the same record id, never a loss).
        let removals = delivery.take_removals();
        if !removals.is_empty() {
            self.remove(&removals);
        }
        if let Err(e) = tokio::task::block_in_place(|| self.spool.flush()) {
            log::error!("spool flush at shutdown: {e}");
        }
        tokio::task::block_in_place(|| self.producer.flush(Duration::from_secs(5)));
        self.housekeeping(&mut run, true);
        self.stats.liveness.outbox_stopped();
    }

    /// Plans a finished job's records and remembers its ack.
    fn finished(&mut self, done: Done, run: &mut Run) -> Event {
        let records = self.planner.plan(&done);
        for letter in records.iter().filter(|r| r.kind == RecordKind::DeadLetter) {
            self.stats.reject(
                letter
                    .header(fovea_proto::headers::ERROR_KIND)
                    .unwrap_or("unknown"),
            );
        }
        let id = run.next_id;
        run.next_id += 1;
        run.frames.insert(
            id,
            Waiting {
                meta: done.meta,
                planned: Instant::now(),
            },
        );
        Event::Finished { id, records }
    }

    async fn perform(&mut self, actions: Vec<Action>, run: &mut Run) {
        for action in actions {
            match action {
                Action::Produce { id, index, record } => {
                    self.produce(record, run, move |outcome| match outcome {
                        Ok(()) => Event::Delivered { id, index },
                        Err((refusal, error, timed_out)) => Event::Failed {
                            id,
                            index,
                            refusal,
                            error,
                            timed_out,
                        },
                    })
                    .await;
                }
                Action::ProduceDrained { seq, record } => {
                    let stats = self.stats.clone();
                    self.produce(record, run, move |outcome| match outcome {
                        Ok(()) => {
                            Stats::incr(&stats.drained);
                            Event::DrainDelivered { seq }
                        }
                        Err((refusal, error, timed_out)) => Event::DrainFailed {
                            seq,
                            refusal,
                            error,
                            timed_out,
                        },
                    })
                    .await;
                }
                Action::Spool(frames) => {
                    let event = self.spool_frames(frames, run);
                    let _ = run.reports.send(event);
                }
                Action::Flush => {
                    let ok = self.flush_spool(run);
                    let _ = run.reports.send(Event::Flushed { ok });
                }
                Action::Ack { id, spooled } => self.ack(id, spooled, run).await,
                Action::ReadSpool { after, max } => {
                    let event = match tokio::task::block_in_place(|| self.spool.oldest(after, max))
                    {
                        Ok(batch) => Event::SpoolRead {
                            batch: batch
                                .into_iter()
                                .map(|(seq, rec)| (seq, Record::from_spool(rec)))
                                .collect(),
                        },
                        Err(e) => {
                            log::error!("reading the spool failed: {e}");
                            Event::SpoolReadFailed
                        }
                    };
                    let _ = run.reports.send(event);
                }
                Action::Remove(seqs) => self.remove(&seqs),
                Action::Probe => {
                    let probe = self.producer.probe();
                    let reports = run.reports.clone();
                    tokio::spawn(async move {
                        let ok = match probe.await {
                            Ok(()) => true,
                            Err(e) => {
                                log::debug!("local broker still unreachable: {e}");
                                false
                            }
                        };
                        let _ = reports.send(Event::Probe { ok });
                    });
                }
                Action::RebuildProducer => {
                    Stats::incr(&self.stats.producer_rebuilds);
                    if let Err(e) = self.producer.rebuild() {
                        log::error!("building a new local producer failed: {e:#}");
                    }
                }
                Action::Refused { record, error } => {
                    self.stats.refuse(record.kind.class());
                    log::warn!(
                        "the local broker refused the {} record {} for {} for good ({error}); a record-refused dead letter takes its place",
                        record.kind.schema(),
                        record.record_id().unwrap_or("?"),
                        record.topic
                    );
                    self.stats.reject("record-refused");
                }
                Action::GiveUp { record, error } => {
                    Stats::incr(&self.stats.records_given_up);
                    log::error!(
                        "dead letter {} for {} refused for good ({error}); nothing can stand in for it, given up",
                        record.record_id().unwrap_or("?"),
                        record.topic
                    );
                }
                Action::ModeChanged { from, to, why } => {
                    log::info!("outbox: {} -> {} ({why:?})", from.name(), to.name());
                    if to == state::Mode::Offline && from != state::Mode::Offline {
                        log::warn!(
                            "local broker did not take records (within {} ms, or refused them): spooling",
                            self.spool_cfg.divert_after_ms
                        );
                    }
                    if to == state::Mode::CatchUp {
                        let backlog = self.spool.stats().total_records;
                        log::info!("local broker reachable: draining {backlog} spooled record(s)");
                    }
                    if to == state::Mode::Online && from == state::Mode::CatchUp {
                        log::info!("spool drained: sending straight to the local broker again");
                    }
                    self.stats.set_local_broker(to);
                    self.stats.mode_changed(from, to);
                }
            }
        }
    }

    /// Hands `record` to the producer and reports the broker's answer (or the producer's refusal
    /// at once) as the event `report` makes of it, counting deliveries and failures.
    async fn produce(
        &mut self,
        record: Arc<Record>,
        run: &Run,
        report: impl FnOnce(Result<(), (Refusal, String, bool)>) -> Event + Send + 'static,
    ) {
        let (reports, stats, class) =
            (run.reports.clone(), self.stats.clone(), record.kind.class());
        let answer = match self.producer.enqueue(record).await {
            Ok(delivery) => delivery,
            Err(e) => Box::pin(async move { Err(e) }),
        };
        tokio::spawn(async move {
            let outcome = match answer.await {
                Ok(()) => {
                    Stats::incr(stats.delivered(class));
                    Ok(())
                }
                Err(e) => {
                    Stats::incr(&stats.delivery_failures);
                    Err((classify(&e), e.to_string(), timed_out(&e)))
                }
            };
            let _ = reports.send(report(outcome));
        });
    }

    /// Appends frames to the spool, each as one unit, in order, until one is refused or fails;
    /// then flushes once.
    fn spool_frames(&mut self, frames: Vec<(FrameId, Vec<Arc<Record>>)>, run: &mut Run) -> Event {
        if run
            .last_write_failure
            .is_some_and(|t| t.elapsed() < WRITE_RETRY)
        {
            return Event::Spooled {
                stored: Vec::new(),
                flushed: true,
            };
        }
        let now = now_ms();
        let mut stored = Vec::new();
        for (id, records) in frames {
            let unit: Vec<SpoolRecord> = records.iter().map(|r| r.to_spool(now)).collect();
            let (seqs, dropped, dropped_itself) =
                match tokio::task::block_in_place(|| self.spool.append_frame(&unit)) {
                    Ok(Appended::Stored { seqs, dropped }) => (seqs, dropped, false),
                    Ok(Appended::FrameDropped { seqs, dropped, .. }) => (seqs, dropped, true),
                    Ok(Appended::Refused) => break, // full under backpressure: held un-acked
                    Err(e) => {
                        self.write_failed(&e, run);
                        break;
                    }
                };
            self.stats
                .spooled
                .fetch_add(seqs.end - seqs.start, std::sync::atomic::Ordering::Relaxed);
            let reasons = dropped
                .iter()
                .map(|d| format!("{}/spool-full-oldest", d.class.name()))
                .chain(dropped_itself.then(|| "frame/spool-full-no-room".to_string()));
            for reason in reasons {
                Stats::incr(&self.stats.spool_dropped);
                *run.drops.entry(reason).or_default() += 1;
            }
            stored.push(id);
        }
        let flushed = stored.is_empty() || self.flush_spool(run);
        Event::Spooled { stored, flushed }
    }

    /// Counts a failed spool write or flush and logs it (at most once per interval); the frames
    /// concerned stay un-acked and are retried after [`WRITE_RETRY`].
    fn write_failed(&mut self, e: &crate::spool::SpoolError, run: &mut Run) {
        self.stats.spool_write_failure(if e.is_disk_full() {
            "disk-full"
        } else {
            "error"
        });
        run.last_write_failure = Some(Instant::now());
        if run
            .last_write_failure_log
            .is_none_or(|t| t.elapsed() >= LOG_INTERVAL)
        {
            log::error!(
                "spool write failed ({e}): holding frames un-acked at the MQTT broker and retrying \
                 (logged at most every {} s; fovea_spool_write_failures_total counts them)",
                LOG_INTERVAL.as_secs()
            );
            run.last_write_failure_log = Some(Instant::now());
        }
    }

    fn flush_spool(&mut self, run: &mut Run) -> bool {
        match tokio::task::block_in_place(|| self.spool.flush()) {
            Ok(()) => true,
            Err(e) => {
                // Not durable: the frames stay un-acked; the broker redelivers them if we die.
                self.write_failed(&e, run);
                false
            }
        }
    }

    async fn ack(&mut self, id: FrameId, spooled: bool, run: &mut Run) {
        let Some(waiting) = run.frames.remove(&id) else {
            return;
        };
        let now = Instant::now();
        if spooled {
            run.spool_acked += 1;
            // The fault tests wait for this line (log level debug).
            log::debug!("spooled: {} frame(s) acked in total", run.spool_acked);
        } else {
            self.stats
                .record(Stage::Kafka, now.duration_since(waiting.planned));
        }
        self.stats
            .record(Stage::Total, now.duration_since(waiting.meta.received));
        waiting.meta.ack.send().await;
        Stats::incr(&self.stats.acked);
    }

    fn remove(&mut self, seqs: &[u64]) {
        if let Err(e) = tokio::task::block_in_place(|| self.spool.remove(seqs)) {
            log::error!("removing drained records from the spool failed: {e}");
        }
    }

    /// Copies the spool's figures out for the metrics endpoint and logs drops, each at most once
    /// per interval (or now, with `force`).
    fn housekeeping(&mut self, run: &mut Run, force: bool) {
        if force
            || run
                .last_spool_stats
                .is_none_or(|t| t.elapsed() >= SPOOL_STATS_INTERVAL)
        {
            let figures = self.spool.stats();
            if let Ok(mut slot) = self.stats.spool.lock() {
                *slot = Some(figures);
            }
            run.last_spool_stats = Some(Instant::now());
        }
        if run.drops.is_empty() || (!force && run.last_drop_log.elapsed() < LOG_INTERVAL) {
            return;
        }
        let summary: Vec<String> = run.drops.iter().map(|(k, n)| format!("{k}: {n}")).collect();
        log::warn!(
            "spool full ({} bytes max): dropped {}",
            self.spool_cfg.max_bytes,
            summary.join(", ")
        );
        run.drops.clear();
        run.last_drop_log = Instant::now();
    }
}

#[cfg(test)]
#[path = "loop_tests.rs"]
mod loop_tests;
