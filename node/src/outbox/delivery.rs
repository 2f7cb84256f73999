//! The outbox's delivery state as data: a plain struct that takes [`Event`]s (a frame finished, a
//! record acknowledged or refused, frames spooled, a spool read, a probe's answer, a tick) and
//! returns [`Action`]s (produce, spool, flush, acknowledge a frame, read or remove spooled
//! records, probe, rebuild the producer). It does no I/O; the loop in `outbox/mod.rs` does, and
//! reports back. Unit tests drive every transition and refusal class without a broker.
//!
//! The promise it keeps: a frame is acknowledged ([`Action::Ack`]) only when **every** record
//! about it is acknowledged by the broker or durably in the spool (appended *and* flushed).
//!
//! Refusals ([`Refusal`]) of a record:
//! - **retriable** (broker away, slow, leader moving): the frame's unacknowledged records go to
//!   the spool, the mode turns [`Mode::Offline`], and they are drained when a probe succeeds.
//!   A **timeout** (not acknowledged within `spool.divert_after_ms`) is retriable too, but says
//!   only that the broker did not answer in time: the mode turns [`Mode::Slow`] (a drain keeps
//!   catching up and backs off, [`Pace`]); if nothing was acknowledged within the last
//!   `divert_after`, a probe asks whether the broker is there at all, and only a failed probe
//!   makes it Offline. Changes towards sending more are rate-limited ([`Dwell`]). A
//!   spooled record that keeps failing while the broker is otherwise fine is given
//!   [`MAX_DRAIN_ATTEMPTS`] tries, then treated as permanent: the outbox never flaps between
//!   offline and catch-up over one record.
//! - **permanent** (too large, invalid, not authorized): the record is replaced by a
//!   `record-refused` dead letter (built by [`RecordPlanner::refused`]) and the frame is
//!   acknowledged when that is durable. A spooled record is removed only once its dead letter is
//!   acknowledged. A dead letter refused permanently has nothing left to stand in for it: it is
//!   given up, counted ([`Action::GiveUp`]) and logged with its record id.
//! - **fatal** (the idempotent producer lost its guarantees): [`Action::RebuildProducer`], and
//!   the record is handled as retriable.

use super::dwell::Dwell;
use super::pace::Pace;
use super::plan::RecordPlanner;
use super::state::{Event as ModeEvent, Mode};
use crate::records::{Record, Refusal};
use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Tries a spooled record gets against retriable errors before it counts as refused for good.
pub const MAX_DRAIN_ATTEMPTS: u32 = 5;

/// The outbox's id for a frame on its way (assigned by the loop, increasing).
pub type FrameId = u64;
/// A spooled record's sequence number.
pub type Seq = u64;

/// Settings (from `[spool]`).
#[derive(Debug, Clone)]
pub struct DeliveryConfig {
    /// Unacknowledged bytes at the producer above which the outbox turns Slow.
    pub slow_inflight_bytes: u64,
    /// Between probes of an unreachable broker.
    pub probe_interval: Duration,
    /// Spooled records handed to the producer at once while draining (the most: [`Pace`] cuts
    /// it while the broker is slow).
    pub drain_window: usize,
    /// `spool.divert_after_ms`: an acknowledgement within this long before a timeout shows that
    /// the broker answers (slow, not away).
    pub divert_after: Duration,
    /// Bounds of the dwell before a change towards sending more ([`Dwell`]).
    pub min_dwell: Duration,
    pub max_dwell: Duration,
    /// Bounds of the drain's pause after a timeout ([`Pace`]).
    pub min_pause: Duration,
    pub max_pause: Duration,
}

/// What happened.
#[derive(Debug)]
pub enum Event {
    /// A frame's records, in camera order (the loop's sequencer ordered them).
    Finished { id: FrameId, records: Vec<Record> },
    /// The broker acknowledged record `index` of frame `id` (sent straight).
    Delivered { id: FrameId, index: usize },
    /// Record `index` of frame `id` was refused (at enqueue or in its delivery report).
    Failed {
        id: FrameId,
        index: usize,
        refusal: Refusal,
        error: String,
        /// Not acknowledged within `divert_after` (librdkafka's message timeout).
        timed_out: bool,
    },
    /// The loop appended frames to the spool (in the order of [`Action::Spool`]) and flushed.
    /// `stored` were appended (a prefix of the frames asked for: the first one refused under
    /// backpressure, or whose write failed, stays held with everything after it, retried at the
    /// next tick); `flushed` says whether the flush that followed succeeded.
    Spooled { stored: Vec<FrameId>, flushed: bool },
    /// A later flush (after one that failed) succeeded or not.
    Flushed { ok: bool },
    /// Records read from the spool for draining (after an [`Action::ReadSpool`]); empty when
    /// there is nothing after the position asked for.
    SpoolRead { batch: Vec<(Seq, Record)> },
    /// Reading the spool failed (logged by the loop); the next tick reads again.
    SpoolReadFailed,
    /// A drained record (or the dead letter standing in for it) was acknowledged.
    DrainDelivered { seq: Seq },
    /// A drained record was refused.
    DrainFailed {
        seq: Seq,
        refusal: Refusal,
        error: String,
        /// Not acknowledged within `divert_after`.
        timed_out: bool,
    },
    /// A probe of the broker answered (and created the topics) or failed.
    Probe { ok: bool },
    /// Time passes.
    Tick { now: Instant },
}

/// What the loop must do.
#[derive(Debug, PartialEq)]
pub enum Action {
    /// Produce record `index` of frame `id`; report [`Event::Delivered`] or [`Event::Failed`].
    Produce {
        id: FrameId,
        index: usize,
        record: Arc<Record>,
    },
    /// Append these frames to the spool (each as one unit, in order, stopping at the first
    /// refused or failed), flush once, and report [`Event::Spooled`].
    Spool(Vec<(FrameId, Vec<Arc<Record>>)>),
    /// Flush the spool again (a flush failed earlier); report [`Event::Flushed`].
    Flush,
    /// Every record of frame `id` is durable: send its MQTT acknowledgement. `spooled`: through
    /// the spool (for the figures).
    Ack { id: FrameId, spooled: bool },
    /// Read up to `max` spooled records after `after`; report [`Event::SpoolRead`].
    ReadSpool { after: Option<Seq>, max: usize },
    /// Produce a spooled record (or its stand-in dead letter); report [`Event::DrainDelivered`]
    /// or [`Event::DrainFailed`].
    ProduceDrained { seq: Seq, record: Arc<Record> },
    /// Remove these spooled records (their records, or stand-ins, are in Kafka).
    Remove(Vec<Seq>),
    /// Probe the broker (create the topics); report [`Event::Probe`].
    Probe,
    /// The producer is unusable: make a new one.
    RebuildProducer,
    /// A dead letter was refused for good; nothing can stand in for it. Count and log it.
    GiveUp { record: Arc<Record>, error: String },
    /// A record was refused for good and replaced by a dead letter (for the figures and the log).
    Refused { record: Arc<Record>, error: String },
    /// The mode changed (for the log and the metrics).
    ModeChanged {
        from: Mode,
        to: Mode,
        why: ModeEvent,
    },
}

/// A frame sent straight to the broker, waiting for its acknowledgements.
#[derive(Debug)]
struct DirectFrame {
    records: Vec<Slot>,
    /// Records not yet acknowledged (or refused).
    open: usize,
    /// Some record failed retriably: when all are finished, the failed ones go to the spool.
    any_failed: bool,
    /// Some record was refused retriably (not merely timed out): the broker is away.
    refused: bool,
}

#[derive(Debug)]
struct Slot {
    record: Arc<Record>,
    bytes: u64,
    state: SlotState,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SlotState {
    Waiting,
    Acked,
    /// Failed retriably: goes to the spool.
    Failed,
}

/// A spooled record handed to the producer.
#[derive(Debug)]
struct Draining {
    bytes: u64,
    original: Arc<Record>,
    /// A dead letter was produced in its place (it was refused for good).
    replaced: bool,
    /// Its number from [`Pace::sent`].
    sent: u64,
    /// Handed out with a window of one: a timeout cannot be blamed on the others.
    alone: bool,
}

/// The delivery state. See the module doc.
#[derive(Debug)]
pub struct Delivery {
    cfg: DeliveryConfig,
    planner: RecordPlanner,
    mode: Mode,
    direct: BTreeMap<FrameId, DirectFrame>,
    inflight_bytes: u64,
    /// Frames waiting for the spool, oldest first.
    held: VecDeque<(FrameId, Vec<Arc<Record>>)>,
    /// A spool write is under way (its [`Event::Spooled`] not yet reported).
    spooling: bool,
    /// Frames appended to the spool whose flush failed: acknowledged after a good flush.
    unflushed: Vec<FrameId>,
    flushing: bool,
    draining: BTreeMap<Seq, Draining>,
    /// The last seq handed out in this drain round (`None`: start from the oldest).
    drain_after: Option<Seq>,
    reading: bool,
    /// Bumped when a drain round starts over ([`Delivery::start_over`]): a spool read asked for
    /// in an older round is stale and dropped, or it would move the new round past the records
    /// that made it start over.
    round: u64,
    read_round: u64,
    to_remove: Vec<Seq>,
    /// Retriable failures per spooled record (reset when the spool drains).
    attempts: HashMap<Seq, u32>,
    probing: bool,
    next_probe: Option<Instant>,
    /// The time of the last tick (events between ticks happen "now").
    now: Option<Instant>,
    /// When the broker last answered: an acknowledgement or a successful probe.
    last_answer: Option<Instant>,
    /// A probe succeeded while Offline but the dwell held the change to CatchUp back.
    answered: bool,
    pace: Pace,
    dwell: Dwell,
    /// Deliveries that timed out while the broker answered (slow, not away).
    slow_timeouts: u64,
}

impl Delivery {
    /// A node starts [`Mode::Offline`]: its first probe creates the topics.
    pub fn new(cfg: DeliveryConfig, planner: RecordPlanner) -> Delivery {
        Delivery {
            planner,
            mode: Mode::Offline,
            direct: BTreeMap::new(),
            inflight_bytes: 0,
            held: VecDeque::new(),
            spooling: false,
            unflushed: Vec::new(),
            flushing: false,
            draining: BTreeMap::new(),
            drain_after: None,
            reading: false,
            round: 0,
            read_round: 0,
            to_remove: Vec::new(),
            attempts: HashMap::new(),
            probing: false,
            next_probe: None,
            now: None,
            last_answer: None,
            answered: false,
            pace: Pace::new(cfg.drain_window, cfg.min_pause, cfg.max_pause),
            dwell: Dwell::new(cfg.min_dwell, cfg.max_dwell),
            slow_timeouts: 0,
            cfg,
        }
    }

    pub fn mode(&self) -> Mode {
        self.mode
    }

    /// Drained records allowed in flight at once (cut while the broker is slow).
    pub fn drain_window(&self) -> usize {
        self.pace.window()
    }

    /// How long the drain still pauses after a timeout, as of the last tick.
    pub fn drain_pause(&self) -> Duration {
        self.now.map_or(Duration::ZERO, |now| self.pace.pause(now))
    }

    /// The dwell a change towards sending more must wait out.
    pub fn dwell(&self) -> Duration {
        self.dwell.current()
    }

    /// Deliveries that timed out while the broker answered (slow, not away).
    pub fn slow_timeouts(&self) -> u64 {
        self.slow_timeouts
    }

    /// Whether the loop should take the next finished frame: not while frames wait for the
    /// spool (that is the back-pressure to the workers and MQTT when the spool cannot take them).
    pub fn accepting(&self) -> bool {
        self.held.is_empty() && self.unflushed.is_empty()
    }

    /// Nothing is in flight at the producer or the spool: at shutdown the loop may stop (frames
    /// still held or unflushed stay un-acked and come back from the MQTT broker).
    pub fn settled(&self) -> bool {
        self.direct.is_empty()
            && self.draining.is_empty()
            && !self.spooling
            && !self.flushing
            && !self.reading
    }

    /// Frames not acknowledged yet: straight, held, or spooled but not flushed.
    pub fn frames_waiting(&self) -> usize {
        self.direct.len() + self.held.len() + self.unflushed.len()
    }

    /// Unacknowledged bytes at the producer for frames sent straight.
    pub fn inflight_bytes(&self) -> u64 {
        self.inflight_bytes
    }

    /// Spooled records whose Kafka acknowledgement came since the last tick: to be removed (the
    /// loop takes them at shutdown; otherwise each tick hands them out as [`Action::Remove`]).
    pub fn take_removals(&mut self) -> Vec<Seq> {
        std::mem::take(&mut self.to_remove)
    }

    /// Handles one event. `draining_allowed` is false at shutdown: no new drain rounds.
    pub fn handle(&mut self, event: Event, draining_allowed: bool) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Finished { id, records } => self.on_finished(id, records, &mut out),
            Event::Delivered { id, index } => {
                self.last_answer = self.now;
                self.on_direct(id, index, None, &mut out)
            }
            Event::Failed {
                id,
                index,
                refusal,
                error,
                timed_out,
            } => self.on_direct(id, index, Some((refusal, error, timed_out)), &mut out),
            Event::Spooled { stored, flushed } => {
                self.on_spooled(stored, flushed, &mut out);
                // What is left waits for the next tick (no busy retry of a full spool).
                return out;
            }
            Event::Flushed { ok } => {
                self.flushing = false;
                if ok {
                    for id in std::mem::take(&mut self.unflushed) {
                        out.push(Action::Ack { id, spooled: true });
                    }
                }
            }
            Event::SpoolRead { batch } => self.on_spool_read(batch, &mut out),
            Event::SpoolReadFailed => self.reading = false,
            Event::DrainDelivered { seq } => {
                self.last_answer = self.now;
                if self.draining.remove(&seq).is_some() {
                    self.pace.acked();
                    self.attempts.remove(&seq);
                    self.to_remove.push(seq);
                }
            }
            Event::DrainFailed {
                seq,
                refusal,
                error,
                timed_out,
            } => self.on_drain_failed(seq, refusal, error, timed_out, &mut out),
            Event::Probe { ok } => {
                self.probing = false;
                if ok {
                    self.last_answer = self.now;
                    if self.mode == Mode::Offline {
                        // The dwell may hold the change back: the next tick makes it.
                        self.answered = true;
                        self.relax(ModeEvent::ProbeSucceeded, &mut out);
                    }
                } else {
                    self.transition(ModeEvent::ProbeFailed, &mut out);
                }
            }
            Event::Tick { now } => self.on_tick(now, draining_allowed, &mut out),
        }
        self.spool_held(&mut out);
        out
    }

    /// A change towards sending more: only once the dwell has passed (else nothing happens, and
    /// the caller's condition is checked again at a later tick).
    fn relax(&mut self, why: ModeEvent, out: &mut Vec<Action>) {
        let Some(now) = self.now else {
            return; // no tick yet: no time to measure the dwell against
        };
        if self.dwell.may_relax(now) {
            self.transition(why, out);
        }
    }

    /// A record was not acknowledged in time. Slow unless proven away: without an answer from
    /// the broker within the last `divert_after`, a probe decides ([`ModeEvent::ProbeFailed`]).
    fn timed_out(&mut self, out: &mut Vec<Action>) {
        let answers = match (self.now, self.last_answer) {
            (Some(now), Some(t)) => now.saturating_duration_since(t) <= self.cfg.divert_after,
            _ => false,
        };
        if answers {
            self.slow_timeouts += 1;
        } else if !self.probing && self.mode != Mode::Offline {
            self.probing = true;
            out.push(Action::Probe);
        }
        self.transition(ModeEvent::DeliveryTimedOut, out);
    }

    fn transition(&mut self, why: ModeEvent, out: &mut Vec<Action>) {
        let next = self.mode.next(why);
        if next != self.mode {
            if let Some(now) = self.now {
                self.dwell.changed(now, self.mode.relaxes_to(next));
            }
            if next == Mode::CatchUp {
                self.answered = false;
            }
            out.push(Action::ModeChanged {
                from: self.mode,
                to: next,
                why,
            });
            if next == Mode::Offline {
                // A new drain round starts from the oldest record once the broker is back.
                self.start_over();
                // A probe has just failed: the next waits its interval. Otherwise probe at once.
                self.next_probe = match why {
                    ModeEvent::ProbeFailed => self.now.map(|now| now + self.cfg.probe_interval),
                    _ => None,
                };
            }
            self.mode = next;
        }
    }

    /// The next drain round starts from the oldest spooled record: some record before
    /// `drain_after` is still in the spool (it timed out, or the broker went away). A spool read
    /// still under way answers the old round's position and is dropped when it comes back
    /// ([`Delivery::on_spool_read`]); taken, it would move the new round past that record, the
    /// spool would look drained and the outbox go online with it left behind (57 records in the
    /// third slow_broker run).
    fn start_over(&mut self) {
        self.drain_after = None;
        self.round += 1;
    }

    fn on_finished(&mut self, id: FrameId, records: Vec<Record>, out: &mut Vec<Action>) {
        if self.mode == Mode::Online && self.inflight_bytes > self.cfg.slow_inflight_bytes {
            self.transition(ModeEvent::InflightAbove, out);
        }
        let records: Vec<Arc<Record>> = records.into_iter().map(Arc::new).collect();
        if self.mode.spools() {
            self.held.push_back((id, records));
            return;
        }
        let mut frame = DirectFrame {
            records: Vec::with_capacity(records.len()),
            open: records.len(),
            any_failed: false,
            refused: false,
        };
        for (index, record) in records.into_iter().enumerate() {
            let bytes = record.size() as u64;
            self.inflight_bytes += bytes;
            out.push(Action::Produce {
                id,
                index,
                record: record.clone(),
            });
            frame.records.push(Slot {
                record,
                bytes,
                state: SlotState::Waiting,
            });
        }
        if frame.open == 0 {
            out.push(Action::Ack { id, spooled: false });
        } else {
            self.direct.insert(id, frame);
        }
    }

    fn on_direct(
        &mut self,
        id: FrameId,
        index: usize,
        failure: Option<(Refusal, String, bool)>,
        out: &mut Vec<Action>,
    ) {
        let waiting = |d: &Self| {
            d.direct
                .get(&id)
                .and_then(|f| f.records.get(index))
                .is_some_and(|s| s.state == SlotState::Waiting)
        };
        if !waiting(self) {
            return; // unknown, or reported twice: ignore
        }
        if matches!(failure, Some((Refusal::Retriable, _, true))) {
            // Spool new frames now, not when this frame's last record is answered.
            self.timed_out(out);
        }
        let Some(frame) = self.direct.get_mut(&id) else {
            return;
        };
        let Some(slot) = frame.records.get_mut(index) else {
            return;
        };
        let refused_for_good = match failure {
            None => {
                slot.state = SlotState::Acked;
                None
            }
            Some((Refusal::Permanent, error, _)) => Some(error),
            Some((refusal, _, late)) => {
                if refusal == Refusal::Fatal {
                    out.push(Action::RebuildProducer);
                }
                slot.state = SlotState::Failed;
                frame.any_failed = true;
                frame.refused |= !(late && refusal == Refusal::Retriable);
                None
            }
        };
        if let Some(error) = refused_for_good {
            // The slot stays open: its stand-in dead letter takes its place.
            let original = slot.record.clone();
            if RecordPlanner::is_dead_letter(&original) {
                out.push(Action::GiveUp {
                    record: original,
                    error,
                });
                slot.state = SlotState::Acked;
            } else {
                let letter = Arc::new(self.planner.refused(&original, &error));
                self.inflight_bytes = self.inflight_bytes - slot.bytes + letter.size() as u64;
                slot.bytes = letter.size() as u64;
                slot.record = letter.clone();
                out.push(Action::Refused {
                    record: original,
                    error,
                });
                if self.mode.spools() {
                    // Going to the spool anyway: let the stand-in travel with it.
                    slot.state = SlotState::Failed;
                    frame.any_failed = true;
                } else {
                    out.push(Action::Produce {
                        id,
                        index,
                        record: letter,
                    });
                    return;
                }
            }
        }
        self.inflight_bytes = self.inflight_bytes.saturating_sub(slot.bytes);
        frame.open -= 1;
        if frame.open > 0 {
            return;
        }
        let Some(frame) = self.direct.remove(&id) else {
            return;
        };
        if !frame.any_failed {
            out.push(Action::Ack { id, spooled: false });
            return;
        }
        // Spool what the broker did not take; these are older than anything held since.
        let failed: Vec<Arc<Record>> = frame
            .records
            .into_iter()
            .filter(|s| s.state == SlotState::Failed)
            .map(|s| s.record)
            .collect();
        if frame.refused {
            // Refused, not merely late: away. (Timeouts were handled as they came.)
            self.transition(ModeEvent::DeliveryFailed, out);
        }
        self.held.push_front((id, failed));
    }

    fn spool_held(&mut self, out: &mut Vec<Action>) {
        if self.spooling || self.held.is_empty() || !self.unflushed.is_empty() {
            return;
        }
        self.spooling = true;
        out.push(Action::Spool(self.held.iter().cloned().collect()));
    }

    fn on_spooled(&mut self, stored: Vec<FrameId>, flushed: bool, out: &mut Vec<Action>) {
        self.spooling = false;
        for id in &stored {
            if let Some(pos) = self.held.iter().position(|(h, _)| h == id) {
                self.held.remove(pos);
            }
        }
        if flushed {
            for id in stored {
                out.push(Action::Ack { id, spooled: true });
            }
        } else {
            self.unflushed.extend(stored);
        }
    }

    fn on_spool_read(&mut self, batch: Vec<(Seq, Record)>, out: &mut Vec<Action>) {
        self.reading = false;
        if !self.mode.drains() {
            return; // the broker went away while reading: the next round starts over
        }
        if self.read_round != self.round {
            return; // asked for before the round started over: stale
        }
        if batch.is_empty() {
            // Frames still waiting for the spool must go through it first: going online now
            // would strand them there until the next outage.
            if self.draining.is_empty()
                && self.to_remove.is_empty()
                && self.held.is_empty()
                && self.unflushed.is_empty()
                && !self.spooling
            {
                // Not while the broker has just been late: back online it would be late again.
                let quiet = match (self.now, self.pace.last_timeout()) {
                    (Some(now), Some(t)) => {
                        now.saturating_duration_since(t) >= self.dwell.current()
                    }
                    _ => true,
                };
                if quiet {
                    self.attempts.clear();
                    self.relax(ModeEvent::SpoolDrained, out);
                }
            }
            return;
        }
        let alone = self.pace.window() == 1;
        for (seq, record) in batch {
            self.drain_after = Some(seq);
            let record = Arc::new(record);
            self.draining.insert(
                seq,
                Draining {
                    bytes: record.size() as u64,
                    original: record.clone(),
                    replaced: false,
                    sent: self.pace.sent(),
                    alone,
                },
            );
            out.push(Action::ProduceDrained { seq, record });
        }
    }

    fn on_drain_failed(
        &mut self,
        seq: Seq,
        refusal: Refusal,
        error: String,
        timed_out: bool,
        out: &mut Vec<Action>,
    ) {
        let Some(entry) = self.draining.get_mut(&seq) else {
            return;
        };
        let timed_out = timed_out && refusal == Refusal::Retriable;
        if timed_out && !entry.alone {
            // Late among others: the broker was offered too much at once. Not this record's
            // fault, so no try is counted; it stays in the spool and the next round starts over
            // from the oldest (once this round's records are answered), with a smaller window.
            let sent = entry.sent;
            self.draining.remove(&seq);
            if let Some(now) = self.now {
                self.pace.timed_out(sent, now);
            }
            self.start_over();
            self.timed_out(out);
            return;
        }
        let tries = self.attempts.entry(seq).or_default();
        *tries += 1;
        let for_good = refusal == Refusal::Permanent || *tries >= MAX_DRAIN_ATTEMPTS;
        if for_good && !entry.replaced {
            let original = entry.original.clone();
            if RecordPlanner::is_dead_letter(&original) {
                self.draining.remove(&seq);
                self.attempts.remove(&seq);
                self.to_remove.push(seq);
                out.push(Action::GiveUp {
                    record: original,
                    error,
                });
                return;
            }
            let letter = Arc::new(self.planner.refused(&original, &error));
            entry.replaced = true;
            entry.bytes = letter.size() as u64;
            out.push(Action::Refused {
                record: original,
                error,
            });
            out.push(Action::ProduceDrained {
                seq,
                record: letter,
            });
            return;
        }
        if for_good {
            // Its stand-in dead letter was refused for good too.
            let original = entry.original.clone();
            self.draining.remove(&seq);
            self.attempts.remove(&seq);
            self.to_remove.push(seq);
            out.push(Action::GiveUp {
                record: original,
                error: format!("its record-refused dead letter was refused too: {error}"),
            });
            return;
        }
        if refusal == Refusal::Fatal {
            out.push(Action::RebuildProducer);
        }
        let sent = entry.sent;
        self.draining.remove(&seq);
        if timed_out {
            // Late although alone: counted as a try (above), so a record the broker can never
            // take in time is dead-lettered after bounded tries rather than retried forever.
            if let Some(now) = self.now {
                self.pace.timed_out(sent, now);
            }
            self.start_over();
            self.timed_out(out);
            return;
        }
        self.transition(ModeEvent::DeliveryFailed, out);
    }

    fn on_tick(&mut self, now: Instant, draining_allowed: bool, out: &mut Vec<Action>) {
        self.now = Some(now);
        let removals = self.take_removals();
        if !removals.is_empty() {
            out.push(Action::Remove(removals));
        }
        if !self.unflushed.is_empty() && !self.flushing && !self.spooling {
            self.flushing = true;
            out.push(Action::Flush);
        }
        if self.mode == Mode::Slow && self.inflight_bytes < self.cfg.slow_inflight_bytes / 2 {
            self.relax(ModeEvent::InflightBelow, out);
        }
        if self.mode == Mode::Offline && self.answered {
            self.relax(ModeEvent::ProbeSucceeded, out);
        }
        if self.mode == Mode::Offline && !self.probing && !self.answered {
            let due = *self.next_probe.get_or_insert(now);
            if now >= due {
                self.probing = true;
                self.next_probe = Some(now + self.cfg.probe_interval);
                out.push(Action::Probe);
            }
        }
        if self.mode.drains() && draining_allowed && !self.reading {
            self.drain_more(out);
        }
    }

    fn drain_more(&mut self, out: &mut Vec<Action>) {
        if self.drain_after.is_none() && !self.draining.is_empty() {
            return; // a failed round's records are still in flight; start over after them
        }
        let in_flight: u64 = self.draining.values().map(|d| d.bytes).sum();
        let room = match self.now {
            Some(now) => self.pace.room(self.draining.len(), now),
            None => 0,
        };
        if room == 0 || in_flight > self.cfg.slow_inflight_bytes / 2 {
            return;
        }
        self.reading = true;
        self.read_round = self.round;
        out.push(Action::ReadSpool {
            after: self.drain_after,
            max: room,
        });
    }
}

#[cfg(test)]
#[path = "delivery_tests.rs"]
mod tests;

#[cfg(test)]
#[path = "slow_tests.rs"]
mod slow_tests;
