//! The MQTT connection. QoS 1, `clean_session = false` and manual acks: the broker keeps a frame
//! (and redelivers it after a reconnect or a restart of fovea) until we PUBACK it, and we PUBACK
//! only once the frame's records are durable (a chunk: once it is stored). The broker's in-flight
//! window for our client (mosquitto's `max_inflight_messages`, 20 by default) bounds how many
//! deliveries fovea holds at once: that is the back-pressure to the cameras when inference or
//! Kafka fall behind.
//!
//! This task does nothing but poll the connection and hand deliveries to the dispatcher
//! ([`super::dispatch`]), so that pings and acks go out however long the dispatcher waits: a busy
//! node keeps its session. It stops reading only when it holds more than `mqtt.max_in_flight`
//! deliveries, which a broker with a window never sends.

use super::backoff::Backoff;
use super::dispatch::{BestEffort, Delivery};
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
}

impl Ingress {
    pub fn new(
        cfg: &MqttConfig,
        client_id: &str,
        deliveries: UnboundedSender<Delivery>,
        best_effort: Arc<BestEffort>,
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
        let (client, events) = AsyncClient::new(opts, 256);
        Ingress {
            cfg: cfg.clone(),
            client,
            events,
            deliveries: Some(deliveries),
            held: stats.mqtt_held.clone(),
            best_effort,
            stats,
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
        let mut paused = false;
        loop {
            if self.over_window(&mut paused) {
                tokio::select! {
                    _ = tokio::time::sleep(Duration::from_millis(20)) => continue,
                    _ = drained.changed(), if self.deliveries.is_none() => return self.disconnect().await,
                }
            }
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

    /// Whether fovea holds more deliveries than `mqtt.max_in_flight` (logged when that starts).
    fn over_window(&self, paused: &mut bool) -> bool {
        let over = self.held.count() >= self.cfg.max_in_flight as u64;
        if over && !*paused {
            log::warn!(
                "mqtt: {} deliveries held un-acked (mqtt.max_in_flight): not reading until some are acked. The broker should not send this many: set its max_inflight_messages",
                self.held.count()
            );
        }
        *paused = over;
        over
    }

    /// Hands a delivery to the dispatcher, its ack counted as held from now. A QoS 0 delivery
    /// beyond what the inference queue could take is dropped here (at most once).
    fn hand_on(&self, publish: rumqttc::Publish) {
        let Some(deliveries) = &self.deliveries else {
            return; // shutting down: the broker redelivers it next session
        };
        if publish.qos == QoS::AtMostOnce {
            let queued = self.best_effort.queued.fetch_add(1, Ordering::Relaxed);
            if queued >= self.best_effort.limit {
                self.best_effort.queued.fetch_sub(1, Ordering::Relaxed);
                Stats::incr(&self.stats.qos0_dropped);
                return;
            }
        }
        let ack = Ack::new(self.client.clone(), &publish, &self.held);
        let _ = deliveries.send(Delivery { publish, ack });
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
