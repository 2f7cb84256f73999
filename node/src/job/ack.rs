//! The MQTT acknowledgement of one frame, carried through the pipeline until the frame's records
//! are durable. Dropping an [`Ack`] without sending it leaves the frame unacknowledged: the broker
//! redelivers it on the next session (we use a persistent session), which is what we want when
//! the node stops before the frame was safe. A frame uploaded in chunks has one PUBACK per chunk,
//! all sent together once the whole frame is safe.

use rumqttc::{AsyncClient, Publish, QoS};

#[derive(Debug, Default)]
pub struct Ack {
    publishes: Vec<(AsyncClient, Publish)>,
}

impl Ack {
    /// The ack for `publish` (its payload is not kept: only topic, QoS and packet id matter).
    pub fn new(client: AsyncClient, publish: &Publish) -> Self {
        let mut header = Publish::new(publish.topic.clone(), publish.qos, Vec::new());
        header.pkid = publish.pkid;
        let publishes = if publish.qos == QoS::AtMostOnce {
            Vec::new()
        } else {
            vec![(client, header)]
        };
        Ack { publishes }
    }

    /// An ack that does nothing (QoS 0 deliveries, tests).
    pub fn none() -> Self {
        Ack::default()
    }

    /// One ack for everything `acks` acknowledge (the chunks of one frame).
    pub fn merge(acks: impl IntoIterator<Item = Ack>) -> Self {
        Ack {
            publishes: acks.into_iter().flat_map(|a| a.publishes).collect(),
        }
    }

    /// Sends the PUBACK(s). An error means the client is shutting down; the broker will redeliver.
    pub async fn send(self) {
        for (client, publish) in self.publishes {
            if let Err(e) = client.ack(&publish).await {
                log::warn!(
                    "could not ack {} pkid {}: {e}; the broker will redeliver it",
                    publish.topic,
                    publish.pkid
                );
            }
        }
    }
}
