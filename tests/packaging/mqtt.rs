//! A mosquitto started with extra config lines, and the MQTT client side of the queueing check:
//! a persistent subscriber that leaves, then comes back to count what the broker kept for it.
//! Only the mosquitto snippet test uses these; they are broker plumbing, kept out of its way.

use crate::harness::free_port;
use crate::tools::{Guard, tool, wait_for_port};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

/// Subscribes `client` (persistent session, QoS 1) and disconnects, so that messages queue.
pub(crate) fn subscribe_and_leave(port: u16, client: &str) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut opts = MqttOptions::new(client, "127.0.0.1", port);
        opts.set_clean_session(false);
        let (c, mut events) = AsyncClient::new(opts, 16);
        c.subscribe("cameras/+/frames", QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("subscribing: {other:?}"),
            }
        }
        c.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    });
}

/// Reconnects `client` and counts the messages the broker kept for it.
pub(crate) fn collect_queued(port: u16, client: &str, want: usize) -> usize {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut opts = MqttOptions::new(client, "127.0.0.1", port);
        opts.set_clean_session(false);
        let (_c, mut events) = AsyncClient::new(opts, 64);
        let mut n = 0;
        while n < want {
            match tokio::time::timeout(Duration::from_secs(3), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => n += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("mqtt: {e}"),
                Err(_) => break, // nothing more is coming
            }
        }
        n
    })
}

/// mosquitto on a free port with `extra` config lines; returns (port, guard).
pub(crate) fn mosquitto(dir: &Path, name: &str, extra: &str) -> (u16, Guard) {
    let port = free_port();
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}"),
    )
    .unwrap();
    let bin = std::env::var_os("FOVEA_MOSQUITTO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tool("mosquitto"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child, "mosquitto");
    (port, Guard(child))
}
