//! Semantic checks: values that type-check but would fail later (at connect time, at topic
//! creation, or silently). Every problem is returned, each with its key path.

use super::keypath::KeyPath;
use super::{Config, TopicClass, WhenBehind};

const LOG_LEVELS: &[&str] = &["error", "warn", "info", "debug", "trace", "off"];
const COMPRESSIONS: &[&str] = &["none", "gzip", "snappy", "lz4", "zstd"];
/// Kafka refuses longer topic names (it appends to them in internal metric names).
const MAX_TOPIC_LEN: usize = 249;
/// Below 64 KiB a frame would be split into too many records to be worth it; above 100 MiB no
/// broker config accepts the record anyway.
const RECORD_LIMIT_RANGE: std::ops::RangeInclusive<usize> = 65_536..=104_857_600;
const MAX_WORKERS: usize = 64;

/// A semantic problem; its path is typed so the loader can map array indices back to the file.
#[derive(Debug)]
pub(super) struct Problem {
    pub(super) path: KeyPath,
    pub(super) message: String,
}

/// Collects problems; `check` reads as the rule it enforces.
#[derive(Default)]
struct Problems(Vec<Problem>);

impl Problems {
    fn check(&mut self, ok: bool, path: impl Into<KeyPath>, message: impl Into<String>) {
        if !ok {
            self.0.push(Problem {
                path: path.into(),
                message: message.into(),
            });
        }
    }
}

/// Every semantic problem of `config` (empty when it is usable). Run before relative paths are
/// resolved, so an empty path is still seen as empty.
pub(super) fn validate(config: &Config) -> Vec<Problem> {
    let mut p = Problems::default();
    node(config, &mut p);
    log(config, &mut p);
    mqtt(config, &mut p);
    kafka(config, &mut p);
    inference(config, &mut p);
    spool(config, &mut p);
    large_frames(config, &mut p);
    service(config, &mut p);
    uplink(config, &mut p);
    models_and_routes(config, &mut p);
    p.0
}

/// Record ids and Kafka keys embed the node id, so it keeps to a safe alphabet.
fn is_id(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
}

fn node(config: &Config, p: &mut Problems) {
    let node = &config.node;
    p.check(
        node.id.is_empty() || is_id(&node.id),
        "node.id",
        format!(
            "{:?} may only contain A-Z a-z 0-9 . _ - (or be empty for the hostname)",
            node.id
        ),
    );
    p.check(
        !node.state_dir.as_os_str().is_empty(),
        "node.state_dir",
        "must not be empty",
    );
}

fn log(config: &Config, p: &mut Problems) {
    let level_msg = |level: &str| format!("{level:?} is not one of {}", LOG_LEVELS.join(", "));
    let level = &config.log.level;
    p.check(
        LOG_LEVELS.contains(&level.as_str()),
        "log.level",
        level_msg(level),
    );
    for (module, level) in &config.log.modules {
        let path = KeyPath::from("log.modules").key(module.clone());
        p.check(
            !module.is_empty(),
            path.clone(),
            "module name must not be empty",
        );
        p.check(LOG_LEVELS.contains(&level.as_str()), path, level_msg(level));
    }
}

fn mqtt(config: &Config, p: &mut Problems) {
    let m = &config.mqtt;
    p.check(!m.host.trim().is_empty(), "mqtt.host", "must not be empty");
    p.check(m.port != 0, "mqtt.port", "must not be 0");
    p.check(
        m.password.is_none() || m.username.is_some(),
        "mqtt.password",
        "MQTT sends a password only with a username: set mqtt.username too",
    );
    p.check(
        !m.topics.is_empty(),
        "mqtt.topics",
        "needs at least one topic filter",
    );
    for (key, filters) in [
        ("mqtt.topics", &m.topics),
        ("mqtt.chunk_topics", &m.chunk_topics),
    ] {
        for (i, topic) in filters.iter().enumerate() {
            if let Err(why) = check_topic_filter(topic) {
                p.check(
                    false,
                    KeyPath::from(key).index(i),
                    format!("{topic:?}: {why}"),
                );
            }
        }
    }
    for (i, topic) in m.chunk_topics.iter().enumerate() {
        p.check(
            !m.topics.contains(topic),
            KeyPath::from("mqtt.chunk_topics").index(i),
            format!("{topic:?} is also in mqtt.topics: chunks need their own topics"),
        );
    }
    // The MQTT keep-alive is a 16-bit number of seconds; under 5 s a busy link flaps.
    p.check(
        (5..=65_535).contains(&m.keep_alive_secs),
        "mqtt.keep_alive_secs",
        format!("{} is not between 5 and 65535", m.keep_alive_secs),
    );
    p.check(
        m.max_frame_bytes >= 1024,
        "mqtt.max_frame_bytes",
        format!(
            "{} is below 1024 bytes: no real image fits",
            m.max_frame_bytes
        ),
    );
    p.check(
        // (A record limit out of range is reported on its own.)
        !RECORD_LIMIT_RANGE.contains(&config.kafka.record_limit_bytes)
            || m.max_metadata_bytes <= config.kafka.record_limit_bytes / 2,
        "mqtt.max_metadata_bytes",
        format!(
            "{} is above half of kafka.record_limit_bytes ({}): the result record would not fit",
            m.max_metadata_bytes, config.kafka.record_limit_bytes
        ),
    );
    p.check(m.max_cameras >= 1, "mqtt.max_cameras", "must be at least 1");
    p.check(
        m.max_in_flight_bytes >= 1 << 20,
        "mqtt.max_in_flight_bytes",
        format!("{} is below 1 MiB", m.max_in_flight_bytes),
    );
    p.check(
        m.max_in_flight >= 20,
        "mqtt.max_in_flight",
        format!(
            "{} is below mosquitto's default in-flight window (20): fovea would shed deliveries the broker is allowed to send",
            m.max_in_flight
        ),
    );
    p.check(
        m.reconnect_min_ms > 0,
        "mqtt.reconnect_min_ms",
        "must be above 0",
    );
    p.check(
        m.reconnect_max_ms > 0,
        "mqtt.reconnect_max_ms",
        "must be above 0",
    );
    p.check(
        m.reconnect_min_ms <= m.reconnect_max_ms,
        "mqtt.reconnect_min_ms",
        format!(
            "{} is above mqtt.reconnect_max_ms ({})",
            m.reconnect_min_ms, m.reconnect_max_ms
        ),
    );
}

/// A filter names its camera with exactly one `+` level; `#` would make the camera ambiguous.
fn check_topic_filter(topic: &str) -> Result<(), &'static str> {
    if topic.contains('#') {
        return Err("`#` is not allowed: the camera id must be one `+` level");
    }
    let levels: Vec<&str> = topic.split('/').collect();
    if levels.iter().any(|l| l.contains('+') && *l != "+") {
        return Err("`+` must be a whole level, as in `cameras/+/frames`");
    }
    match levels.iter().filter(|l| **l == "+").count() {
        1 => Ok(()),
        0 => Err("needs one `+` level (the camera id)"),
        _ => Err("has more than one `+` level: which one is the camera id?"),
    }
}

fn kafka(config: &Config, p: &mut Problems) {
    let k = &config.kafka;
    p.check(
        !k.brokers.trim().is_empty(),
        "kafka.brokers",
        "must not be empty",
    );
    let topics = [
        ("frames", &k.topics.frames),
        ("results", &k.topics.results),
        ("deadletter", &k.topics.deadletter),
    ];
    for (i, (name, topic)) in topics.iter().enumerate() {
        let path = KeyPath::from("kafka.topics").key(*name);
        if let Err(why) = check_kafka_topic(topic) {
            p.check(false, path.clone(), format!("{topic:?}: {why}"));
        }
        if let Some((other, _)) = topics[..i]
            .iter()
            .find(|(_, t)| !t.is_empty() && *t == *topic)
        {
            p.check(
                false,
                path.clone(),
                format!("{topic:?} is also kafka.topics.{other}: each kind of record needs its own topic"),
            );
        }
    }
    p.check(k.partitions >= 1, "kafka.partitions", "must be at least 1");
    p.check(
        k.replication_factor >= 1,
        "kafka.replication_factor",
        "must be at least 1",
    );
    p.check(
        COMPRESSIONS.contains(&k.compression.as_str()),
        "kafka.compression",
        format!(
            "{:?} is not one of {}",
            k.compression,
            COMPRESSIONS.join(", ")
        ),
    );
    p.check(
        RECORD_LIMIT_RANGE.contains(&k.record_limit_bytes),
        "kafka.record_limit_bytes",
        format!(
            "{} is not between {} and {}",
            k.record_limit_bytes,
            RECORD_LIMIT_RANGE.start(),
            RECORD_LIMIT_RANGE.end()
        ),
    );
    retention(config, p);
}

/// Kafka's own rules for the three settings, plus one of fovea's: a partition must be able to
/// hold at least one record of the largest size fovea writes, or the broker would delete a
/// record as soon as it is written.
fn retention(config: &Config, p: &mut Problems) {
    let limit = config.kafka.record_limit_bytes as i64;
    for class in [
        TopicClass::Frames,
        TopicClass::Results,
        TopicClass::DeadLetters,
    ] {
        let r = config.kafka.retention.of(class);
        let path = KeyPath::from("kafka.retention").key(class.name());
        p.check(
            r.retention_ms == -1 || r.retention_ms >= 1000,
            path.clone().key("retention_ms"),
            format!(
                "{} is neither -1 (no limit) nor at least 1000 (one second)",
                r.retention_ms
            ),
        );
        p.check(
            r.retention_bytes == -1 || r.retention_bytes >= limit,
            path.clone().key("retention_bytes"),
            format!(
                "{} is neither -1 (no limit) nor at least kafka.record_limit_bytes ({limit})",
                r.retention_bytes
            ),
        );
        p.check(
            r.segment_bytes >= 1 << 20,
            path.key("segment_bytes"),
            format!("{} is below Kafka's minimum of 1 MiB", r.segment_bytes),
        );
    }
}

fn check_kafka_topic(topic: &str) -> Result<(), &'static str> {
    if topic.is_empty() {
        Err("must not be empty")
    } else if topic.len() > MAX_TOPIC_LEN {
        Err("is longer than Kafka's 249 characters")
    } else if topic == "." || topic == ".." {
        Err("Kafka does not allow `.` or `..` as a topic name")
    } else if !topic
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
    {
        Err("Kafka topic names may only contain A-Z a-z 0-9 . _ -")
    } else {
        Ok(())
    }
}

fn uplink(config: &Config, p: &mut Problems) {
    let u = &config.uplink;
    if !u.enabled {
        return;
    }
    p.check(
        !u.brokers.is_empty(),
        "uplink.brokers",
        "must name the cloud cluster",
    );
    p.check(
        u.retention_warn_share > 0.0 && u.retention_warn_share <= 1.0,
        "uplink.retention_warn_share",
        format!("{} is not in (0, 1]", u.retention_warn_share),
    );
    for (key, topic) in [
        ("uplink.results_topic", &u.results_topic),
        ("uplink.frames_topic", &u.frames_topic),
        ("uplink.deadletter_topic", &u.deadletter_topic),
    ] {
        if let Err(why) = check_kafka_topic(topic) {
            p.check(false, key, format!("{topic:?}: {why}"));
        }
    }
    // The uplink dead letters go to the local broker, beside the node's own topics.
    let t = &config.kafka.topics;
    for (name, local) in [
        ("frames", &t.frames),
        ("results", &t.results),
        ("deadletter", &t.deadletter),
    ] {
        p.check(
            u.deadletter_topic != *local,
            "uplink.deadletter_topic",
            format!(
                "{:?} is also kafka.topics.{name}: uplink dead letters need their own local topic",
                u.deadletter_topic
            ),
        );
    }
    p.check(
        COMPRESSIONS.contains(&u.compression.as_str()),
        "uplink.compression",
        format!(
            "{:?} is not one of {}",
            u.compression,
            COMPRESSIONS.join(", ")
        ),
    );
    p.check(
        (65_536..=104_857_600).contains(&u.record_limit_bytes),
        "uplink.record_limit_bytes",
        format!("{} is outside 65536..104857600", u.record_limit_bytes),
    );
    p.check(
        (1..=100_000).contains(&u.max_in_flight),
        "uplink.max_in_flight",
        format!("{} is outside 1..100000", u.max_in_flight),
    );
    let s = &u.security;
    p.check(
        ["plaintext", "ssl", "sasl_plaintext", "sasl_ssl"].contains(&s.protocol.as_str()),
        "uplink.security.protocol",
        format!(
            "{:?} is not one of plaintext, ssl, sasl_plaintext, sasl_ssl",
            s.protocol
        ),
    );
    if s.protocol.starts_with("sasl") {
        p.check(
            ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"].contains(&s.sasl_mechanism.as_str()),
            "uplink.security.sasl_mechanism",
            format!(
                "{:?} is not one of PLAIN, SCRAM-SHA-256, SCRAM-SHA-512",
                s.sasl_mechanism
            ),
        );
        p.check(
            !s.sasl_username.is_empty(),
            "uplink.security.sasl_username",
            "is needed with SASL",
        );
    }
    p.check(
        (0.0..=1.0).contains(&u.frames.min_score),
        "uplink.frames.min_score",
        format!("{} is outside 0..1", u.frames.min_score),
    );
}

fn large_frames(config: &Config, p: &mut Problems) {
    let lf = &config.large_frames;
    p.check(
        (1..=64).contains(&lf.max_in_flight),
        "large_frames.max_in_flight",
        format!("{} is outside 1..64", lf.max_in_flight),
    );
    p.check(
        (1..=1024).contains(&lf.max_chunked_uploads),
        "large_frames.max_chunked_uploads",
        format!("{} is outside 1..1024", lf.max_chunked_uploads),
    );
    p.check(
        (100..=3_600_000).contains(&lf.chunk_timeout_ms),
        "large_frames.chunk_timeout_ms",
        format!("{} is outside 100..3600000", lf.chunk_timeout_ms),
    );
    p.check(
        lf.store_max_bytes >= 1 << 20,
        "large_frames.store_max_bytes",
        format!("{} is below the minimum of 1 MiB", lf.store_max_bytes),
    );
    p.check(
        lf.retention_hours >= 1,
        "large_frames.retention_hours",
        "must be at least 1",
    );
    p.check(
        lf.http_listen.parse::<std::net::SocketAddr>().is_ok(),
        "large_frames.http_listen",
        format!(
            "{:?} is not an address:port such as 127.0.0.1:8088",
            lf.http_listen
        ),
    );
    p.check(
        lf.public_url.is_empty() || lf.public_url.starts_with("http://"),
        "large_frames.public_url",
        format!("{:?} must start with http://", lf.public_url),
    );
}

fn service(config: &Config, p: &mut Problems) {
    let listen = &config.metrics.listen;
    p.check(
        listen.is_empty() || listen.parse::<std::net::SocketAddr>().is_ok(),
        "metrics.listen",
        format!("{listen:?} is not empty or an address:port such as 127.0.0.1:9464"),
    );
    p.check(
        (100..=3_600_000).contains(&config.health.stall_after_ms),
        "health.stall_after_ms",
        format!(
            "{} is outside 100..=3600000 (0.1 s to an hour)",
            config.health.stall_after_ms
        ),
    );
}

fn spool(config: &Config, p: &mut Problems) {
    let s = &config.spool;
    p.check(
        s.max_bytes >= 1 << 20,
        "spool.max_bytes",
        format!("{} is below the minimum of 1 MiB", s.max_bytes),
    );
    p.check(
        (100..=600_000).contains(&s.divert_after_ms),
        "spool.divert_after_ms",
        format!("{} is outside 100..600000", s.divert_after_ms),
    );
    p.check(
        s.slow_inflight_bytes >= 1 << 20,
        "spool.slow_inflight_bytes",
        format!("{} is below the minimum of 1 MiB", s.slow_inflight_bytes),
    );
    p.check(
        (50..=60_000).contains(&s.probe_interval_ms),
        "spool.probe_interval_ms",
        format!("{} is outside 50..60000", s.probe_interval_ms),
    );
}

fn inference(config: &Config, p: &mut Problems) {
    let i = &config.inference;
    p.check(
        (1..=MAX_WORKERS).contains(&i.workers),
        "inference.workers",
        format!("{} is not between 1 and {MAX_WORKERS}", i.workers),
    );
    p.check(
        i.intra_threads >= 1,
        "inference.intra_threads",
        "must be at least 1",
    );
    p.check(
        i.queue_capacity >= 1,
        "inference.queue_capacity",
        "must be at least 1",
    );
    p.check(
        i.when_behind != WhenBehind::SkipStale || i.max_frame_age_ms > 0,
        "inference.max_frame_age_ms",
        "must be above 0 with when_behind = \"skip_stale\" (else every frame is stale)",
    );
    p.check(
        i.min_image_side >= 1,
        "inference.min_image_side",
        "must be at least 1",
    );
}

fn models_and_routes(config: &Config, p: &mut Problems) {
    for (i, model) in config.models.iter().enumerate() {
        p.check(
            !model.path.as_os_str().is_empty(),
            KeyPath::from("models").index(i).key("path"),
            "must not be empty",
        );
    }
    for (i, route) in config.routes.iter().enumerate() {
        p.check(
            !route.cameras.trim().is_empty(),
            KeyPath::from("routes").index(i).key("cameras"),
            "must not be empty (use \"*\" for every camera)",
        );
        for (j, model) in route.models.iter().enumerate() {
            p.check(
                !model.trim().is_empty(),
                KeyPath::from("routes").index(i).key("models").index(j),
                "model name must not be empty",
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paths(config: &Config) -> Vec<String> {
        validate(config)
            .into_iter()
            .map(|e| e.path.to_string())
            .collect()
    }

    #[test]
    fn default_config_is_valid() {
        assert!(validate(&Config::default()).is_empty());
    }

    #[test]
    fn retention_follows_kafka_rules_and_holds_a_record() {
        let mut c = Config::default();
        c.kafka.retention.frames.retention_ms = 0;
        c.kafka.retention.results.retention_bytes = 1000;
        c.kafka.retention.dead_letters.segment_bytes = 1000;
        c.uplink.enabled = true;
        c.uplink.brokers = "cloud:9092".into();
        c.uplink.retention_warn_share = 1.5;
        assert_eq!(
            paths(&c),
            [
                "kafka.retention.frames.retention_ms",
                "kafka.retention.results.retention_bytes",
                "kafka.retention.dead_letters.segment_bytes",
                "uplink.retention_warn_share",
            ]
        );
        c = Config::default();
        c.kafka.retention.frames.retention_ms = -1;
        c.kafka.retention.frames.retention_bytes = -1;
        assert!(paths(&c).is_empty(), "-1 means no limit");
    }

    #[test]
    fn every_problem_is_reported() {
        let mut c = Config::default();
        c.node.id = "bad id".into();
        c.log.modules.insert("rdkafka".into(), "loud".into());
        c.mqtt.topics = vec!["cameras/#".into(), "a/+/b/+".into(), "ok/+/x".into()];
        c.mqtt.reconnect_min_ms = 5000;
        c.mqtt.reconnect_max_ms = 100;
        c.kafka.topics.results = c.kafka.topics.frames.clone();
        c.kafka.topics.deadletter = "bad topic".into();
        c.kafka.compression = "brotli".into();
        c.kafka.record_limit_bytes = 1;
        c.inference.workers = 0;
        c.inference.when_behind = WhenBehind::SkipStale;
        c.inference.max_frame_age_ms = 0;
        c.routes[0].models.push(" ".into());
        assert_eq!(
            paths(&c),
            [
                "node.id",
                "log.modules.rdkafka",
                "mqtt.topics[0]",
                "mqtt.topics[1]",
                "mqtt.reconnect_min_ms",
                "kafka.topics.results",
                "kafka.topics.deadletter",
                "kafka.compression",
                "kafka.record_limit_bytes",
                "inference.workers",
                "inference.max_frame_age_ms",
                "routes[0].models[2]",
            ]
        );
    }

    #[test]
    fn the_uplink_dead_letter_topic_is_a_valid_local_topic_of_its_own() {
        let mut c = Config::default();
        c.uplink.enabled = true;
        c.uplink.brokers = "cloud:9092".into();
        assert!(validate(&c).is_empty());
        c.uplink.deadletter_topic = c.kafka.topics.results.clone();
        assert_eq!(paths(&c), ["uplink.deadletter_topic"]);
        c.uplink.deadletter_topic = c.kafka.topics.deadletter.clone();
        assert_eq!(paths(&c), ["uplink.deadletter_topic"]);
        c.uplink.deadletter_topic = "bad topic".into();
        assert_eq!(paths(&c), ["uplink.deadletter_topic"]);
        // Unchecked while the uplink is off.
        c.uplink.enabled = false;
        assert!(validate(&c).is_empty());
    }

    #[test]
    fn topic_filters_need_exactly_one_whole_plus_level() {
        assert!(check_topic_filter("cameras/+/frames").is_ok());
        assert!(check_topic_filter("+").is_ok());
        assert!(check_topic_filter("cameras/frames").is_err());
        assert!(check_topic_filter("cameras/cam+/frames").is_err());
        assert!(check_topic_filter("cameras/+/#").is_err());
    }

    #[test]
    fn kafka_topic_names_follow_kafka_rules() {
        assert!(check_kafka_topic("fovea.results_v2-a").is_ok());
        assert!(check_kafka_topic(&"a".repeat(249)).is_ok());
        assert!(check_kafka_topic(&"a".repeat(250)).is_err());
        assert!(check_kafka_topic("..").is_err());
        assert!(check_kafka_topic("a/b").is_err());
    }
}
