//! Creates fovea's topics at start, with the retention of their class, and checks the retention of
//! topics that already exist. We never rely on auto-create: many clusters disable it, and the
//! brokers we test on do not support it on subscribe.

use super::alter_configs;
use super::retention::{self, Mismatch, Verdict};
use crate::config::{Config, KafkaConfig, Retention, TopicClass};
use crate::ingress::backoff::Backoff;
use rdkafka::ClientConfig;
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

/// A topic fovea writes, with the retention it should have.
#[derive(Debug, Clone, PartialEq)]
pub struct TopicSpec {
    pub name: String,
    pub class: TopicClass,
    pub retention: Retention,
}

impl TopicSpec {
    pub fn new(cfg: &Config, name: &str, class: TopicClass) -> Self {
        TopicSpec {
            name: name.to_owned(),
            class,
            retention: cfg.kafka.retention.of(class),
        }
    }

    /// The node's own topics (frames, results, dead letters).
    pub fn node_topics(cfg: &Config) -> Vec<TopicSpec> {
        let t = &cfg.kafka.topics;
        vec![
            Self::new(cfg, &t.frames, TopicClass::Frames),
            Self::new(cfg, &t.results, TopicClass::Results),
            Self::new(cfg, &t.deadletter, TopicClass::DeadLetters),
        ]
    }
}

const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

fn admin(cfg: &KafkaConfig) -> anyhow::Result<AdminClient<DefaultClientContext>> {
    Ok(ClientConfig::new()
        .set("bootstrap.servers", &cfg.brokers)
        .set("log.connection.close", "false")
        .set("socket.connection.setup.timeout.ms", "3000")
        .create()?)
}

fn options() -> AdminOptions {
    AdminOptions::new()
        .operation_timeout(Some(Duration::from_secs(10)))
        .request_timeout(Some(REQUEST_TIMEOUT))
}

/// One attempt at creating `topics` (an existing topic is fine); the error says what failed.
/// With `check_retention`, then checks (and corrects, as configured) their retention, logging
/// what it finds.
pub async fn create(
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
    check_retention: bool,
) -> Result<(), String> {
    let admin = admin(cfg).map_err(|e| e.to_string())?;
    let problems = create_once(&admin, cfg, topics).await;
    if !problems.is_empty() {
        return Err(problems.join("; "));
    }
    if check_retention {
        check(Arc::new(admin), cfg, topics).await;
    }
    Ok(())
}

/// Creates `topics` (an existing topic is fine) and checks their retention. Retries with backoff
/// while the broker is unreachable, until `give_up` has passed.
pub async fn ensure(
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
    give_up: Duration,
) -> anyhow::Result<()> {
    let admin = admin(cfg)?;
    let deadline = tokio::time::Instant::now() + give_up;
    let mut backoff = Backoff::new(Duration::from_millis(200), Duration::from_secs(5));
    loop {
        let problems = create_once(&admin, cfg, topics).await;
        if problems.is_empty() {
            check(Arc::new(admin), cfg, topics).await;
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            anyhow::bail!(
                "could not create topics on {}: {}",
                cfg.brokers,
                problems.join("; ")
            );
        }
        let delay = backoff.next_delay();
        log::warn!(
            "creating topics on {} failed ({}); retrying in {} ms",
            cfg.brokers,
            problems.join("; "),
            delay.as_millis()
        );
        tokio::time::sleep(delay).await;
    }
}

/// Creates the topics that are missing, each with its retention; returns what failed.
async fn create_once(
    admin: &AdminClient<DefaultClientContext>,
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
) -> Vec<String> {
    let settings: Vec<_> = topics.iter().map(|t| t.retention.entries()).collect();
    let new: Vec<NewTopic> = topics
        .iter()
        .zip(&settings)
        .map(|(t, entries)| {
            entries.iter().fold(
                NewTopic::new(
                    &t.name,
                    cfg.partitions,
                    TopicReplication::Fixed(cfg.replication_factor),
                ),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    match admin.create_topics(&new, &options()).await {
        Ok(results) => results
            .into_iter()
            .filter_map(|r| match r {
                Ok(name) => {
                    log::info!("created topic {name} on {}", cfg.brokers);
                    None
                }
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => None,
                Err((name, code)) => Some(format!("{name}: {code}")),
            })
            .collect(),
        Err(e) => vec![e.to_string()],
    }
}

/// What the broker reports of each topic's settings (empty for a topic it reports nothing of).
async fn describe(
    admin: &AdminClient<DefaultClientContext>,
    topics: &[TopicSpec],
) -> Result<Vec<HashMap<String, Option<String>>>, String> {
    let specifiers: Vec<_> = topics
        .iter()
        .map(|t| ResourceSpecifier::Topic(&t.name))
        .collect();
    let results = admin
        .describe_configs(&specifiers, &options())
        .await
        .map_err(|e| e.to_string())?;
    Ok(results
        .into_iter()
        .map(|r| {
            r.map(|resource| {
                resource
                    .entries
                    .into_iter()
                    .map(|e| (e.name, e.value))
                    .collect()
            })
            .unwrap_or_default()
        })
        .collect())
}

/// Checks every topic's retention against its spec, corrects what differs when
/// `kafka.retention.correct_existing` allows, and logs one line per topic that is not as
/// configured. Never fails: a broker that cannot be asked is named in the log, and frames flow
/// either way.
async fn check(
    admin: Arc<AdminClient<DefaultClientContext>>,
    cfg: &KafkaConfig,
    topics: &[TopicSpec],
) {
    let before = match describe(&admin, topics).await {
        Ok(found) => found,
        Err(e) => {
            log::warn!(
                "could not read the retention of {} from {}: {e}; it is not checked",
                names(topics),
                cfg.brokers
            );
            return;
        }
    };
    let mut verdicts = Vec::new();
    for (topic, found) in topics.iter().zip(&before) {
        let wrong = retention::mismatches(&topic.retention, found);
        if wrong.is_empty() {
            verdicts.push((topic, Verdict::AsConfigured));
            continue;
        }
        if !cfg.retention.correct_existing {
            verdicts.push((topic, Verdict::Differs(wrong)));
            continue;
        }
        let entries: Vec<(&str, String)> =
            wrong.iter().map(|m| (m.key, m.wanted.clone())).collect();
        let (a, name) = (admin.clone(), topic.name.clone());
        let set = tokio::task::spawn_blocking(move || {
            alter_configs::set_topic_configs(&a, &name, &entries, REQUEST_TIMEOUT)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        if let Err(e) = set {
            log::warn!(
                "could not correct the retention of topic {} on {} ({e}): it keeps {}",
                topic.name,
                cfg.brokers,
                list(&wrong)
            );
            verdicts.push((topic, Verdict::Differs(wrong)));
            continue;
        }
        let after = describe(&admin, std::slice::from_ref(topic))
            .await
            .ok()
            .and_then(|mut v| v.pop())
            .unwrap_or_default();
        let still = retention::mismatches(&topic.retention, &after);
        verdicts.push((topic, retention::verdict(wrong, still)));
    }
    for (topic, verdict) in verdicts {
        report(cfg, topic, verdict);
    }
}

fn report(cfg: &KafkaConfig, topic: &TopicSpec, verdict: Verdict) {
    let (name, class) = (&topic.name, topic.class.name());
    match verdict {
        Verdict::AsConfigured => log::info!(
            "topic {name}: retention as kafka.retention.{class} says ({})",
            topic
                .retention
                .entries()
                .map(|(k, v)| format!("{k}={v}"))
                .join(", ")
        ),
        Verdict::Corrected(was) => log::warn!(
            "topic {name}: retention corrected to kafka.retention.{class}; it had {}",
            list(&was)
        ),
        Verdict::Differs(wrong) if !cfg.retention.correct_existing => log::warn!(
            "topic {name}: retention differs from kafka.retention.{class}: {}; not changed (kafka.retention.correct_existing = false)",
            list(&wrong)
        ),
        Verdict::Differs(wrong) => log::warn!(
            "topic {name}: the broker at {} does not honour kafka.retention.{class}: {}",
            cfg.brokers,
            list(&wrong)
        ),
        Verdict::Unreported(keys) => log::warn!(
            "topic {name}: the broker at {} does not report {}; fovea cannot check that it keeps them",
            cfg.brokers,
            keys.join(", ")
        ),
    }
}

fn list(mismatches: &[Mismatch]) -> String {
    mismatches
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn names(topics: &[TopicSpec]) -> String {
    topics
        .iter()
        .map(|t| t.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}
