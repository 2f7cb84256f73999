//! The outbox: writes every finished job's records to the local Kafka broker, in each camera's
//! arrival order, and acknowledges the camera's MQTT publish only once all of them are durable:
//! acknowledged by the broker, or written to the spool and flushed to disk.
//!
//! Where a record goes is decided by the delivery mode ([`state`]): straight to the producer while
//! the broker keeps up, into the spool while it is slow, away or refusing, and out of the spool,
//! oldest first, when it is back. A record whose delivery fails comes back from librdkafka and is
//! spooled too, so nothing acknowledged depends on the broker being there.
//!
//! - `records`: what to write for a finished job (and the size policy).
//! - `convert`: records to and from the spool's shape.
//! - `producer`, `topics`: the rdkafka producer and topic creation.
//! - `state`: the delivery state machine.

pub mod convert;
pub mod producer;
pub mod records;
pub mod state;
pub mod topics;

use crate::config::{KafkaConfig, SpoolConfig};
use crate::pipeline::job::{Done, JobMeta, now_ms};
use crate::pipeline::sequencer::Sequencer;
use crate::spool::{Appended, Class, Spool, SpoolRecord, WhenFull};
use crate::stats::{Stage, Stats};
use fovea_proto::headers as h;
use rdkafka::producer::{FutureProducer, Producer};
use records::{Naming, RecordKind};
use state::{Event, Mode};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender, unbounded_channel};
use tokio::task::JoinSet;

/// Spooled records handed to the producer at once while draining.
const DRAIN_WINDOW: usize = 256;
/// Drops are logged at most this often (they are counted always).
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(10);
/// How often the spool's figures are copied out for the metrics endpoint.
const SPOOL_STATS_INTERVAL: Duration = Duration::from_secs(1);

pub struct Outbox {
    pub producer: FutureProducer,
    pub naming: Naming,
    pub stats: Arc<Stats>,
    pub spool: Box<dyn Spool>,
    pub spool_cfg: SpoolConfig,
    /// For creating the topics when the broker is first reached.
    pub kafka: KafkaConfig,
}

/// Reports from the delivery tasks to the outbox loop.
enum Note {
    /// Some records of a frame sent straight to the broker failed; they go to the spool.
    DirectFailed {
        meta: JobMeta,
        failed: Vec<SpoolRecord>,
    },
    /// A drained record was acknowledged (or not) by the broker.
    Drained { seq: u64, ok: bool },
    /// The result of a probe of an unreachable broker.
    Probe(Result<(), String>),
}

/// A frame's records waiting to be spooled (and the frame acked).
struct Pending {
    meta: JobMeta,
    records: Vec<SpoolRecord>,
}

/// The loop's working state, apart from the configuration in [`Outbox`].
struct Run {
    mode: Mode,
    notes: UnboundedSender<Note>,
    /// Bytes handed to the producer for frames sent straight, not yet acknowledged.
    inflight_bytes: Arc<AtomicU64>,
    direct: JoinSet<()>,
    /// Records waiting for the spool, oldest first.
    held: VecDeque<Pending>,
    /// Drained records in flight (seq -> bytes), the last seq handed out, and acked seqs to remove.
    draining: HashMap<u64, u64>,
    drain_after: Option<u64>,
    to_remove: Vec<u64>,
    probing: bool,
    next_probe: Instant,
    drops: BTreeMap<String, u64>,
    last_drop_log: Instant,
    /// Frames acked because their records were spooled, since start.
    spool_acked: u64,
    last_spool_stats: Option<Instant>,
}

impl Outbox {
    /// Runs until `done` is closed (every worker and the ingress have stopped) and every frame in
    /// flight is durable, then flushes the spool.
    pub async fn run(mut self, mut done: UnboundedReceiver<Done>) {
        let (notes_tx, mut notes) = unbounded_channel();
        let mut run = Run {
            mode: Mode::Offline,
            notes: notes_tx,
            inflight_bytes: Arc::new(AtomicU64::new(0)),
            direct: JoinSet::new(),
            held: VecDeque::new(),
            draining: HashMap::new(),
            drain_after: None,
            to_remove: Vec::new(),
            probing: false,
            next_probe: Instant::now(),
            drops: BTreeMap::new(),
            last_drop_log: Instant::now(),
            spool_acked: 0,
            last_spool_stats: None,
        };
        let mut sequencer = Sequencer::default();
        let mut tick = tokio::time::interval(Duration::from_millis(20));
        let mut open = true;
        self.stats.set_local_broker(run.mode);
        loop {
            self.stats.liveness.outbox_turned();
            tokio::select! {
                item = done.recv(), if open && run.held.is_empty() => match item {
                    Some(item) => {
                        let (camera, seq) = (item.meta.camera.clone(), item.meta.node_seq);
                        for ready in sequencer.push(&camera, seq, item) {
                            self.write(ready, &mut run).await;
                        }
                    }
                    None => open = false,
                },
                Some(note) = notes.recv() => self.on_note(note, &mut run),
                _ = tick.tick() => {}
            }
            while run.direct.try_join_next().is_some() {}
            self.housekeeping(&mut run, open).await;
            if !open && run.direct.is_empty() && run.draining.is_empty() && notes.is_empty() {
                if !run.held.is_empty() {
                    log::warn!(
                        "{} frame(s) could not be spooled before shutdown; they stay un-acked and will be redelivered",
                        run.held.len()
                    );
                }
                break;
            }
        }
        if sequencer.held() > 0 {
            log::error!("{} finished frames never became writable", sequencer.held());
        }
        self.log_drops(&mut run, true);
        self.remove_drained(&mut run);
        if let Err(e) = tokio::task::block_in_place(|| self.spool.flush()) {
            log::error!("spool flush at shutdown: {e}");
        }
        self.publish_spool_stats();
        self.stats.liveness.outbox_stopped();
    }

    /// Copies the spool's figures to [`Stats::spool`] for the metrics endpoint.
    fn publish_spool_stats(&self) {
        let figures = self.spool.stats();
        if let Ok(mut slot) = self.stats.spool.lock() {
            *slot = Some(figures);
        }
    }

    /// Sends a job's records straight to the broker, or queues them for the spool.
    async fn write(&mut self, done: Done, run: &mut Run) {
        let records = records::plan(&done, &self.naming);
        for letter in records.iter().filter(|r| r.kind == RecordKind::DeadLetter) {
            let kind = letter.headers.iter().find(|(k, _)| *k == h::ERROR_KIND);
            self.stats
                .reject(kind.map_or("unknown", |(_, v)| v.as_str()));
        }
        if run.mode == Mode::Online
            && run.inflight_bytes.load(Ordering::Relaxed) > self.spool_cfg.slow_inflight_bytes
        {
            self.transition(run, Event::InflightAbove);
        }
        if run.mode.spools() {
            let now = now_ms();
            let records = records.iter().map(|r| convert::to_spool(r, now)).collect();
            run.held.push_back(Pending {
                meta: done.meta,
                records,
            });
            return;
        }
        let handed = Instant::now();
        let bytes: u64 = records.iter().map(|r| r.size() as u64).sum();
        run.inflight_bytes.fetch_add(bytes, Ordering::Relaxed);
        let mut futures = Vec::with_capacity(records.len());
        for record in &records {
            let headers = record.headers.iter().map(|(k, v)| (*k, v.as_str()));
            match producer::enqueue_parts(
                &self.producer,
                &record.topic,
                &record.key,
                headers,
                &record.value,
            )
            .await
            {
                Ok(f) => futures.push((record.kind, f)),
                Err(e) => {
                    Stats::incr(&self.stats.delivery_failures);
                    log::error!("record for {} refused by the producer: {e}", record.key);
                }
            }
        }
        let (stats, notes, inflight) = (
            self.stats.clone(),
            run.notes.clone(),
            run.inflight_bytes.clone(),
        );
        run.direct.spawn(async move {
            let mut failed = Vec::new();
            for (kind, future) in futures {
                match future.await {
                    Ok(Ok(_)) => Stats::incr(stats.delivered(convert::class_of(kind))),
                    Ok(Err((e, msg))) => {
                        log::debug!(
                            "{kind:?} record for camera {} not delivered: {e}",
                            done.meta.camera
                        );
                        failed.push(convert::failed_to_spool(&msg, now_ms()));
                    }
                    // The producer is gone: shutting down; the frame stays un-acked.
                    Err(_) => {
                        inflight.fetch_sub(bytes, Ordering::Relaxed);
                        return;
                    }
                }
            }
            inflight.fetch_sub(bytes, Ordering::Relaxed);
            if failed.is_empty() {
                let now = Instant::now();
                stats.record(Stage::Kafka, now.duration_since(handed));
                stats.record(Stage::Total, now.duration_since(done.meta.received));
                done.meta.ack.send().await;
                Stats::incr(&stats.acked);
            } else {
                let _ = notes.send(Note::DirectFailed {
                    meta: done.meta,
                    failed,
                });
            }
        });
    }

    fn on_note(&mut self, note: Note, run: &mut Run) {
        match note {
            Note::DirectFailed { meta, failed } => {
                if run.mode == Mode::Online || run.mode == Mode::Slow {
                    log::warn!(
                        "local broker did not acknowledge records within {} ms: spooling",
                        self.spool_cfg.divert_after_ms
                    );
                }
                self.transition(run, Event::DeliveryFailed);
                // These are older than anything queued for the spool since: keep them first.
                run.held.push_front(Pending {
                    meta,
                    records: failed,
                });
            }
            Note::Drained { seq, ok } => {
                run.draining.remove(&seq);
                if ok {
                    run.to_remove.push(seq);
                    Stats::incr(&self.stats.drained);
                } else {
                    if run.mode == Mode::CatchUp {
                        log::warn!("draining the spool failed: the local broker is away again");
                    }
                    self.transition(run, Event::DeliveryFailed);
                    run.drain_after = None;
                }
            }
            Note::Probe(result) => {
                run.probing = false;
                match result {
                    Ok(()) => {
                        let backlog = self.spool.stats().total_records;
                        log::info!("local broker reachable: draining {backlog} spooled record(s)");
                        self.transition(run, Event::ProbeSucceeded);
                    }
                    Err(e) => {
                        log::debug!("local broker still unreachable: {e}");
                        run.next_probe = Instant::now()
                            + Duration::from_millis(self.spool_cfg.probe_interval_ms);
                    }
                }
            }
        }
    }

    async fn housekeeping(&mut self, run: &mut Run, open: bool) {
        if run
            .last_spool_stats
            .is_none_or(|t| t.elapsed() >= SPOOL_STATS_INTERVAL)
        {
            self.publish_spool_stats();
            run.last_spool_stats = Some(Instant::now());
        }
        self.remove_drained(run);
        self.spool_held(run).await;
        if run.mode == Mode::Slow
            && run.inflight_bytes.load(Ordering::Relaxed) < self.spool_cfg.slow_inflight_bytes / 2
        {
            self.transition(run, Event::InflightBelow);
        }
        if run.mode == Mode::Offline && !run.probing && Instant::now() >= run.next_probe {
            run.probing = true;
            let (kafka, naming, notes) =
                (self.kafka.clone(), self.naming.clone(), run.notes.clone());
            tokio::spawn(async move {
                let t = &naming.topics;
                let names = [t.frames.as_str(), t.results.as_str(), t.deadletter.as_str()];
                let _ = notes.send(Note::Probe(topics::create(&kafka, &names).await));
            });
        }
        // Shutting down: no new drain rounds; what is left waits on disk for the next start.
        if run.mode.drains() && open {
            self.drain_more(run).await;
        }
        self.log_drops(run, false);
    }

    /// Writes held records to the spool, flushes once, then acks their frames.
    async fn spool_held(&mut self, run: &mut Run) {
        if run.held.is_empty() {
            return;
        }
        let mut durable = Vec::new();
        while let Some(pending) = run.held.front() {
            if let Some(frame) = pending.records.iter().find(|r| r.class == Class::Frame)
                && self.spool_cfg.when_full == WhenFull::Backpressure
                && !self.spool.has_room(Class::Frame, frame.size() as u64)
            {
                break; // the spool is full: hold the frame (and the camera) un-acked
            }
            let Some(pending) = run.held.pop_front() else {
                break;
            };
            match self.append_all(&pending.records, run) {
                Ok(()) => durable.push(pending.meta),
                Err(e) => {
                    log::error!(
                        "spool write failed ({e}); holding the frame un-acked and retrying"
                    );
                    run.held.push_front(pending);
                    break;
                }
            }
        }
        if durable.is_empty() {
            return;
        }
        if let Err(e) = tokio::task::block_in_place(|| self.spool.flush()) {
            // Not durable: the frames stay un-acked; the broker redelivers them if we die.
            log::error!(
                "spool flush failed ({e}); {} frame(s) left un-acked",
                durable.len()
            );
            return;
        }
        let flushed = durable.len();
        for meta in durable {
            meta.ack.send().await;
            self.stats.record(Stage::Total, meta.received.elapsed());
            Stats::incr(&self.stats.acked);
        }
        run.spool_acked += flushed as u64;
        log::debug!(
            "spooled: {} frame(s) acked in total ({flushed} in this flush; mode {})",
            run.spool_acked,
            run.mode.name()
        );
    }

    fn append_all(
        &mut self,
        records: &[SpoolRecord],
        run: &mut Run,
    ) -> Result<(), crate::spool::SpoolError> {
        for record in records {
            match self.spool.append(record)? {
                Appended::Stored { dropped, .. } => {
                    Stats::incr(&self.stats.spooled);
                    for d in dropped {
                        Stats::incr(&self.stats.spool_dropped);
                        *run.drops
                            .entry(format!("{}/spool-full-oldest", d.class.name()))
                            .or_default() += 1;
                    }
                }
                Appended::Refused => {
                    Stats::incr(&self.stats.spool_dropped);
                    *run.drops
                        .entry(format!("{}/spool-full", record.class.name()))
                        .or_default() += 1;
                }
            }
        }
        Ok(())
    }

    /// Hands the next spooled records to the producer; notices when the spool is empty.
    async fn drain_more(&mut self, run: &mut Run) {
        if run.drain_after.is_none() && !run.draining.is_empty() {
            return; // a failed round's records are still in flight; start over after them
        }
        let in_flight_bytes: u64 = run.draining.values().sum();
        let room = DRAIN_WINDOW.saturating_sub(run.draining.len());
        if room == 0 || in_flight_bytes > self.spool_cfg.slow_inflight_bytes / 2 {
            return;
        }
        let batch = match tokio::task::block_in_place(|| self.spool.oldest(run.drain_after, room)) {
            Ok(batch) => batch,
            Err(e) => {
                log::error!("reading the spool failed: {e}");
                return;
            }
        };
        if batch.is_empty() {
            // Records still waiting to be spooled must go through the spool first: going online
            // now would strand them there until the next outage.
            if run.draining.is_empty() && run.to_remove.is_empty() && run.held.is_empty() {
                log::info!("spool drained: sending straight to the local broker again");
                self.transition(run, Event::SpoolDrained);
            }
            return;
        }
        for (seq, rec) in batch {
            run.drain_after = Some(seq);
            let headers = rec.headers.iter().map(|(k, v)| (k.as_str(), v.as_str()));
            let bytes = rec.size() as u64;
            match producer::enqueue_parts(&self.producer, &rec.topic, &rec.key, headers, &rec.value)
                .await
            {
                Ok(future) => {
                    run.draining.insert(seq, bytes);
                    let (notes, stats, class) = (run.notes.clone(), self.stats.clone(), rec.class);
                    tokio::spawn(async move {
                        let ok = matches!(future.await, Ok(Ok(_)));
                        if ok {
                            Stats::incr(stats.delivered(class));
                        }
                        let _ = notes.send(Note::Drained { seq, ok });
                    });
                }
                Err(e) => {
                    // Never deliverable (e.g. larger than the producer allows): quarantine by
                    // removing it, loudly, rather than blocking the drain forever.
                    Stats::incr(&self.stats.delivery_failures);
                    log::error!(
                        "spooled record {seq} for {} refused by the producer ({e}); removed",
                        rec.key
                    );
                    run.to_remove.push(seq);
                }
            }
        }
    }

    fn remove_drained(&mut self, run: &mut Run) {
        if run.to_remove.is_empty() {
            return;
        }
        let seqs = std::mem::take(&mut run.to_remove);
        if let Err(e) = tokio::task::block_in_place(|| self.spool.remove(&seqs)) {
            log::error!("removing drained records from the spool failed: {e}");
        }
    }

    fn transition(&self, run: &mut Run, event: Event) {
        let next = run.mode.next(event);
        if next != run.mode {
            log::info!("outbox: {} -> {} ({event:?})", run.mode.name(), next.name());
            run.mode = next;
            self.stats.set_local_broker(next);
        }
    }

    /// Logs the drops counted since the last log line, at most once per interval.
    fn log_drops(&self, run: &mut Run, force: bool) {
        if run.drops.is_empty() || (!force && run.last_drop_log.elapsed() < DROP_LOG_INTERVAL) {
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

    /// Waits up to `deadline` for librdkafka to deliver what it holds.
    pub fn flush(producer: &FutureProducer, deadline: Duration) {
        if let Err(e) = producer.flush(deadline) {
            log::warn!("producer flush: {e}");
        }
    }
}
