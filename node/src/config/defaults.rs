//! The default value of every key. `default.toml` documents the same values; a test keeps the
//! two equal, so the printed default config never lies.

use super::*;
use std::path::PathBuf;

impl Default for Config {
    fn default() -> Self {
        Self {
            node: NodeConfig::default(),
            log: LogConfig::default(),
            mqtt: MqttConfig::default(),
            kafka: KafkaConfig::default(),
            inference: InferenceConfig::default(),
            spool: SpoolConfig::default(),
            large_frames: LargeFramesConfig::default(),
            uplink: UplinkConfig::default(),
            metrics: MetricsConfig::default(),
            health: HealthConfig::default(),
            // The two models the packages install, so a fresh install infers something.
            models: ["efficientnet-lite0", "ssdlite-person"]
                .into_iter()
                .map(|name| ModelRef {
                    path: PathBuf::from("/usr/share/fovea/models").join(name),
                })
                .collect(),
            routes: vec![Route {
                cameras: "*".into(),
                models: vec!["efficientnet-lite0".into(), "ssdlite-person".into()],
            }],
        }
    }
}

impl Default for MetricsConfig {
    fn default() -> Self {
        // Loopback: the figures say what the cameras see; expose them deliberately.
        Self {
            listen: "127.0.0.1:9464".into(),
        }
    }
}

impl Default for HealthConfig {
    fn default() -> Self {
        // Far above a big frame's decode + inference on a small ARM core (seconds), far below
        // what an operator would tolerate a silent node for.
        Self {
            stall_after_ms: 60_000,
        }
    }
}

impl Default for NodeConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            // What systemd's `StateDirectory=fovea` creates.
            state_dir: PathBuf::from("/var/lib/fovea"),
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        Self {
            level: "info".into(),
            modules: Default::default(),
            disk_budget_bytes: 64 << 20,
        }
    }
}

impl Default for MqttConfig {
    fn default() -> Self {
        Self {
            host: "127.0.0.1".into(),
            port: 1883,
            client_id: String::new(),
            username: None,
            password: None,
            topics: vec!["cameras/+/frames".into()],
            chunk_topics: vec!["cameras/+/chunks".into()],
            keep_alive_secs: 30,
            max_frame_bytes: 64 * 1024 * 1024,
            max_metadata_bytes: 16 * 1024,
            reconnect_min_ms: 250,
            reconnect_max_ms: 30_000,
            max_cameras: 1000,
            camera_idle_secs: 600,
            max_in_flight: 1000,
            max_in_flight_bytes: 64 << 20,
            spill_max_bytes: 1 << 30,
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        Self {
            brokers: "127.0.0.1:9092".into(),
            topics: TopicsConfig::default(),
            // A single local broker: a few partitions for parallel consumers, no replicas.
            partitions: 3,
            replication_factor: 1,
            compression: "lz4".into(),
            record_limit_bytes: 1024 * 1024,
            linger_ms: 5,
            producer: Default::default(),
            retention: RetentionConfig::default(),
            // What the packaged fovea-kafka.service uses (StateDirectory=fovea-kafka).
            data_dir: PathBuf::from("/var/lib/fovea-kafka"),
        }
    }
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self {
            correct_existing: true,
            frames: Default::default(),
            results: Default::default(),
            dead_letters: Default::default(),
        }
    }
}

impl Default for TopicsConfig {
    fn default() -> Self {
        Self {
            frames: "fovea.frames".into(),
            results: "fovea.results".into(),
            deadletter: "fovea.deadletter".into(),
        }
    }
}

impl Default for InferenceConfig {
    fn default() -> Self {
        Self {
            onnxruntime_library: PathBuf::new(),
            // One worker with one thread: safe on the smallest boards; raise on bigger ones.
            workers: 1,
            intra_threads: 1,
            queue_capacity: 16,
            when_behind: WhenBehind::Backpressure,
            max_frame_age_ms: 2000,
            min_image_side: 16,
            // Fits a 64-bit edge box: a 40 MP frame decodes to 120 MB (RGB), and cameras of
            // 8K (7680 x 4320, 33 MP) pass.
            max_image_side: 8192,
            max_image_pixels: 40_000_000,
            truncated: WhenTruncated::DeadLetter,
        }
    }
}

impl Default for UplinkConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            brokers: String::new(),
            group_id: String::new(),
            results_topic: "fovea.results".into(),
            frames_topic: "fovea.frames".into(),
            bandwidth_bytes_per_sec: 0,
            record_limit_bytes: 1 << 20,
            deadletter_topic: "fovea.uplink-deadletter".into(),
            compression: "zstd".into(),
            max_in_flight: 256,
            retention_warn_share: 0.8,
            security: UplinkSecurity::default(),
            frames: Default::default(),
        }
    }
}

impl Default for UplinkSecurity {
    fn default() -> Self {
        Self {
            protocol: "plaintext".into(),
            sasl_mechanism: String::new(),
            sasl_username: String::new(),
            sasl_password: String::new(),
            ssl_ca_location: String::new(),
            ssl_certificate_location: String::new(),
            ssl_key_location: String::new(),
            ssl_key_password: String::new(),
        }
    }
}

impl Default for LargeFramesConfig {
    fn default() -> Self {
        Self {
            policy: LargeFramePolicy::Chunk,
            max_in_flight: 2,
            max_chunked_uploads: 64,
            chunk_timeout_ms: 30_000,
            store_dir: PathBuf::new(),
            store_max_bytes: 4 << 30,
            retention_hours: 72,
            http_listen: "127.0.0.1:8088".into(),
            public_url: String::new(),
        }
    }
}

impl Default for SpoolConfig {
    fn default() -> Self {
        Self {
            dir: PathBuf::new(),
            max_bytes: 1 << 30,
            when_full: crate::spool::WhenFull::DropOldestFrames,
            divert_after_ms: 5_000,
            slow_inflight_bytes: 64 << 20,
            probe_interval_ms: 1_000,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn default_toml_is_the_default_config() {
        let config = load_str(DEFAULT_TOML, Path::new("/nonexistent"), Vec::new())
            .unwrap_or_else(|e| panic!("default.toml does not load:\n{e}"));
        assert_eq!(config, Config::default());
    }

    /// Equal values are not enough: a key left out of default.toml would still load as its
    /// default. Every key must be written out (the optional ones as comments).
    #[test]
    fn default_toml_documents_every_key() {
        fn check(prefix: &str, wanted: &toml::Table, written: &toml::Table) {
            for (key, value) in wanted {
                let path = format!("{prefix}{key}");
                let Some(found) = written.get(key) else {
                    panic!("default.toml lacks `{path}`");
                };
                if let (toml::Value::Table(w), toml::Value::Table(f)) = (value, found) {
                    check(&format!("{path}."), w, f);
                }
            }
        }
        let wanted = toml::Table::try_from(Config::default()).unwrap();
        let written: toml::Table = toml::from_str(DEFAULT_TOML).unwrap();
        check("", &wanted, &written);
        for optional in ["# username = ", "# password = "] {
            assert!(
                DEFAULT_TOML.contains(optional),
                "default.toml lacks `{optional}`"
            );
        }
    }
}
