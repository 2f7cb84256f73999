//! Creates fovea's topics at start. We never rely on auto-create: many clusters disable it, and
//! the brokers we test on do not support it on subscribe.

use crate::config::KafkaConfig;
use crate::ingress::backoff::Backoff;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use std::time::Duration;

/// One attempt at creating `names` (an existing topic is fine); the error says what failed.
pub async fn create(cfg: &KafkaConfig, names: &[&str]) -> Result<(), String> {
    ensure(cfg, names, Duration::ZERO)
        .await
        .map_err(|e| e.to_string())
}

/// Creates `names` (an existing topic is fine). Retries with backoff while the broker is
/// unreachable, until `give_up` has passed.
pub async fn ensure(cfg: &KafkaConfig, names: &[&str], give_up: Duration) -> anyhow::Result<()> {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("log.connection.close", "false")
        .set("socket.connection.setup.timeout.ms", "3000")
        .create()?;
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| {
            NewTopic::new(
                n,
                cfg.partitions,
                TopicReplication::Fixed(cfg.replication_factor),
            )
        })
        .collect();
    let opts = AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(Duration::from_secs(5)));
    let deadline = tokio::time::Instant::now() + give_up;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let outcome = match admin.create_topics(&topics, &opts).await {
            Ok(results) => results
                .into_iter()
                .filter_map(|r| match r {
                    Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                    Err((name, code)) => Some(format!("{name}: {code}")),
                })
                .collect::<Vec<_>>(),
            Err(e) => vec![e.to_string()],
        };
        if outcome.is_empty() {
            log::info!("topics ready on {}: {}", cfg.brokers, names.join(", "));
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "could not create topics on {}: {}",
                cfg.brokers,
                outcome.join("; ")
            );
        }
        let delay = backoff.next_delay();
        log::warn!(
            "creating topics on {} failed ({}); retrying in {} ms",
            cfg.brokers,
            outcome.join("; "),
            delay.as_millis()
        );
        tokio::time::sleep(delay).await;
    }
}
