//! The outbox: writes every finished job's records to the local Kafka broker, in each camera's
//! arrival order, and acknowledges the camera's MQTT publish only once all of them are acked by
//! the broker. A frame is therefore never acknowledged before it is durable.

pub mod producer;
pub mod records;
pub mod topics;

use crate::pipeline::job::Done;
use crate::pipeline::sequencer::Sequencer;
use crate::stats::{Stage, Stats};
use rdkafka::producer::{FutureProducer, Producer};
use records::{Naming, RecordKind};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc::UnboundedReceiver;
use tokio::task::JoinSet;

pub struct Outbox {
    pub producer: FutureProducer,
    pub naming: Naming,
    pub stats: Arc<Stats>,
}

impl Outbox {
    /// Runs until `done` is closed (every worker and the ingress have stopped) and every record
    /// handed to the producer has been acknowledged or has failed.
    pub async fn run(self, mut done: UnboundedReceiver<Done>) {
        let mut sequencer = Sequencer::default();
        let mut deliveries = JoinSet::new();
        while let Some(item) = done.recv().await {
            let (camera, seq) = (item.meta.camera.clone(), item.meta.node_seq);
            for ready in sequencer.push(&camera, seq, item) {
                self.write(ready, &mut deliveries).await;
            }
            while deliveries.try_join_next().is_some() {}
        }
        if sequencer.held() > 0 {
            log::error!("{} finished frames never became writable", sequencer.held());
        }
        while deliveries.join_next().await.is_some() {}
    }

    /// Hands the job's records to the producer (in order) and spawns the wait for their acks.
    async fn write(&self, done: Done, deliveries: &mut JoinSet<()>) {
        let records = records::plan(&done, &self.naming);
        let handed = Instant::now();
        let mut futures = Vec::with_capacity(records.len());
        for record in &records {
            match producer::enqueue(&self.producer, record).await {
                Ok(f) => futures.push((record.kind, record.key.clone(), f)),
                Err(e) => {
                    Stats::incr(&self.stats.delivery_failures);
                    log::error!("record for {} refused by the producer: {e}", record.key);
                }
            }
        }
        let stats = self.stats.clone();
        deliveries.spawn(async move {
            for (kind, key, future) in futures {
                match future.await {
                    Ok(Ok(_)) => Stats::incr(match kind {
                        RecordKind::Frame => &stats.frames_out,
                        RecordKind::Result => &stats.results_out,
                        RecordKind::DeadLetter => &stats.dead_letters,
                    }),
                    Ok(Err((e, _))) => {
                        // With message.timeout.ms = 0 only permanent errors end here.
                        Stats::incr(&stats.delivery_failures);
                        log::error!("{kind:?} record for camera {key} was refused: {e}");
                    }
                    // The producer was dropped: we are shutting down without this frame being
                    // safe, so it stays un-acked and the MQTT broker redelivers it.
                    Err(_) => return,
                }
            }
            let now = Instant::now();
            stats.record(Stage::Kafka, now.duration_since(handed));
            stats.record(Stage::Total, now.duration_since(done.meta.received));
            done.meta.ack.send().await;
            Stats::incr(&stats.acked);
        });
    }

    /// Waits up to `deadline` for librdkafka to deliver what it holds.
    pub fn flush(producer: &FutureProducer, deadline: Duration) {
        if let Err(e) = producer.flush(deadline) {
            log::warn!("producer flush: {e}");
        }
    }
}
