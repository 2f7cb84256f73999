//! The MQTT acknowledgement of one frame, carried through the pipeline until the frame's records
//! are durable. Dropping an [`Ack`] without sending it leaves the frame unacknowledged: the broker
//! redelivers it on the next session (we use a persistent session), which is what we want when
//! the node stops before the frame was safe.

use rumqttc::{AsyncClient, Publish, QoS};

#[derive(Debug)]
pub struct Ack {
    inner: Option<(AsyncClient, Publish)>,
}

impl Ack {
    /// The ack for `publish` (its payload is not kept: only topic, QoS and packet id matter).
    pub fn new(client: AsyncClient, publish: &Publish) -> Self {
        let mut header = Publish::new(publish.topic.clone(), publish.qos, Vec::new());
        header.pkid = publish.pkid;
        Ack {
            inner: (publish.qos != QoS::AtMostOnce).then_some((client, header)),
        }
    }

    /// An ack that does nothing (QoS 0 deliveries, tests).
    pub fn none() -> Self {
        Ack { inner: None }
    }

    /// Sends the PUBACK. An error means the client is shutting down; the broker will redeliver.
    pub async fn send(mut self) {
        if let Some((client, publish)) = self.inner.take()
            && let Err(e) = client.ack(&publish).await
        {
            log::warn!(
                "could not ack {} pkid {}: {e}; the broker will redeliver it",
                publish.topic,
                publish.pkid
            );
        }
    }
}
