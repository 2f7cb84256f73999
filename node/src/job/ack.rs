//! The acknowledgement of one frame, carried through the pipeline until the frame's records are
//! durable. It does two kinds of things once the frame is safe:
//!
//! - sends the MQTT PUBACK(s) still held for it: dropping an [`Ack`] without sending leaves the
//!   frame unacknowledged, and the broker redelivers it on the next session (we use a persistent
//!   session), which is what we want when the node stops before the frame was safe;
//! - runs its releases: a frame reassembled from chunks holds no PUBACK (each chunk was acked as
//!   it was stored under `state_dir`), it holds the release of those stored chunks instead; a
//!   release that never runs leaves them there, and the next start assembles the frame again.
//!
//! Every PUBACK held anywhere in the node is counted in [`HeldAcks`]: that is the in-flight
//! window the MQTT broker sees (`fovea_mqtt_inflight`), and the health check looks at it to
//! notice a node that holds deliveries and acknowledges none.

use rumqttc::{AsyncClient, Publish, QoS};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// Something to do once the frame is durable, other than a PUBACK.
pub type Release = Box<dyn FnOnce() + Send + Sync>;

#[derive(Default)]
pub struct Ack {
    /// The PUBACKs to send, each with the size of the payload it stands for (counted in
    /// [`HeldAcks::bytes`] while held).
    publishes: Vec<(AsyncClient, Publish, u64)>,
    releases: Vec<Release>,
    held: Option<Arc<HeldAcks>>,
}

impl std::fmt::Debug for Ack {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ack")
            .field("publishes", &self.publishes.len())
            .field("releases", &self.releases.len())
            .finish()
    }
}

impl Ack {
    /// The ack for `publish` (its payload is not kept: only topic, QoS and packet id matter),
    /// counted in `held` until it is sent or dropped. QoS 0 deliveries have nothing to ack.
    pub fn new(client: AsyncClient, publish: &Publish, held: &Arc<HeldAcks>) -> Self {
        if publish.qos == QoS::AtMostOnce {
            return Ack::none();
        }
        let mut header = Publish::new(publish.topic.clone(), publish.qos, Vec::new());
        header.pkid = publish.pkid;
        let bytes = publish.payload.len() as u64;
        held.hold(bytes);
        Ack {
            publishes: vec![(client, header, bytes)],
            releases: Vec::new(),
            held: Some(held.clone()),
        }
    }

    /// An ack that does nothing (QoS 0 deliveries, tests).
    pub fn none() -> Self {
        Ack::default()
    }

    /// An ack that runs `release` once the frame is durable.
    pub fn release(release: Release) -> Self {
        let mut ack = Ack::default();
        ack.releases.push(release);
        ack
    }

    /// One ack for everything `acks` acknowledge (the stored chunks of one frame and the PUBACK
    /// of the chunk that completed it).
    pub fn merge(acks: impl IntoIterator<Item = Ack>) -> Self {
        let mut merged = Ack::default();
        for mut ack in acks {
            merged.publishes.append(&mut ack.publishes);
            merged.releases.append(&mut ack.releases);
            if merged.held.is_none() {
                merged.held = ack.held.take();
            }
        }
        merged
    }

    /// PUBACKs this ack holds.
    pub fn publishes(&self) -> usize {
        self.publishes.len()
    }

    /// Sends the PUBACK(s), then runs the releases. A send error means the client is shutting
    /// down; the broker will redeliver.
    pub async fn send(mut self) {
        for (client, publish, bytes) in std::mem::take(&mut self.publishes) {
            if let Some(held) = &self.held {
                held.sent(bytes);
            }
            if let Err(e) = client.ack(&publish).await {
                log::warn!(
                    "could not ack {} pkid {}: {e}; the broker will redeliver it",
                    publish.topic,
                    publish.pkid
                );
            }
        }
        for release in std::mem::take(&mut self.releases) {
            release();
        }
    }
}

impl Drop for Ack {
    /// An ack dropped unsent is no longer held by fovea: the broker redelivers it on the next
    /// session. Its releases do not run (the stored chunks stay for the next start).
    fn drop(&mut self) {
        if let Some(held) = &self.held {
            for (_, _, bytes) in &self.publishes {
                held.dropped(*bytes);
            }
        }
    }
}

/// PUBACKs held by the node, and when one was last sent: what the MQTT broker's in-flight window
/// for fovea holds, seen from this side.
#[derive(Debug)]
pub struct HeldAcks {
    epoch: Instant,
    count: AtomicU64,
    /// Payload bytes of the deliveries held (what holding them costs in memory, at most).
    bytes: AtomicU64,
    /// 1 + milliseconds since `epoch` of the last PUBACK sent, or of the moment the count last
    /// rose from zero, whichever is later; 0 before anything was held.
    progress: AtomicU64,
}

impl Default for HeldAcks {
    fn default() -> Self {
        HeldAcks {
            epoch: Instant::now(),
            count: AtomicU64::new(0),
            bytes: AtomicU64::new(0),
            progress: AtomicU64::new(0),
        }
    }
}

impl HeldAcks {
    fn stamp(&self) {
        let ms = 1 + Instant::now()
            .saturating_duration_since(self.epoch)
            .as_millis() as u64;
        self.progress.fetch_max(ms, Ordering::Relaxed);
    }

    /// One delivery of `bytes` held.
    fn hold(&self, bytes: u64) {
        self.bytes.fetch_add(bytes, Ordering::Relaxed);
        if self.count.fetch_add(1, Ordering::Relaxed) == 0 {
            self.stamp();
        }
    }

    /// One delivery's PUBACK sent.
    fn sent(&self, bytes: u64) {
        self.dropped(bytes);
        self.stamp();
    }

    /// One delivery no longer held, its PUBACK not sent.
    fn dropped(&self, bytes: u64) {
        self.bytes.fetch_sub(bytes, Ordering::Relaxed);
        self.count.fetch_sub(1, Ordering::Relaxed);
    }

    /// PUBACKs held now.
    pub fn count(&self) -> u64 {
        self.count.load(Ordering::Relaxed)
    }

    /// Payload bytes of the deliveries held now.
    pub fn bytes(&self) -> u64 {
        self.bytes.load(Ordering::Relaxed)
    }

    /// How long PUBACKs have been held with none sent, at `now`; None when none are held.
    pub fn stuck_for(&self, now: Instant) -> Option<Duration> {
        if self.count() == 0 {
            return None;
        }
        let since = self.progress.load(Ordering::Relaxed).max(1) - 1;
        Some(now.saturating_duration_since(self.epoch + Duration::from_millis(since)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rumqttc::MqttOptions;

    fn publish(qos: QoS, pkid: u16) -> Publish {
        let mut p = Publish::new("cameras/a/frames", qos, vec![1, 2, 3]);
        p.pkid = pkid;
        p
    }

    fn client() -> AsyncClient {
        AsyncClient::new(MqttOptions::new("t", "localhost", 1883), 10).0
    }

    #[test]
    fn held_acks_count_until_dropped_and_qos0_holds_nothing() {
        let held = Arc::new(HeldAcks::default());
        let c = client();
        let a = Ack::new(c.clone(), &publish(QoS::AtLeastOnce, 1), &held);
        let b = Ack::new(c.clone(), &publish(QoS::AtLeastOnce, 2), &held);
        let zero = Ack::new(c, &publish(QoS::AtMostOnce, 0), &held);
        assert_eq!((held.count(), held.bytes()), (2, 6));
        assert_eq!(zero.publishes(), 0);
        let merged = Ack::merge([a, b, zero]);
        assert_eq!((held.count(), merged.publishes()), (2, 2));
        drop(merged);
        assert_eq!((held.count(), held.bytes()), (0, 0));
        assert_eq!(held.stuck_for(Instant::now()), None);
    }

    #[tokio::test]
    async fn sending_counts_down_marks_progress_and_runs_releases() {
        let held = Arc::new(HeldAcks::default());
        let (c, _events) = AsyncClient::new(MqttOptions::new("t", "localhost", 1883), 10);
        let ran = Arc::new(AtomicU64::new(0));
        let r = ran.clone();
        let ack = Ack::merge([
            Ack::new(c, &publish(QoS::AtLeastOnce, 7), &held),
            Ack::release(Box::new(move || {
                r.fetch_add(1, Ordering::Relaxed);
            })),
        ]);
        let later = Instant::now() + Duration::from_secs(30);
        assert!(held.stuck_for(later).unwrap() >= Duration::from_secs(29));
        ack.send().await;
        assert_eq!((held.count(), held.bytes()), (0, 0));
        assert_eq!(ran.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn a_dropped_release_does_not_run() {
        let ran = Arc::new(AtomicU64::new(0));
        let r = ran.clone();
        drop(Ack::release(Box::new(move || {
            r.fetch_add(1, Ordering::Relaxed);
        })));
        assert_eq!(ran.load(Ordering::Relaxed), 0);
    }
}
