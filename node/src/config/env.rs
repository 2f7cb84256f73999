//! Environment overrides: `FOVEA_<SECTION>__<KEY>=value` sets `section.key` before the document
//! is typed, so an override is checked exactly like the same key written in the file.
//!
//! Only names with a `__` after the prefix are overrides; other `FOVEA_` variables (such as the
//! CLI's own) are left alone. Levels are separated by `__` and lowercased
//! (`FOVEA_KAFKA__TOPICS__RESULTS` -> `kafka.topics.results`). The value is read as a TOML value
//! when it is one (`1884`, `true`, `["a/+/b"]`), else as a string (`10.0.0.5:9092`); a string key
//! given a value that reads as something else (`FOVEA_NODE__ID=42`) gets the raw text instead.

use super::ConfigError;
use super::keypath::KeyPath;
use toml::{Table, Value};

const PREFIX: &str = "FOVEA_";
const LEVEL_SEPARATOR: &str = "__";

/// One override that was applied, kept so errors about its key can name the variable.
#[derive(Debug, Clone)]
pub(super) struct EnvOverride {
    /// The variable's name, e.g. `FOVEA_MQTT__PORT`.
    pub(super) var: String,
    /// The key it set, e.g. `mqtt.port`.
    pub(super) path: KeyPath,
    /// The value as written, for when the key turns out to want a string.
    pub(super) raw: String,
}

impl EnvOverride {
    /// The path errors about this override are reported under.
    pub(super) fn label(&self) -> String {
        format!("env {}", self.var)
    }
}

/// Sets every `FOVEA_*__*` variable of `env` in `doc`, in name order (so the result does not
/// depend on the environment's order). Malformed names are reported in `errors`.
pub(super) fn apply(
    doc: &mut Table,
    env: impl IntoIterator<Item = (String, String)>,
    errors: &mut Vec<ConfigError>,
) -> Vec<EnvOverride> {
    let mut vars: Vec<(String, String)> = env
        .into_iter()
        .filter(|(name, _)| {
            name.strip_prefix(PREFIX)
                .is_some_and(|rest| rest.contains(LEVEL_SEPARATOR))
        })
        .collect();
    vars.sort();

    let mut applied = Vec::new();
    for (var, raw) in vars {
        let rest = &var[PREFIX.len()..];
        let levels: Vec<String> = rest
            .split(LEVEL_SEPARATOR)
            .map(str::to_ascii_lowercase)
            .collect();
        if levels.iter().any(String::is_empty) {
            errors.push(ConfigError::new(
                format!("env {var}"),
                "malformed override name: expected FOVEA_<SECTION>__<KEY> with no empty level",
            ));
            continue;
        }
        let path = KeyPath::keys(levels.iter().cloned());
        match set(doc, &levels, parse_value(&raw)) {
            Ok(()) => applied.push(EnvOverride { var, path, raw }),
            Err(not_a_table) => errors.push(ConfigError::new(
                format!("env {var}"),
                format!("cannot set `{path}`: `{not_a_table}` is not a table"),
            )),
        }
    }
    applied
}

/// The value as TOML when it is a TOML value, else the text itself.
fn parse_value(raw: &str) -> Value {
    raw.parse::<Value>()
        .unwrap_or_else(|_| Value::String(raw.to_owned()))
}

/// Sets `levels` in `doc`, creating tables on the way. Err: the prefix that holds a non-table.
fn set(doc: &mut Table, levels: &[String], value: Value) -> Result<(), KeyPath> {
    let Some((last, parents)) = levels.split_last() else {
        return Ok(());
    };
    let mut table = doc;
    for (depth, level) in parents.iter().enumerate() {
        let entry = table
            .entry(level.clone())
            .or_insert_with(|| Value::Table(Table::new()));
        table = match entry {
            Value::Table(t) => t,
            _ => return Err(KeyPath::keys(levels[..=depth].iter().cloned())),
        };
    }
    table.insert(last.clone(), value);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(list: &[(&str, &str)]) -> Vec<(String, String)> {
        list.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn values_are_typed_when_they_read_as_toml() {
        let mut doc = Table::new();
        let mut errors = Vec::new();
        let env = vars(&[
            ("FOVEA_MQTT__PORT", "1884"),
            ("FOVEA_KAFKA__BROKERS", "10.0.0.5:9092"),
            ("FOVEA_KAFKA__TOPICS__RESULTS", "x"),
            ("FOVEA_CONFIG", "/etc/fovea.toml"),
            ("PATH", "/usr/bin"),
        ]);
        let applied = apply(&mut doc, env, &mut errors);
        assert!(errors.is_empty(), "{errors:?}");
        assert_eq!(applied.len(), 3);
        let expected: Table = toml::from_str(
            "mqtt.port = 1884\nkafka.brokers = \"10.0.0.5:9092\"\nkafka.topics.results = \"x\"",
        )
        .unwrap();
        assert_eq!(doc, expected);
    }

    #[test]
    fn malformed_names_and_non_tables_are_reported() {
        let mut doc: Table = toml::from_str("mqtt.port = 1").unwrap();
        let mut errors = Vec::new();
        let env = vars(&[("FOVEA_MQTT____PORT", "1"), ("FOVEA_MQTT__PORT__X", "1")]);
        apply(&mut doc, env, &mut errors);
        let paths: Vec<_> = errors.iter().map(|e| e.path.as_str()).collect();
        // In name order: `P` sorts before `_`.
        assert_eq!(paths, ["env FOVEA_MQTT__PORT__X", "env FOVEA_MQTT____PORT"]);
        assert!(errors[0].message.contains("`mqtt.port` is not a table"));
    }
}
