//! The delivery state driven event by event, as the loop would, without a broker or a spool.

use super::*;
use crate::config::{Config, LargeFramePolicy};
use crate::records::{RecordKind, RecordLimit};
use fovea_proto::headers as h;

pub(super) fn planner() -> RecordPlanner {
    RecordPlanner {
        node_id: "n1".into(),
        topics: Config::default().kafka.topics,
        limit: RecordLimit::new(1 << 20),
        large_policy: LargeFramePolicy::Chunk,
    }
}

pub(super) fn delivery() -> Delivery {
    Delivery::new(
        DeliveryConfig {
            slow_inflight_bytes: 10_000,
            probe_interval: Duration::from_secs(1),
            drain_window: 8,
            divert_after: Duration::from_secs(5),
            // No dwell and no pause: these tests are about where records go (the rate limit and
            // the pacing have their own tests, in slow_tests.rs).
            min_dwell: Duration::ZERO,
            max_dwell: Duration::ZERO,
            min_pause: Duration::ZERO,
            max_pause: Duration::ZERO,
        },
        planner(),
    )
}

pub(super) fn record(kind: RecordKind, id: &str, bytes: usize) -> Record {
    Record {
        kind,
        topic: format!("topic-{kind:?}"),
        key: "cam".into(),
        headers: vec![
            (h::SCHEMA.into(), kind.schema().into()),
            (h::RECORD_ID.into(), id.into()),
            (h::CAMERA.into(), "cam".into()),
        ],
        value: vec![0; bytes],
    }
}

pub(super) fn frame(id: &str) -> Vec<Record> {
    vec![
        record(RecordKind::Frame, id, 100),
        record(RecordKind::Result, id, 10),
    ]
}

/// A delivery that has probed the broker and drained an empty spool: online.
pub(super) fn online() -> Delivery {
    let mut d = delivery();
    let now = Instant::now();
    assert_eq!(d.handle(Event::Tick { now }, true), [Action::Probe]);
    d.handle(Event::Probe { ok: true }, true);
    let read = d.handle(Event::Tick { now }, true);
    assert!(
        matches!(read[..], [Action::ReadSpool { after: None, .. }]),
        "{read:?}"
    );
    d.handle(Event::SpoolRead { batch: vec![] }, true);
    assert_eq!(d.mode(), Mode::Online);
    d
}

/// Online, frame 1 ("a") sent straight: its frame record acknowledged, its result not yet.
fn result_outstanding() -> Delivery {
    let mut d = online();
    let records = frame("a");
    d.handle(Event::Finished { id: 1, records }, true);
    d.handle(Event::Delivered { id: 1, index: 0 }, true);
    d
}

pub(super) fn tick(d: &mut Delivery) -> Vec<Action> {
    d.handle(
        Event::Tick {
            now: Instant::now(),
        },
        true,
    )
}

pub(super) fn acks(actions: &[Action]) -> Vec<(FrameId, bool)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Ack { id, spooled } => Some((*id, *spooled)),
            _ => None,
        })
        .collect()
}

pub(super) fn produced(actions: &[Action]) -> Vec<(FrameId, usize, RecordKind)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Produce { id, index, record } => Some((*id, *index, record.kind)),
            _ => None,
        })
        .collect()
}

pub(super) fn spooled(actions: &[Action]) -> Vec<(FrameId, Vec<RecordKind>)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::Spool(frames) => Some(
                frames
                    .iter()
                    .map(|(id, rs)| (*id, rs.iter().map(|r| r.kind).collect())),
            ),
            _ => None,
        })
        .flatten()
        .collect()
}

pub(super) fn failed(id: FrameId, index: usize, refusal: Refusal) -> Event {
    Event::Failed {
        id,
        index,
        refusal,
        error: format!("{refusal:?} error"),
        timed_out: false,
    }
}

#[test]
fn online_a_frame_is_acked_when_every_record_is_acknowledged() {
    let mut d = online();
    let out = d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    assert_eq!(
        produced(&out),
        [(1, 0, RecordKind::Frame), (1, 1, RecordKind::Result)]
    );
    assert_eq!(
        d.inflight_bytes(),
        record(RecordKind::Frame, "a", 100).size() as u64
            + record(RecordKind::Result, "a", 10).size() as u64
    );
    assert!(acks(&d.handle(Event::Delivered { id: 1, index: 1 }, true)).is_empty());
    // Reported twice: no double count.
    assert!(acks(&d.handle(Event::Delivered { id: 1, index: 1 }, true)).is_empty());
    assert_eq!(
        acks(&d.handle(Event::Delivered { id: 1, index: 0 }, true)),
        [(1, false)]
    );
    assert_eq!(d.inflight_bytes(), 0);
    assert!(d.settled() && d.frames_waiting() == 0);
}

#[test]
fn a_retriable_failure_spools_the_unacknowledged_records_and_goes_offline() {
    let mut d = result_outstanding();
    let out = d.handle(failed(1, 1, Refusal::Retriable), true);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::ModeChanged {
            to: Mode::Offline,
            ..
        }
    )));
    assert_eq!(
        spooled(&out),
        [(1, vec![RecordKind::Result])],
        "only what the broker did not take"
    );
    assert!(acks(&out).is_empty(), "not acked before the spool flushed");
    assert!(!d.accepting());
    let out = d.handle(
        Event::Spooled {
            stored: vec![1],
            flushed: true,
        },
        true,
    );
    assert_eq!(acks(&out), [(1, true)]);
    assert!(d.accepting());
}

#[test]
fn a_permanently_refused_record_is_replaced_by_a_dead_letter_before_the_ack() {
    let mut d = result_outstanding();
    let out = d.handle(failed(1, 1, Refusal::Permanent), true);
    assert!(matches!(&out[0], Action::Refused { record, .. } if record.kind == RecordKind::Result));
    let [(1, 1, RecordKind::DeadLetter)] = produced(&out)[..] else {
        panic!("expected the stand-in dead letter in the result's place: {out:?}");
    };
    let letter = match &out[1] {
        Action::Produce { record, .. } => record.clone(),
        other => panic!("{other:?}"),
    };
    assert_eq!(letter.header(h::ERROR_KIND), Some("record-refused"));
    assert_eq!(letter.record_id(), Some("a"));
    assert!(acks(&out).is_empty());
    assert_eq!(d.mode(), Mode::Online, "a refusal is not an outage");
    assert_eq!(
        acks(&d.handle(Event::Delivered { id: 1, index: 1 }, true)),
        [(1, false)]
    );
}

#[test]
fn a_refused_dead_letter_is_given_up_and_the_frame_acked() {
    let mut d = online();
    let letter = record(RecordKind::DeadLetter, "x", 10);
    d.handle(
        Event::Finished {
            id: 1,
            records: vec![letter],
        },
        true,
    );
    let out = d.handle(failed(1, 0, Refusal::Permanent), true);
    assert!(matches!(&out[0], Action::GiveUp { record, .. } if record.record_id() == Some("x")));
    assert_eq!(acks(&out), [(1, false)]);
}

#[test]
fn a_stand_in_refused_in_turn_is_given_up() {
    let mut d = result_outstanding();
    d.handle(failed(1, 1, Refusal::Permanent), true);
    let out = d.handle(failed(1, 1, Refusal::Permanent), true);
    assert!(matches!(&out[0], Action::GiveUp { .. }), "{out:?}");
    assert_eq!(acks(&out), [(1, false)]);
}

#[test]
fn a_fatal_error_rebuilds_the_producer_and_keeps_the_record() {
    let mut d = result_outstanding();
    let out = d.handle(failed(1, 1, Refusal::Fatal), true);
    assert!(out.contains(&Action::RebuildProducer));
    assert_eq!(spooled(&out), [(1, vec![RecordKind::Result])]);
    assert_eq!(d.mode(), Mode::Offline);
}

#[test]
fn offline_frames_are_acked_only_after_the_spool_flushed() {
    let mut d = delivery();
    let out = d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    assert_eq!(
        spooled(&out),
        [(1, vec![RecordKind::Frame, RecordKind::Result])]
    );
    // Another frame while the write is under way waits for the next round.
    let out = d.handle(
        Event::Finished {
            id: 2,
            records: frame("b"),
        },
        true,
    );
    assert!(spooled(&out).is_empty());
    let out = d.handle(
        Event::Spooled {
            stored: vec![1],
            flushed: true,
        },
        true,
    );
    assert_eq!(acks(&out), [(1, true)]);
    let out = tick(&mut d);
    assert_eq!(
        spooled(&out),
        [(2, vec![RecordKind::Frame, RecordKind::Result])]
    );
}

#[test]
fn a_frame_the_spool_refuses_stays_held_and_unacked_until_it_fits() {
    let mut d = delivery();
    d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    let out = d.handle(
        Event::Spooled {
            stored: vec![],
            flushed: true,
        },
        true,
    );
    assert!(out.is_empty(), "no busy retry: {out:?}");
    assert!(
        !d.accepting(),
        "no new frames while one is held: back-pressure to MQTT"
    );
    assert_eq!(d.frames_waiting(), 1);
    let out = tick(&mut d);
    assert_eq!(
        spooled(&out),
        [(1, vec![RecordKind::Frame, RecordKind::Result])]
    );
    let out = d.handle(
        Event::Spooled {
            stored: vec![1],
            flushed: true,
        },
        true,
    );
    assert_eq!(acks(&out), [(1, true)]);
}

#[test]
fn a_failed_flush_keeps_frames_unacked_and_is_retried() {
    let mut d = delivery();
    d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        true,
    );
    let out = d.handle(
        Event::Spooled {
            stored: vec![1],
            flushed: false,
        },
        true,
    );
    assert!(acks(&out).is_empty());
    assert!(!d.accepting());
    let out = tick(&mut d);
    assert!(out.contains(&Action::Flush));
    assert!(
        !tick(&mut d).contains(&Action::Flush),
        "one flush at a time"
    );
    assert!(acks(&d.handle(Event::Flushed { ok: false }, true)).is_empty());
    assert!(tick(&mut d).contains(&Action::Flush));
    assert_eq!(
        acks(&d.handle(Event::Flushed { ok: true }, true)),
        [(1, true)]
    );
    assert!(d.accepting());
}

#[test]
fn offline_probes_at_its_interval_and_catches_up_when_the_broker_answers() {
    let mut d = delivery();
    let t0 = Instant::now();
    assert_eq!(d.handle(Event::Tick { now: t0 }, true), [Action::Probe]);
    assert!(
        d.handle(Event::Tick { now: t0 }, true).is_empty(),
        "one probe at a time"
    );
    d.handle(Event::Probe { ok: false }, true);
    assert!(
        d.handle(
            Event::Tick {
                now: t0 + Duration::from_millis(500)
            },
            true
        )
        .is_empty()
    );
    assert_eq!(
        d.handle(
            Event::Tick {
                now: t0 + Duration::from_secs(1)
            },
            true
        ),
        [Action::Probe]
    );
    let out = d.handle(Event::Probe { ok: true }, true);
    assert!(matches!(
        out[..],
        [Action::ModeChanged {
            from: Mode::Offline,
            to: Mode::CatchUp,
            ..
        }]
    ));
}

pub(super) fn catching_up() -> Delivery {
    let mut d = delivery();
    tick(&mut d);
    d.handle(Event::Probe { ok: true }, true);
    d
}

/// Catching up with spooled record `seq` (of `kind`) handed to the producer.
pub(super) fn draining_one(seq: Seq, kind: RecordKind) -> Delivery {
    let mut d = catching_up();
    tick(&mut d);
    let batch = vec![(seq, record(kind, "a", 10))];
    d.handle(Event::SpoolRead { batch }, true);
    d
}

pub(super) fn drain_failed(seq: Seq, refusal: Refusal, error: &str) -> Event {
    Event::DrainFailed {
        seq,
        refusal,
        error: error.into(),
        timed_out: false,
    }
}

pub(super) fn drained(actions: &[Action]) -> Vec<(Seq, RecordKind)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::ProduceDrained { seq, record } => Some((*seq, record.kind)),
            _ => None,
        })
        .collect()
}

#[test]
fn catch_up_drains_oldest_first_removes_what_was_acked_and_goes_online_when_empty() {
    let mut d = catching_up();
    assert_eq!(
        tick(&mut d),
        [Action::ReadSpool {
            after: None,
            max: 8
        }]
    );
    assert!(tick(&mut d).is_empty(), "one read at a time");
    let batch = vec![
        (3, record(RecordKind::Frame, "a", 10)),
        (4, record(RecordKind::Result, "a", 10)),
    ];
    let out = d.handle(Event::SpoolRead { batch }, true);
    assert_eq!(
        drained(&out),
        [(3, RecordKind::Frame), (4, RecordKind::Result)]
    );
    d.handle(Event::DrainDelivered { seq: 3 }, true);
    let out = tick(&mut d);
    assert_eq!(out[0], Action::Remove(vec![3]));
    assert_eq!(
        out[1],
        Action::ReadSpool {
            after: Some(4),
            max: 7
        }
    );
    d.handle(Event::SpoolRead { batch: vec![] }, true);
    assert_eq!(d.mode(), Mode::CatchUp, "4 is still in flight");
    d.handle(Event::DrainDelivered { seq: 4 }, true);
    let out = tick(&mut d);
    assert_eq!(out[0], Action::Remove(vec![4]));
    let out = d.handle(Event::SpoolRead { batch: vec![] }, true);
    assert!(matches!(
        out[..],
        [Action::ModeChanged {
            to: Mode::Online,
            ..
        }]
    ));
}

#[test]
fn new_frames_during_catch_up_go_through_the_spool_and_hold_the_switch_to_online() {
    let mut d = catching_up();
    let out = d.handle(
        Event::Finished {
            id: 7,
            records: frame("n"),
        },
        true,
    );
    assert_eq!(spooled(&out).len(), 1);
    tick(&mut d);
    d.handle(Event::SpoolRead { batch: vec![] }, true);
    assert_eq!(d.mode(), Mode::CatchUp, "frame 7 is not in the spool yet");
    d.handle(
        Event::Spooled {
            stored: vec![7],
            flushed: true,
        },
        true,
    );
    tick(&mut d);
    d.handle(Event::SpoolRead { batch: vec![] }, true);
    assert_eq!(d.mode(), Mode::Online);
}

#[test]
fn a_spooled_record_refused_for_good_is_removed_only_after_its_dead_letter_is_acked() {
    let mut d = draining_one(9, RecordKind::Result);
    let out = d.handle(drain_failed(9, Refusal::Permanent, "too large"), true);
    assert!(matches!(&out[0], Action::Refused { .. }));
    assert_eq!(drained(&out), [(9, RecordKind::DeadLetter)]);
    assert_eq!(d.mode(), Mode::CatchUp, "no flap to offline");
    assert!(!tick(&mut d).iter().any(|a| matches!(a, Action::Remove(_))));
    d.handle(Event::DrainDelivered { seq: 9 }, true);
    assert!(tick(&mut d).contains(&Action::Remove(vec![9])));
}

#[test]
fn a_stand_in_that_fails_retriably_keeps_the_original_in_the_spool() {
    let mut d = draining_one(9, RecordKind::Result);
    d.handle(drain_failed(9, Refusal::Permanent, "x"), true);
    let out = d.handle(drain_failed(9, Refusal::Retriable, "away"), true);
    assert!(out.iter().any(|a| matches!(
        a,
        Action::ModeChanged {
            to: Mode::Offline,
            ..
        }
    )));
    assert!(
        !tick(&mut d).iter().any(|a| matches!(a, Action::Remove(_))),
        "not removed"
    );
}

#[test]
fn a_record_that_keeps_failing_is_dead_lettered_after_bounded_tries_instead_of_flapping() {
    let mut d = catching_up();
    let mut cycles = 0;
    loop {
        cycles += 1;
        assert!(
            cycles <= MAX_DRAIN_ATTEMPTS,
            "still flapping after {cycles} rounds"
        );
        let read = tick(&mut d);
        assert!(
            read.iter()
                .any(|a| matches!(a, Action::ReadSpool { after: None, .. })),
            "{read:?}"
        );
        d.handle(
            Event::SpoolRead {
                batch: vec![(5, record(RecordKind::Frame, "a", 10))],
            },
            true,
        );
        let out = d.handle(drain_failed(5, Refusal::Retriable, "odd"), true);
        if let Some(Action::Refused { .. }) = out.first() {
            assert_eq!(drained(&out), [(5, RecordKind::DeadLetter)]);
            break;
        }
        assert_eq!(d.mode(), Mode::Offline);
        assert!(
            tick(&mut d).contains(&Action::Probe)
                || d.handle(
                    Event::Tick {
                        now: Instant::now() + Duration::from_secs(2)
                    },
                    true
                )
                .contains(&Action::Probe)
        );
        d.handle(Event::Probe { ok: true }, true);
    }
    assert_eq!(cycles, MAX_DRAIN_ATTEMPTS);
}

#[test]
fn a_fatal_drain_error_rebuilds_the_producer_and_goes_offline() {
    let mut d = draining_one(5, RecordKind::Frame);
    let out = d.handle(drain_failed(5, Refusal::Fatal, "fatal"), true);
    assert!(out.contains(&Action::RebuildProducer));
    assert_eq!(d.mode(), Mode::Offline);
}

#[test]
fn too_much_in_flight_turns_slow_and_the_broker_keeping_up_catches_up() {
    let mut d = online();
    d.handle(
        Event::Finished {
            id: 1,
            records: vec![record(RecordKind::Frame, "a", 20_000)],
        },
        true,
    );
    let out = d.handle(
        Event::Finished {
            id: 2,
            records: frame("b"),
        },
        true,
    );
    assert!(matches!(out[0], Action::ModeChanged { to: Mode::Slow, .. }));
    assert_eq!(
        spooled(&out),
        [(2, vec![RecordKind::Frame, RecordKind::Result])]
    );
    d.handle(
        Event::Spooled {
            stored: vec![2],
            flushed: true,
        },
        true,
    );
    assert!(tick(&mut d).is_empty(), "still 20 kB in flight");
    d.handle(Event::Delivered { id: 1, index: 0 }, true);
    let out = tick(&mut d);
    assert!(matches!(
        out[0],
        Action::ModeChanged {
            from: Mode::Slow,
            to: Mode::CatchUp,
            ..
        }
    ));
}

#[test]
fn shutdown_starts_no_drain_round_and_settles_with_held_frames_unacked() {
    let mut d = catching_up();
    assert!(
        d.handle(
            Event::Tick {
                now: Instant::now()
            },
            false
        )
        .is_empty()
    );
    d.handle(
        Event::Finished {
            id: 1,
            records: frame("a"),
        },
        false,
    );
    d.handle(
        Event::Spooled {
            stored: vec![],
            flushed: true,
        },
        false,
    );
    assert!(d.settled());
    assert_eq!(d.frames_waiting(), 1);
}

/// The broker goes away and comes back while a spool read is under way: the read answers the
/// old round's position, after the record that failed, and taking it would leave that record in
/// the spool when the outbox goes online.
#[test]
fn a_spool_read_from_before_an_outage_is_dropped_when_catching_up_again() {
    let mut d = catching_up();
    tick(&mut d);
    let batch = vec![
        (1, record(RecordKind::Frame, "a", 10)),
        (2, record(RecordKind::Result, "a", 10)),
    ];
    d.handle(Event::SpoolRead { batch }, true);
    d.handle(Event::DrainDelivered { seq: 2 }, true);
    let out = tick(&mut d);
    assert_eq!(
        out[1],
        Action::ReadSpool {
            after: Some(2),
            max: 7
        }
    );
    let out = d.handle(
        drain_failed(1, Refusal::Retriable, "broker transport failure"),
        true,
    );
    assert!(matches!(
        out[..],
        [Action::ModeChanged {
            to: Mode::Offline,
            ..
        }]
    ));
    assert_eq!(tick(&mut d), [Action::Probe]);
    d.handle(Event::Probe { ok: true }, true);
    assert_eq!(d.mode(), Mode::CatchUp);
    assert!(tick(&mut d).is_empty(), "one read at a time");
    let stale = vec![(3, record(RecordKind::Frame, "b", 10))];
    let out = d.handle(Event::SpoolRead { batch: stale }, true);
    assert!(drained(&out).is_empty(), "stale: {out:?}");
    assert_eq!(
        tick(&mut d),
        [Action::ReadSpool {
            after: None,
            max: 8
        }],
        "the new round starts from the oldest, seq 1"
    );
}
