//! Loading: text -> TOML table -> env overrides -> typed `Config` -> semantic checks -> paths
//! resolved. Each step adds to one error list; the caller gets all of it or a usable config.

use super::{Config, ConfigError, ConfigErrors, deser, env, validate};
use std::path::{Path, PathBuf};

/// Read the file, apply env overrides, parse, resolve relative paths, validate; every error at
/// once. Relative paths in the file are resolved against the file's own folder.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let text = std::fs::read_to_string(path).map_err(|e| {
        ConfigErrors(vec![ConfigError::new(
            "",
            format!("cannot read {}: {e}", path.display()),
        )])
    })?;
    // Absolute first: the parent of a bare `fovea.toml` is "", which would mean the working
    // directory again by the time the paths are used.
    let absolute = std::path::absolute(path).unwrap_or_else(|_| path.to_path_buf());
    let base_dir = absolute.parent().unwrap_or(Path::new("/"));
    // Variables that are not UTF-8 cannot be config values (every key is text); skip them.
    let env = std::env::vars_os()
        .filter_map(|(name, value)| Some((name.into_string().ok()?, value.into_string().ok()?)));
    load_str(&text, base_dir, env)
}

/// Same from text: `base_dir` resolves relative paths; `env` is the environment to read
/// overrides from (pass an empty list to ignore the process environment, as tests do).
pub fn load_str(
    text: &str,
    base_dir: &Path,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<Config, ConfigErrors> {
    let mut doc: toml::Table = text
        .parse()
        .map_err(|e: toml::de::Error| ConfigErrors(vec![syntax_error(text, &e)]))?;

    let mut errors = Vec::new();
    let overrides = env::apply(&mut doc, env, &mut errors);
    let mut typed = deser::deserialize(toml::Value::Table(doc), &overrides, &mut errors);

    let Some(mut config) = typed.config.take() else {
        return Err(ConfigErrors(errors));
    };
    for problem in validate::validate(&config) {
        let path = typed.original(&problem.path);
        // A rejected value has its default now; judging that default (or the table or array
        // around it) would only repeat the complaint about the same key.
        if typed
            .rejected
            .iter()
            .any(|r| r.starts_with(&path) || path.starts_with(r))
        {
            continue;
        }
        let mut message = problem.message;
        if let Some(o) = overrides.iter().find(|o| path.starts_with(&o.path)) {
            message = format!("{message} (set by {})", o.var);
        }
        errors.push(ConfigError::new(path.to_string(), message));
    }
    if !errors.is_empty() {
        return Err(ConfigErrors(errors));
    }
    resolve_paths(&mut config, base_dir);
    Ok(config)
}

/// One error for a file that is not TOML, pointing at the line and column.
fn syntax_error(text: &str, error: &toml::de::Error) -> ConfigError {
    let message = error.message().trim();
    let Some(span) = error.span() else {
        return ConfigError::new("", format!("TOML syntax error: {message}"));
    };
    let before = text.get(..span.start).unwrap_or(text);
    let line = before.matches('\n').count() + 1;
    let column = before.rsplit('\n').next().unwrap_or("").chars().count() + 1;
    ConfigError::new(
        "",
        format!("TOML syntax error at line {line}, column {column}: {message}"),
    )
}

/// Makes the relative paths absolute against the config file's folder: under systemd the working
/// directory is `/`, so "relative to where fovea was started" would mean nothing useful.
fn resolve_paths(config: &mut Config, base_dir: &Path) {
    let resolve = |path: &mut PathBuf| {
        if path.is_relative() {
            *path = base_dir.join(&*path);
        }
    };
    resolve(&mut config.node.state_dir);
    // Empty means "use ORT_DYLIB_PATH", not "the config folder".
    if !config.inference.onnxruntime_library.as_os_str().is_empty() {
        resolve(&mut config.inference.onnxruntime_library);
    }
    config.models.iter_mut().for_each(|m| resolve(&mut m.path));
    if !config.large_frames.store_dir.as_os_str().is_empty() {
        resolve(&mut config.large_frames.store_dir);
    }
    // Empty means "inside the state directory" (see `Config::spool_dir`).
    if !config.spool.dir.as_os_str().is_empty() {
        resolve(&mut config.spool.dir);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: &str = "/etc/fovea";

    fn load_env(text: &str, env: &[(&str, &str)]) -> Result<Config, ConfigErrors> {
        let env = env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned()));
        load_str(text, Path::new(BASE), env)
    }

    fn errors(text: &str, env: &[(&str, &str)]) -> Vec<String> {
        match load_env(text, env) {
            Ok(_) => panic!("expected errors"),
            Err(errors) => errors.iter().map(ToString::to_string).collect(),
        }
    }

    /// A retention table that names one key keeps its class's defaults for the others (not
    /// Kafka's, which would make the frames unbounded).
    #[test]
    fn a_partial_retention_table_keeps_its_class_defaults() {
        let config = load_env("[kafka.retention.frames]\nretention_ms = 3600000\n", &[]).unwrap();
        let frames = config.kafka.retention.frames.settings();
        let default = Config::default().kafka.retention.frames.settings();
        assert_eq!(frames.retention_ms, 3_600_000);
        assert_eq!(frames.retention_bytes, default.retention_bytes);
        assert_eq!(frames.segment_bytes, default.segment_bytes);
        assert_ne!(
            config.kafka.retention.results.retention_ms,
            frames.retention_ms
        );
    }

    #[test]
    fn empty_config_is_the_default() {
        assert_eq!(load_env("", &[]).unwrap(), Config::default());
    }

    #[test]
    fn mistakes_in_different_tables_are_all_reported() {
        let text = "[mqtt]\nhostt = \"broker\"\n[kafka]\npartitions = \"three\"\n";
        assert_eq!(
            errors(text, &[]),
            [
                "kafka.partitions: invalid type: string \"three\", expected i32",
                "mqtt.hostt: unknown key (did you mean `mqtt.host`?)",
            ]
        );
    }

    #[test]
    fn type_errors_in_one_table_are_all_reported() {
        let text = "[mqtt]\nport = \"x\"\nkeep_alive_secs = true\nhost = \"ok\"\n";
        assert_eq!(
            errors(text, &[]),
            [
                "mqtt.keep_alive_secs: invalid type: boolean `true`, expected u64",
                "mqtt.port: invalid type: string \"x\", expected u16",
            ]
        );
    }

    #[test]
    fn semantic_and_type_errors_are_reported_together() {
        let text = "[mqtt]\nport = -1\n[kafka]\ncompression = \"brotli\"\n";
        let errors = errors(text, &[]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("mqtt.port: invalid value: integer `-1`"));
        assert!(errors[1].starts_with("kafka.compression: \"brotli\" is not one of"));
    }

    #[test]
    fn env_overrides_numbers_strings_and_nested_keys() {
        let env = [
            ("FOVEA_MQTT__PORT", "1884"),
            ("FOVEA_KAFKA__BROKERS", "10.0.0.5:9092"),
            ("FOVEA_KAFKA__TOPICS__RESULTS", "site1.results"),
            ("FOVEA_NODE__ID", "42"),
            ("FOVEA_MQTT__USERNAME", "007"),
            ("FOVEA_CONFIG", "/etc/fovea/fovea.toml"),
        ];
        let config = load_env("mqtt.port = 1999\n", &env).unwrap();
        assert_eq!(config.mqtt.port, 1884);
        assert_eq!(config.kafka.brokers, "10.0.0.5:9092");
        assert_eq!(config.kafka.topics.results, "site1.results");
        assert_eq!(config.node.id, "42");
        assert_eq!(config.mqtt.username.as_deref(), Some("007"));
    }

    #[test]
    fn semantic_errors_keep_file_indices_after_a_rejected_element() {
        let text = "[[routes]]\ncameras = 3\n[[routes]]\ncameras = \"a\"\nmodels = [\"\"]\n";
        let errors = errors(text, &[]);
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("routes[0].cameras: invalid type: integer `3`"));
        assert_eq!(
            errors[1],
            "routes[1].models[0]: model name must not be empty"
        );
    }

    #[test]
    fn env_override_of_an_unknown_key_is_reported() {
        let env = [("FOVEA_MQTT__HOSTT", "broker"), ("FOVEA_MQTT__PORT", "x")];
        assert_eq!(
            errors("", &env),
            [
                "env FOVEA_MQTT__HOSTT: `mqtt.hostt`: unknown key (did you mean `mqtt.host`?)",
                "env FOVEA_MQTT__PORT: `mqtt.port`: invalid type: string \"x\", expected u16",
            ]
        );
    }

    #[test]
    fn env_values_are_validated_and_named() {
        assert_eq!(
            errors("", &[("FOVEA_MQTT__PORT", "0")]),
            ["mqtt.port: must not be 0 (set by FOVEA_MQTT__PORT)"]
        );
    }

    #[test]
    fn relative_paths_resolve_against_base_dir() {
        let text = "node.state_dir = \"state\"\ninference.onnxruntime_library = \"lib/ort.so\"\n\
                    [[models]]\npath = \"models/a\"\n[[models]]\npath = \"/abs/b\"\n";
        let config = load_env(text, &[]).unwrap();
        assert_eq!(config.node.state_dir, Path::new("/etc/fovea/state"));
        assert_eq!(
            config.inference.onnxruntime_library,
            Path::new("/etc/fovea/lib/ort.so")
        );
        assert_eq!(config.models[0].path, Path::new("/etc/fovea/models/a"));
        assert_eq!(config.models[1].path, Path::new("/abs/b"));
        let config = load_env("", &[]).unwrap();
        assert_eq!(config.inference.onnxruntime_library, Path::new(""));
    }

    #[test]
    fn syntax_error_names_line_and_column() {
        let errors = errors("[mqtt]\nport = 1883\nhost = \n", &[]);
        assert_eq!(errors.len(), 1, "{errors:?}");
        assert!(
            errors[0].starts_with("TOML syntax error at line 3, column"),
            "{errors:?}"
        );
    }

    #[test]
    fn load_reads_a_file_and_resolves_against_its_folder() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("fovea.toml");
        std::fs::write(&file, "[[models]]\npath = \"m\"\n").unwrap();
        let config = load(&file).unwrap();
        assert_eq!(config.models[0].path, dir.path().join("m"));
        let missing = load(&dir.path().join("nope.toml")).unwrap_err();
        assert!(missing.to_string().starts_with("cannot read "));
    }

    #[test]
    fn node_and_client_ids_fall_back_to_the_hostname() {
        let mut config = Config::default();
        let id = config.node_id();
        assert!(!id.is_empty());
        assert_eq!(config.mqtt_client_id(), format!("fovea-{id}"));
        config.node.id = "edge-7".into();
        config.mqtt.client_id = "cam-gw".into();
        assert_eq!(config.node_id(), "edge-7");
        assert_eq!(config.mqtt_client_id(), "cam-gw");
    }
}
