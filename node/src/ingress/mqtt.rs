//! The MQTT connection. QoS 1, `clean_session = false` and manual acks: the broker keeps a frame
//! (and redelivers it after a reconnect or a restart of fovea) until we PUBACK it, and we PUBACK
//! only once the frame's records are durable (a chunk: once it is stored). The broker's in-flight
//! window for our client (mosquitto's `max_inflight_messages`, 20 by default) is meant to bound
//! how many deliveries fovea holds at once: the back-pressure to the cameras when inference or
//! Kafka fall behind.
//!
//! This task does nothing but poll the connection and hand deliveries to the dispatcher
//! ([`super::dispatch`]), so that pings and acks go out however long the dispatcher waits: a busy
//! node keeps its session. The broker's window is no bound: mosquitto 2.0.11 sends up to a
//! window more on every PUBACK while others are outstanding (paho, acking 5 of 20 in order: 100
//! new deliveries), so a node whose acks follow durability is sent its whole queue. fovea bounds
//! what it keeps in memory itself (`mqtt.max_in_flight`, `max_in_flight_bytes`): beyond that,
//! payloads wait on disk ([`super::spill`]), and beyond the spill's bound deliveries are shed and
//! fetched again on a renewed session (see [`Ingress::hand_on`]); reading never stops, which
//! would stop the keep-alive.

use super::backoff::Backoff;
use super::dispatch::{BestEffort, Delivery};
use super::spill::{Spill, Spilled};
use crate::config::MqttConfig;
use crate::job::{Ack, HeldAcks};
use crate::stats::Stats;
use rumqttc::{AsyncClient, Event, EventLoop, MqttOptions, Packet, QoS};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;
use tokio::sync::mpsc::UnboundedSender;
use tokio::sync::watch;

/// rumqttc refuses (and drops the connection on) a packet above its limit, and the broker would
/// redeliver it forever; so the client accepts anything MQTT can carry and fovea refuses
/// oversized frames itself, with a dead letter.
const MQTT_MAX_PACKET: usize = 268_435_455;

pub struct Ingress {
    cfg: MqttConfig,
    client: AsyncClient,
    events: EventLoop,
    deliveries: Option<UnboundedSender<Delivery>>,
    held: Arc<HeldAcks>,
    best_effort: Arc<BestEffort>,
    stats: Arc<Stats>,
    /// Where payloads beyond the memory budget wait (None if its folder could not be made).
    spill: Option<Arc<Spill>>,
    /// Deliveries shed since fovea held more than it can keep; None when not shedding.
    shed: Option<u64>,
    /// A disconnect asked for to renew the session after shedding: the error it causes is not a
    /// failure.
    resuming: bool,
}

/// Deliveries held at most, spilled ones included: MQTT packet ids are 16 bits, and each held
/// ack costs memory (topic and packet id) even when its payload is on disk.
const MAX_HELD: u64 = 50_000;

impl Ingress {
    pub fn new(
        cfg: &MqttConfig,
        client_id: &str,
        deliveries: UnboundedSender<Delivery>,
        best_effort: Arc<BestEffort>,
        spill: Option<Arc<Spill>>,
        stats: Arc<Stats>,
    ) -> Self {
        let mut opts = MqttOptions::new(client_id, cfg.host.clone(), cfg.port);
        opts.set_keep_alive(Duration::from_secs(cfg.keep_alive_secs))
            .set_clean_session(false)
            .set_manual_acks(true)
            .set_max_packet_size(MQTT_MAX_PACKET, 1 << 20);
        if let (Some(user), Some(pass)) = (&cfg.username, &cfg.password) {
            opts.set_credentials(user.clone(), pass.clone());
        }
        // Room in the request channel for the acks of every delivery fovea holds in memory at
        // once; more (spilled ones acked in a burst) wait for the event loop, which is polled
        // without pause.
        let (client, events) = AsyncClient::new(opts, cfg.max_in_flight + 64);
        Ingress {
            cfg: cfg.clone(),
            client,
            events,
            deliveries: Some(deliveries),
            held: stats.mqtt_held.clone(),
            best_effort,
            spill,
            stats,
            shed: None,
            resuming: false,
        }
    }

    /// Polls until `drained` turns true after `shutdown`: once `shutdown` turns true, deliveries
    /// are no longer handed on (they stay un-acked at the broker), while the acks of frames in
    /// flight still go out; then disconnects.
    pub async fn run(
        mut self,
        mut shutdown: watch::Receiver<bool>,
        mut drained: watch::Receiver<bool>,
    ) {
        let mut backoff = Backoff::new(
            Duration::from_millis(self.cfg.reconnect_min_ms),
            Duration::from_millis(self.cfg.reconnect_max_ms),
        );
        loop {
            // After every event (each PUBACK fovea sends is one): no timer in the select below,
            // since a branch that fires cancels `poll`, and a cancelled poll can be a connection
            // attempt cut short.
            self.resume_after_shedding();
            let event = tokio::select! {
                ev = self.events.poll() => ev,
                _ = shutdown.changed(), if self.deliveries.is_some() => {
                    self.deliveries = None;
                    continue;
                }
                _ = drained.changed(), if self.deliveries.is_none() => {
                    return self.disconnect().await;
                }
            };
            match event {
                Ok(Event::Incoming(Packet::ConnAck(ack))) => {
                    backoff.reset();
                    self.stats.mqtt_connected.store(true, Ordering::Relaxed);
                    log::info!(
                        "mqtt connected to {}:{} (session present: {})",
                        self.cfg.host,
                        self.cfg.port,
                        ack.session_present
                    );
                    self.subscribe();
                }
                Ok(Event::Incoming(Packet::SubAck(ack))) => {
                    let refused = ack
                        .return_codes
                        .iter()
                        .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure));
                    if refused {
                        log::error!(
                            "mqtt broker refused a subscription to {:?}",
                            self.cfg.topics
                        );
                    } else {
                        log::info!("mqtt subscribed to {}", self.cfg.topics.join(", "));
                    }
                }
                Ok(Event::Incoming(Packet::Publish(publish))) => self.hand_on(publish),
                Ok(_) => {}
                Err(e) if std::mem::take(&mut self.resuming) => {
                    self.stats.mqtt_connected.store(false, Ordering::Relaxed);
                    log::info!("mqtt: reconnecting for the deliveries shed ({e})");
                }
                Err(e) => {
                    self.stats.mqtt_connected.store(false, Ordering::Relaxed);
                    let delay = backoff.next_delay();
                    log::warn!(
                        "mqtt connection to {}:{} failed (attempt {}): {e}; retrying in {} ms",
                        self.cfg.host,
                        self.cfg.port,
                        backoff.attempts(),
                        delay.as_millis()
                    );
                    tokio::select! {
                        _ = tokio::time::sleep(delay) => {}
                        _ = drained.changed(), if self.deliveries.is_none() => return,
                    }
                }
            }
        }
    }

    fn subscribe(&self) {
        let filters = self
            .cfg
            .topics
            .iter()
            .chain(&self.cfg.chunk_topics)
            .map(|t| rumqttc::SubscribeFilter::new(t.clone(), QoS::AtLeastOnce));
        if let Err(e) = self.client.try_subscribe_many(filters) {
            log::error!("mqtt subscribe failed: {e}");
        }
    }

    /// Once every held delivery has been acked after shedding, reconnects: the broker then
    /// sends again what was shed (it still counts those as in flight to fovea).
    /// Spilled payloads that could not be read back count as shed.
    fn resume_after_shedding(&mut self) {
        if let Some(spill) = &self.spill {
            self.stats
                .mqtt_spill_bytes
                .store(spill.bytes(), Ordering::Relaxed);
            let lost = spill.take_lost();
            if lost > 0 {
                *self.shed.get_or_insert(0) += lost;
            }
        }
        if self.held.count() > 0 {
            return;
        }
        if let Some(shed) = self.shed.take() {
            log::info!(
                "mqtt: every held delivery is acked; {shed} shed deliveries come back with a new session"
            );
            self.resuming = true;
            let _ = self.client.try_disconnect();
        }
    }

    /// Whether holding `publish` too would pass `mqtt.max_in_flight` or `max_in_flight_bytes`
    /// (a delivery alone is always taken, however large: it could never fit otherwise).
    fn over_budget(&self, publish: &rumqttc::Publish) -> bool {
        let (count, bytes) = (self.held.count(), self.held.bytes());
        count >= self.cfg.max_in_flight as u64
            || (count > 0 && bytes + publish.payload.len() as u64 > self.cfg.max_in_flight_bytes)
    }

    /// Hands a delivery to the dispatcher, its ack counted as held from now. A QoS 0 delivery
    /// beyond what the inference queue could take is dropped here (at most once). A QoS 1
    /// delivery beyond the memory budget (`mqtt.max_in_flight` held ones, or
    /// `max_in_flight_bytes` of payload unless none is held) has its payload spilled to disk
    /// ([`super::spill`]) and is handed on all the same, in order. One that does not fit there
    /// either (`mqtt.spill_max_bytes`, [`MAX_HELD`] deliveries, a write error) is shed: dropped
    /// un-acked; from then on every delivery is shed until all held ones are acked, and then the
    /// session is renewed ([`Self::resume_after_shedding`]) so that the broker sends them again.
    fn hand_on(&mut self, mut publish: rumqttc::Publish) {
        if self.deliveries.is_none() {
            return; // shutting down: the broker redelivers it next session
        }
        let mut spilled = None;
        if publish.qos != QoS::AtMostOnce && (self.shed.is_some() || self.over_budget(&publish)) {
            match self.spill_payload(&publish) {
                Some(s) => {
                    publish.payload = bytes::Bytes::new();
                    spilled = Some(s);
                    Stats::incr(&self.stats.mqtt_spilled);
                }
                None => {
                    *self.shed.get_or_insert(0) += 1;
                    Stats::incr(&self.stats.mqtt_shed);
                    return;
                }
            }
        }
        if publish.qos == QoS::AtMostOnce {
            let queued = self.best_effort.queued.fetch_add(1, Ordering::Relaxed);
            if queued >= self.best_effort.limit {
                self.best_effort.queued.fetch_sub(1, Ordering::Relaxed);
                Stats::incr(&self.stats.qos0_dropped);
                return;
            }
        }
        let ack = Ack::new(self.client.clone(), &publish, &self.held);
        if let Some(deliveries) = &self.deliveries {
            let _ = deliveries.send(Delivery {
                publish,
                ack,
                spilled,
            });
        }
    }

    /// Spills the payload of a delivery over the memory budget, or says why not (logged when
    /// shedding starts). Never while shedding: order would break.
    fn spill_payload(&self, publish: &rumqttc::Publish) -> Option<Spilled> {
        let why = match &self.spill {
            _ if self.shed.is_some() => return None,
            None => "no spill folder".to_string(),
            Some(_) if self.held.count() >= MAX_HELD => {
                format!("{MAX_HELD} deliveries held")
            }
            Some(spill) if !spill.has_room(publish.payload.len()) => format!(
                "the spill folder holds {} bytes (mqtt.spill_max_bytes)",
                spill.bytes()
            ),
            Some(spill) => match spill.put(&publish.payload) {
                Ok(spilled) => return Some(spilled),
                Err(e) => format!("spilling failed: {e}"),
            },
        };
        log::warn!(
            "mqtt: {} deliveries ({} bytes in memory) held un-acked, more than the broker's window should allow, and {why}: shedding new deliveries until those are acked, then renewing the session to get them again",
            self.held.count(),
            self.held.bytes()
        );
        None
    }

    async fn disconnect(mut self) {
        let _ = self.client.try_disconnect();
        // Let the eventloop write out pending acks and the DISCONNECT.
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while self.events.poll().await.is_ok() {}
        })
        .await;
        log::info!("ingress: disconnected");
    }
}
