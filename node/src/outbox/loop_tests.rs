//! The outbox loop with a test double for the broker (the [`Produce`] trait) and a real spool in
//! a temporary folder: what was finished, what was acknowledged, and what reached "Kafka".

use super::*;
use crate::config::{Config, LargeFramePolicy};
use crate::job::Ack;
use crate::job::{JobMeta, Verdict};
use crate::records::RecordLimit;
use crate::spool::{SledSpool, SpoolOptions, WhenFull};
use fovea_proto::v1::{DeadLetter, Frame, InferenceResult};
use prost::Message;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

/// A broker that takes records of at most `max_bytes` (larger ones are refused at once, as
/// librdkafka refuses a record over `message.max.bytes`), or nothing while `away`.
#[derive(Clone, Default)]
struct FakeBroker {
    max_bytes: usize,
    away: Arc<AtomicBool>,
    taken: Arc<Mutex<Vec<Record>>>,
}

impl Produce for FakeBroker {
    fn enqueue(
        &self,
        record: Arc<Record>,
    ) -> impl std::future::Future<Output = Result<producer::Delivery, KafkaError>> + Send {
        let this = self.clone();
        async move {
            if record.size() > this.max_bytes {
                return Err(KafkaError::MessageProduction(
                    RDKafkaErrorCode::MessageSizeTooLarge,
                ));
            }
            // Taken in the order handed over, as a partition keeps it; answered later.
            let away = this.away.load(Ordering::SeqCst);
            if !away {
                this.taken.lock().unwrap().push((*record).clone());
            }
            Ok(Box::pin(async move {
                if away {
                    return Err(KafkaError::MessageProduction(
                        RDKafkaErrorCode::MessageTimedOut,
                    ));
                }
                Ok(())
            }) as producer::Delivery)
        }
    }

    fn probe(&self) -> impl std::future::Future<Output = Result<(), String>> + Send + use<> {
        let away = self.away.load(Ordering::SeqCst);
        async move { if away { Err("away".into()) } else { Ok(()) } }
    }

    fn rebuild(&mut self) -> anyhow::Result<()> {
        Ok(())
    }

    fn flush(&self, _deadline: Duration) {}
}

fn done(camera: &str, seq: u64, image_bytes: usize) -> Done {
    let record_id = format!("n1/{camera}/s{seq}");
    Done {
        meta: JobMeta::arrived(
            camera,
            format!("mqtt:cameras/{camera}/frames"),
            seq,
            Ack::none(),
        ),
        verdict: Verdict::Frame {
            frame: Box::new(Frame {
                camera_id: camera.into(),
                record_id: record_id.clone(),
                node_id: "n1".into(),
                data: vec![7u8; image_bytes].into(),
                ..Frame::default()
            }),
            result: Box::new(InferenceResult {
                record_id,
                camera_id: camera.into(),
                ..InferenceResult::default()
            }),
        },
    }
}

/// Runs an outbox on `broker` with a fresh spool; returns the sender of finished jobs, the
/// stats, and the task.
fn start(
    broker: FakeBroker,
    dir: &std::path::Path,
) -> (
    UnboundedSender<Done>,
    Arc<Stats>,
    tokio::task::JoinHandle<()>,
) {
    let mut spool_cfg = Config::default().spool;
    spool_cfg.probe_interval_ms = 50;
    let (spool, _) = SledSpool::open(SpoolOptions {
        dir: dir.join("spool"),
        max_bytes: 1 << 30,
        when_full: WhenFull::DropOldestFrames,
    })
    .unwrap();
    let stats = Arc::new(Stats::default());
    let outbox = Outbox {
        cameras: Arc::default(),
        producer: broker,
        planner: RecordPlanner {
            node_id: "n1".into(),
            topics: Config::default().kafka.topics,
            limit: RecordLimit::new(1 << 20),
            large_policy: LargeFramePolicy::Chunk,
        },
        stats: stats.clone(),
        spool: Box::new(spool),
        spool_cfg,
    };
    let (tx, rx) = unbounded_channel();
    let task = tokio::spawn(outbox.run(rx));
    (tx, stats, task)
}

async fn until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while !done() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn kinds(broker: &FakeBroker) -> Vec<RecordKind> {
    broker
        .taken
        .lock()
        .unwrap()
        .iter()
        .map(|r| r.kind)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_record_the_broker_refuses_is_replaced_by_a_dead_letter_before_the_ack() {
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker {
        max_bytes: 4000,
        ..FakeBroker::default()
    };
    let (tx, stats, task) = start(broker.clone(), dir.path());
    // The node starts offline: until its first probe, frames go through the spool.
    until("online", || {
        stats.local_broker() == Some(state::Mode::Online)
    })
    .await;
    for seq in 1..=3 {
        // Frames of 5000 bytes: over the broker's limit, under fovea's record limit.
        tx.send(done("cam", seq, 5000)).unwrap();
    }
    tx.send(done("cam", 4, 100)).unwrap();
    until("4 acks", || Stats::get(&stats.acked) == 4).await;
    drop(tx);
    task.await.unwrap();
    let k = kinds(&broker);
    let count = |kind| k.iter().filter(|x| **x == kind).count();
    assert_eq!(count(RecordKind::Result), 4, "{k:?}");
    assert_eq!(count(RecordKind::Frame), 1, "the small frame");
    assert_eq!(
        count(RecordKind::DeadLetter),
        3,
        "one stand-in per refused frame"
    );
    for letter in broker
        .taken
        .lock()
        .unwrap()
        .iter()
        .filter(|r| r.kind == RecordKind::DeadLetter)
    {
        let d = DeadLetter::decode(letter.value.as_slice()).unwrap();
        assert_eq!(d.kind, "record-refused");
        assert!(d.reason.contains("MessageSizeTooLarge"), "{}", d.reason);
    }
    assert_eq!(stats.refused()[0].1, 3);
    assert_eq!(
        stats.local_broker(),
        Some(state::Mode::Online),
        "a refusal is no outage"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn frames_taken_while_the_broker_is_away_are_acked_from_the_spool_and_drained_in_order() {
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker {
        max_bytes: 4000,
        ..FakeBroker::default()
    };
    broker.away.store(true, Ordering::SeqCst);
    let (tx, stats, task) = start(broker.clone(), dir.path());
    for seq in 1..=5 {
        // Frame 3 is over the broker's limit: refused when drained, not before.
        tx.send(done("cam", seq, if seq == 3 { 5000 } else { 100 }))
            .unwrap();
    }
    until("5 acks from the spool", || Stats::get(&stats.acked) == 5).await;
    assert!(kinds(&broker).is_empty(), "nothing reached the broker yet");
    broker.away.store(false, Ordering::SeqCst);
    until("the spool to drain", || {
        stats.local_broker() == Some(state::Mode::Online)
    })
    .await;
    drop(tx);
    task.await.unwrap();
    let taken = broker.taken.lock().unwrap().clone();
    let ids: Vec<(RecordKind, &str)> = taken
        .iter()
        .map(|r| (r.kind, r.record_id().unwrap()))
        .collect();
    assert_eq!(ids.len(), 10, "5 results, 4 frames, 1 stand-in: {ids:?}");
    let of = |kind| -> Vec<&str> {
        ids.iter()
            .filter(|(k, _)| *k == kind)
            .map(|(_, id)| *id)
            .collect()
    };
    let all = [
        "n1/cam/s1",
        "n1/cam/s2",
        "n1/cam/s3",
        "n1/cam/s4",
        "n1/cam/s5",
    ];
    assert_eq!(of(RecordKind::Result), all, "in camera order");
    assert_eq!(
        of(RecordKind::Frame),
        ["n1/cam/s1", "n1/cam/s2", "n1/cam/s4", "n1/cam/s5"]
    );
    assert_eq!(
        of(RecordKind::DeadLetter),
        ["n1/cam/s3"],
        "the refused frame's stand-in"
    );
    assert_eq!(Stats::get(&stats.drained), 10);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frame_whose_records_panic_is_acked_as_an_internal_error_and_the_next_goes_through() {
    let dir = tempfile::tempdir().unwrap();
    let broker = FakeBroker {
        max_bytes: 1 << 20,
        ..FakeBroker::default()
    };
    let (tx, stats, task) = start(broker.clone(), dir.path());
    until("online", || {
        stats.local_broker() == Some(state::Mode::Online)
    })
    .await;
    let mut marked = done("cam", 1, 100);
    super::plan::mark_for_panic(&mut marked);
    tx.send(marked).unwrap();
    tx.send(done("cam", 2, 100)).unwrap();
    until("2 acks", || Stats::get(&stats.acked) == 2).await;
    drop(tx);
    task.await.unwrap();
    let taken = broker.taken.lock().unwrap().clone();
    let kinds: Vec<RecordKind> = taken.iter().map(|r| r.kind).collect();
    assert_eq!(
        kinds,
        [
            RecordKind::DeadLetter,
            RecordKind::Frame,
            RecordKind::Result
        ],
        "the marked frame's dead letter, then the next frame's records"
    );
    let letter = DeadLetter::decode(taken[0].value.as_slice()).unwrap();
    assert_eq!(letter.kind, "internal-error");
    assert!(
        letter.reason.contains("test-only panic"),
        "{}",
        letter.reason
    );
    assert_eq!(taken[1].record_id(), Some("n1/cam/s2"));
    assert_eq!(taken[2].record_id(), Some("n1/cam/s2"));
}
