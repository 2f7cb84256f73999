//! The delivery state with a broker that answers, but late: timeouts turn the outbox Slow (not
//! Offline) unless a probe fails, the drain backs off instead of giving up, and mode changes are
//! rate-limited. Time is passed in through ticks.

use super::tests::*;
use super::*;
use crate::records::RecordKind;

const S: Duration = Duration::from_secs(1);
const MS: Duration = Duration::from_millis(1);

/// The packaged defaults where they matter here (divert after 5 s), the loop's dwell and pause.
fn slow_delivery() -> Delivery {
    Delivery::new(
        DeliveryConfig {
            slow_inflight_bytes: 10_000,
            probe_interval: S,
            drain_window: 8,
            divert_after: 5 * S,
            min_dwell: 2 * S,
            max_dwell: 60 * S,
            min_pause: 250 * MS,
            max_pause: 8 * S,
        },
        planner(),
    )
}

fn at(d: &mut Delivery, now: Instant) -> Vec<Action> {
    d.handle(Event::Tick { now }, true)
}

fn changes(actions: &[Action]) -> Vec<(Mode, Mode)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ModeChanged { from, to, .. } => Some((*from, *to)),
            _ => None,
        })
        .collect()
}

fn late(id: FrameId, index: usize) -> Event {
    Event::Failed {
        id,
        index,
        refusal: Refusal::Retriable,
        error: "Local: Message timed out".into(),
        timed_out: true,
    }
}

fn drain_late(seq: Seq) -> Event {
    Event::DrainFailed {
        seq,
        refusal: Refusal::Retriable,
        error: "Local: Message timed out".into(),
        timed_out: true,
    }
}

/// Online at `t0`: the way online from the start is not held by the dwell (nothing backed off
/// yet).
fn online_at(t0: Instant) -> Delivery {
    let mut d = slow_delivery();
    assert_eq!(at(&mut d, t0), [Action::Probe]);
    d.handle(Event::Probe { ok: true }, true);
    assert_eq!(d.mode(), Mode::CatchUp);
    assert!(matches!(at(&mut d, t0)[..], [Action::ReadSpool { .. }]));
    let out = d.handle(Event::SpoolRead { batch: vec![] }, true);
    assert_eq!(changes(&out), [(Mode::CatchUp, Mode::Online)]);
    d
}

fn actions_have_probe(actions: &[Action]) -> bool {
    actions.contains(&Action::Probe)
}

#[test]
fn a_timeout_while_the_broker_answers_turns_slow_spools_new_frames_and_probes_nothing() {
    let t0 = Instant::now();
    let mut d = online_at(t0);
    at(&mut d, t0 + 3 * S);
    d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    d.handle(
        Event::Finished {
            id: 2,
            records: frame("b"),
        },
        true,
    );
    d.handle(Event::Delivered { id: 1, index: 0 }, true);
    d.handle(Event::Delivered { id: 1, index: 1 }, true);
    at(&mut d, t0 + 8 * S);
    let out = d.handle(late(2, 0), true);
    assert_eq!(changes(&out), [(Mode::Online, Mode::Slow)]);
    assert!(
        !actions_have_probe(&out),
        "frame 1's acks 5 s ago show the broker answers"
    );
    let out = d.handle(
        Event::Finished {
            id: 3,
            records: frame("c"),
        },
        true,
    );
    assert!(
        produced(&out).is_empty(),
        "new frames go to the spool while slow"
    );
    assert_eq!(
        spooled(&out),
        [(3, vec![RecordKind::Frame, RecordKind::Result])]
    );
    let out = d.handle(late(2, 1), true);
    assert!(changes(&out).is_empty(), "still slow, not offline");
    let out = d.handle(
        Event::Spooled {
            stored: vec![3],
            flushed: true,
        },
        true,
    );
    assert_eq!(acks(&out), [(3, true)]);
    let out = at(&mut d, t0 + 8 * S);
    assert_eq!(
        spooled(&out),
        [(2, vec![RecordKind::Frame, RecordKind::Result])],
        "the late frame goes to the spool and is acked from there"
    );
    assert_eq!(d.slow_timeouts(), 2);
}

#[test]
fn a_timeout_without_an_answer_probes_and_a_failed_probe_goes_offline() {
    let t0 = Instant::now();
    let mut d = online_at(t0);
    d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    at(&mut d, t0 + 8 * S); // last answer: the probe at t0
    let out = d.handle(late(1, 0), true);
    assert_eq!(changes(&out), [(Mode::Online, Mode::Slow)]);
    assert!(actions_have_probe(&out));
    assert!(
        !actions_have_probe(&d.handle(late(1, 1), true)),
        "one probe at a time"
    );
    let out = d.handle(Event::Probe { ok: false }, true);
    assert_eq!(changes(&out), [(Mode::Slow, Mode::Offline)]);
    assert_eq!(d.slow_timeouts(), 0, "not slow: away");
    assert!(
        !actions_have_probe(&at(&mut d, t0 + 8 * S + 500 * MS)),
        "probe interval"
    );
    assert!(actions_have_probe(&at(&mut d, t0 + 9 * S)));
}

#[test]
fn a_successful_probe_keeps_it_slow_and_it_catches_up_after_the_dwell() {
    let t0 = Instant::now();
    let mut d = online_at(t0);
    d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    let t1 = t0 + 8 * S;
    at(&mut d, t1);
    d.handle(late(1, 0), true);
    d.handle(late(1, 1), true);
    assert!(changes(&d.handle(Event::Probe { ok: true }, true)).is_empty());
    assert_eq!(d.mode(), Mode::Slow);
    assert!(changes(&at(&mut d, t1 + S)).is_empty(), "dwell: 2 s");
    let out = at(&mut d, t1 + 2 * S);
    assert_eq!(changes(&out), [(Mode::Slow, Mode::CatchUp)]);
}

#[test]
fn a_refusal_that_is_no_timeout_still_goes_offline() {
    let t0 = Instant::now();
    let mut d = online_at(t0);
    d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    d.handle(late(1, 0), true);
    let out = d.handle(failed(1, 1, Refusal::Retriable), true);
    assert_eq!(changes(&out), [(Mode::Slow, Mode::Offline)]);
}

#[test]
fn a_drained_record_late_among_others_keeps_catching_up_with_a_smaller_window_and_a_pause() {
    let t0 = Instant::now();
    let mut d = slow_delivery();
    at(&mut d, t0);
    d.handle(Event::Probe { ok: true }, true);
    assert_eq!(
        at(&mut d, t0),
        [Action::ReadSpool {
            after: None,
            max: 8
        }]
    );
    let batch = (1..=8)
        .map(|s| (s, record(RecordKind::Frame, "a", 10)))
        .collect();
    d.handle(Event::SpoolRead { batch }, true);
    d.handle(Event::DrainDelivered { seq: 1 }, true);
    let t1 = t0 + 5 * S;
    let out = at(&mut d, t1);
    assert_eq!(
        out[1],
        Action::ReadSpool {
            after: Some(8),
            max: 1
        }
    );
    d.handle(Event::SpoolRead { batch: vec![] }, true); // nothing newer
    for seq in 2..=8 {
        let out = d.handle(drain_late(seq), true);
        assert!(
            changes(&out).is_empty(),
            "a slow broker is not away: {out:?}"
        );
        assert!(
            !actions_have_probe(&out),
            "seq 1's ack shows the broker answers"
        );
    }
    assert_eq!(d.drain_window(), 4, "halved once for the whole flight");
    assert!(d.drain_pause() >= 250 * MS);
    assert_eq!(at(&mut d, t1 + 100 * MS), [], "paused");
    let out = at(&mut d, t1 + S);
    assert_eq!(
        out,
        [Action::ReadSpool {
            after: None,
            max: 4
        }],
        "starts over from the oldest, fewer at once"
    );
    assert_eq!(d.slow_timeouts(), 7);
}

#[test]
fn drained_records_late_among_others_are_never_dead_lettered() {
    let t0 = Instant::now();
    let mut d = slow_delivery();
    at(&mut d, t0);
    d.handle(Event::Probe { ok: true }, true);
    let mut now = t0;
    for round in 0..(MAX_DRAIN_ATTEMPTS * 3) {
        now += 10 * S;
        let out = at(&mut d, now);
        let Some(Action::ReadSpool { max, .. }) = out.last() else {
            panic!("round {round}: {out:?}");
        };
        let batch: Vec<_> = (1..=*max as u64)
            .map(|s| (s, record(RecordKind::Frame, "a", 10)))
            .collect();
        let n = batch.len() as u64;
        d.handle(Event::SpoolRead { batch }, true);
        if n == 1 {
            // Window 1: alone; give it its ack so that it is not late alone.
            d.handle(Event::DrainDelivered { seq: 1 }, true);
            continue;
        }
        d.handle(Event::DrainDelivered { seq: n }, true);
        for seq in 1..n {
            let out = d.handle(drain_late(seq), true);
            assert!(
                !out.iter().any(|a| matches!(a, Action::Refused { .. })),
                "round {round}: {out:?}"
            );
        }
        assert_eq!(d.mode(), Mode::CatchUp);
    }
}

#[test]
fn a_record_late_even_alone_counts_its_tries() {
    let t0 = Instant::now();
    let mut d = slow_delivery();
    at(&mut d, t0);
    d.handle(Event::Probe { ok: true }, true);
    let mut now = t0;
    // Cut the window down to one.
    while d.drain_window() > 1 {
        now += 10 * S;
        at(&mut d, now);
        let batch = vec![
            (1, record(RecordKind::Frame, "a", 10)),
            (2, record(RecordKind::Frame, "a", 10)),
        ];
        d.handle(Event::SpoolRead { batch }, true);
        d.handle(Event::DrainDelivered { seq: 2 }, true);
        d.handle(drain_late(1), true);
    }
    let mut refused = false;
    for _ in 0..MAX_DRAIN_ATTEMPTS {
        now += 10 * S;
        assert_eq!(
            at(&mut d, now).last(),
            Some(&Action::ReadSpool {
                after: None,
                max: 1
            })
        );
        let batch = vec![(1, record(RecordKind::Frame, "a", 10))];
        d.handle(Event::SpoolRead { batch }, true);
        let out = d.handle(drain_late(1), true);
        refused |= out.iter().any(|a| matches!(a, Action::Refused { .. }));
    }
    assert!(
        refused,
        "a record no broker takes in time is dead-lettered after bounded tries"
    );
}

#[test]
fn an_answer_while_offline_waits_out_the_dwell() {
    let t0 = Instant::now();
    let mut d = online_at(t0);
    d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    d.handle(failed(1, 0, Refusal::Retriable), true);
    at(&mut d, t0 + 3 * S);
    let out = d.handle(failed(1, 1, Refusal::Retriable), true);
    assert_eq!(changes(&out), [(Mode::Online, Mode::Offline)]);
    // Offline 1 s after going online: an oscillation; the dwell doubles to 4 s.
    assert_eq!(d.dwell(), 4 * S);
    assert!(actions_have_probe(&at(&mut d, t0 + 3 * S)));
    assert!(changes(&d.handle(Event::Probe { ok: true }, true)).is_empty());
    assert!(
        !actions_have_probe(&at(&mut d, t0 + 5 * S)),
        "answered: no more probes"
    );
    assert!(changes(&at(&mut d, t0 + 6 * S)).is_empty());
    assert_eq!(
        changes(&at(&mut d, t0 + 7 * S)),
        [(Mode::Offline, Mode::CatchUp)]
    );
}

/// Does what the loop would for spool writes and reads (the spool is always empty: its records
/// were acknowledged), returning the mode changes among `actions` and what followed.
fn drive(d: &mut Delivery, actions: Vec<Action>) -> usize {
    let mut n = 0;
    for a in actions {
        let next = match a {
            Action::ModeChanged { .. } => {
                n += 1;
                continue;
            }
            Action::Spool(frames) => Event::Spooled {
                stored: frames.iter().map(|f| f.0).collect(),
                flushed: true,
            },
            Action::ReadSpool { .. } => Event::SpoolRead { batch: vec![] },
            _ => continue,
        };
        let more = d.handle(next, true);
        n += drive(d, more);
    }
    n
}

/// A broker that answers every record late, for a minute of simulated time: every frame sent
/// straight times out (while other acks arrive). Without the dwell the outbox would go
/// online -> slow -> catch-up -> online every few ticks; with it the dwell doubles after each
/// oscillation (2, 4, 8, 16, 32 s), so a minute holds at most a handful of cycles.
#[test]
fn a_broker_slow_for_a_minute_changes_the_mode_only_a_few_times() {
    let t0 = Instant::now();
    let mut d = online_at(t0);
    let mut n_changes = 0;
    let mut id = 100;
    let mut now = t0 + 2 * S;
    while now < t0 + 62 * S {
        now += 100 * MS;
        let out = at(&mut d, now);
        n_changes += drive(&mut d, out);
        id += 1;
        let out = d.handle(
            Event::Finished {
                id,
                records: frame("x"),
            },
            true,
        );
        let sent = !produced(&out).is_empty();
        n_changes += drive(&mut d, out);
        if sent {
            // The broker answers (another record's ack), but this frame is late.
            d.last_answer = Some(now);
            let out = d.handle(late(id, 0), true);
            n_changes += drive(&mut d, out);
            let out = d.handle(late(id, 1), true);
            n_changes += drive(&mut d, out);
        }
    }
    // Cycles start at 2 s (online), then after 2+2, 4+4, 8+8, 16+16 s of dwell: at most 5 in a
    // minute, 3 changes each.
    assert!(n_changes <= 15, "{n_changes} mode changes");
    assert!(n_changes >= 6, "the slow broker was noticed: {n_changes}");
    assert!(d.dwell() >= 16 * S, "{:?}", d.dwell());
    assert!(d.slow_timeouts() >= 4, "{}", d.slow_timeouts());
}

/// What the loop's spool does, in memory: appends frames' records under increasing seqs, reads
/// after a position, removes. Lets a test check what the delivery state never sees itself:
/// whether records are left in the spool.
#[derive(Default)]
struct MemSpool {
    records: BTreeMap<Seq, Record>,
    next: Seq,
}

impl MemSpool {
    fn append(&mut self, records: &[Record]) {
        for r in records {
            self.next += 1;
            self.records.insert(self.next, r.clone());
        }
    }

    fn read(&self, after: Option<Seq>, max: usize) -> Vec<(Seq, Record)> {
        let from = after.map_or(0, |s| s + 1);
        self.records
            .range(from..)
            .take(max)
            .map(|(s, r)| (*s, r.clone()))
            .collect()
    }

    /// Performs the spool's actions among `actions` at once (the reads too, unless `hold_reads`:
    /// then they are returned, answered from the spool as it is now, for the test to deliver
    /// later), reporting back to `d`; returns the records handed to the producer, by seq.
    fn perform(
        &mut self,
        d: &mut Delivery,
        actions: Vec<Action>,
        hold_reads: bool,
        held: &mut Vec<Vec<(Seq, Record)>>,
    ) -> Vec<Seq> {
        let mut produced = Vec::new();
        for a in actions {
            let next = match a {
                Action::Spool(frames) => {
                    for (_, records) in &frames {
                        let records: Vec<Record> = records.iter().map(|r| (**r).clone()).collect();
                        self.append(&records);
                    }
                    Event::Spooled {
                        stored: frames.iter().map(|f| f.0).collect(),
                        flushed: true,
                    }
                }
                Action::ReadSpool { after, max } => {
                    let batch = self.read(after, max);
                    if hold_reads {
                        held.push(batch);
                        continue;
                    }
                    Event::SpoolRead { batch }
                }
                Action::Remove(seqs) => {
                    for s in seqs {
                        self.records.remove(&s);
                    }
                    continue;
                }
                Action::ProduceDrained { seq, .. } => {
                    produced.push(seq);
                    continue;
                }
                _ => continue,
            };
            let more = d.handle(next, true);
            produced.extend(self.perform(d, more, hold_reads, held));
        }
        produced
    }
}

/// The third slow_broker run: a spool read asked for while drained records were in flight came
/// back after one of them had timed out. Taking it moved the round that had just started over
/// past the late record; the spool then looked drained and the outbox went online with that
/// record (57 of them in that run) still in the spool, to stay there until the next outage.
/// The stale read must be dropped, and the outbox go online only with an empty spool.
#[test]
fn a_spool_read_asked_for_before_a_drained_record_timed_out_strands_nothing() {
    let t0 = Instant::now();
    let mut d = slow_delivery();
    let mut spool = MemSpool::default();
    let mut held = Vec::new();
    spool.append(&frame("old")); // seqs 1, 2: spooled in an earlier outage
    at(&mut d, t0);
    d.handle(Event::Probe { ok: true }, true);
    assert_eq!(d.mode(), Mode::CatchUp);
    let out = at(&mut d, t0);
    assert_eq!(spool.perform(&mut d, out, false, &mut held), [1, 2]);
    // A frame finishing during catch-up joins the spool's tail: seqs 3, 4.
    let out = d.handle(
        Event::Finished {
            id: 1,
            records: frame("new"),
        },
        true,
    );
    assert!(spool.perform(&mut d, out, false, &mut held).is_empty());
    d.handle(Event::DrainDelivered { seq: 2 }, true);
    // The next tick removes seq 2 and asks for more after it; the read is slow to come back.
    let t1 = t0 + S;
    let out = at(&mut d, t1);
    assert!(
        out.contains(&Action::ReadSpool {
            after: Some(2),
            max: 7
        }),
        "{out:?}"
    );
    spool.perform(&mut d, out, true, &mut held);
    let stale = held.pop().expect("a read asked for");
    assert_eq!(stale.iter().map(|(s, _)| *s).collect::<Vec<_>>(), [3, 4]);
    // Meanwhile seq 1, late among others, times out: the round starts over from the oldest.
    d.handle(drain_late(1), true);
    assert_eq!(d.mode(), Mode::CatchUp);
    let out = d.handle(Event::SpoolRead { batch: stale }, true);
    assert!(
        drained(&out).is_empty(),
        "the read from before the timeout is dropped: {out:?}"
    );
    // The loop goes on: every read answered at once, every drained record acknowledged.
    let mut now = t1;
    let mut resent = Vec::new();
    while d.mode() != Mode::Online {
        now += 100 * MS;
        assert!(
            now < t1 + 60 * S,
            "never online; spool: {:?}",
            spool.records
        );
        let out = at(&mut d, now);
        let sent = spool.perform(&mut d, out, false, &mut held);
        for seq in sent {
            resent.push(seq);
            let more = d.handle(Event::DrainDelivered { seq }, true);
            spool.perform(&mut d, more, false, &mut held);
        }
    }
    assert_eq!(resent, [1, 3, 4], "the late record is drained again, first");
    assert!(
        spool.records.is_empty(),
        "online with records left in the spool: {:?}",
        spool.records.keys()
    );
}
