//! Typing the document with every mistake reported: deserialize, and on a type error record it,
//! remove the offending key (so its default applies) and try again, until the rest is clean.
//! Keys that nothing reads are collected on the way (serde_ignored) and reported as unknown.

use super::env::EnvOverride;
use super::keypath::{KeyPath, Seg};
use super::{Config, ConfigError};
use toml::Value;

/// A structural problem, kept with its path until the list is sorted and labelled.
struct Found {
    path: KeyPath,
    message: String,
    /// An unknown key changes no value; a bad value was replaced by its default.
    unknown: bool,
}

/// The outcome of typing: the config (with defaults where values were bad) and what the loader
/// needs to report semantic problems in the file's terms.
pub(super) struct Typed {
    /// `None` only if a problem could not be removed to go on (never expected with a TOML
    /// table; reported all the same).
    pub(super) config: Option<Config>,
    /// Keys whose value was rejected (file paths): a semantic check there would judge the
    /// default that replaced it, and only repeat the complaint.
    pub(super) rejected: Vec<KeyPath>,
    /// Array elements removed, as (array path, index) in the original document: paths into the
    /// typed config are shifted after them and are mapped back with `original`.
    removed: Vec<(KeyPath, usize)>,
}

impl Typed {
    /// The file's path for a path into the typed config.
    pub(super) fn original(&self, path: &KeyPath) -> KeyPath {
        original(path, &self.removed)
    }
}

/// Types `doc` into a `Config`, pushing every problem to `errors`.
pub(super) fn deserialize(
    mut doc: Value,
    overrides: &[EnvOverride],
    errors: &mut Vec<ConfigError>,
) -> Typed {
    let mut found: Vec<Found> = Vec::new();
    let mut removed: Vec<(KeyPath, usize)> = Vec::new();
    // Overrides already turned back into their raw text (each at most once).
    let mut stringified = vec![false; overrides.len()];

    let config = loop {
        let mut ignored = Vec::new();
        let result: Result<Config, _> = {
            let mut note =
                |path: serde_ignored::Path<'_>| ignored.push(KeyPath::from_ignored(&path));
            serde_path_to_error::deserialize(serde_ignored::Deserializer::new(
                doc.clone(),
                &mut note,
            ))
        };
        // Unknown keys seen before a failure count too: a misspelt required key shows up both
        // as unknown and as missing, and both are worth saying.
        for path in ignored {
            let path = original(&path, &removed);
            if !found.iter().any(|f| f.path == path) {
                let message = unknown_key_message(&path);
                found.push(Found {
                    path,
                    message,
                    unknown: true,
                });
            }
        }
        let error = match result {
            Ok(config) => break Some(config),
            Err(error) => error,
        };
        let message = error.inner().message().trim().to_owned();
        let Some(current) = KeyPath::from_serde(error.path()) else {
            found.push(Found {
                path: KeyPath::default(),
                message,
                unknown: false,
            });
            break None;
        };

        // An override read as a number (say) where a string is wanted: use the text as written.
        if message.ends_with("expected a string") {
            let raw = overrides
                .iter()
                .enumerate()
                .find(|(i, o)| o.path == current && !stringified[*i]);
            if let Some((i, o)) = raw
                && let Some(slot) = current.get_mut(&mut doc)
            {
                *slot = Value::String(o.raw.clone());
                stringified[i] = true;
                continue;
            }
        }

        let path = original(&current, &removed);
        // After a bad required key is removed, its table reports it missing: already said.
        let echo = missing_field(&message).is_some_and(|field| {
            let mut field_path = path.clone();
            field_path.0.push(Seg::Key(field.to_owned()));
            found.iter().any(|f| f.path == field_path)
        });
        if !echo {
            found.push(Found {
                path: path.clone(),
                message,
                unknown: false,
            });
        }
        if !current.remove(&mut doc) {
            break None;
        }
        if let Some((Seg::Index(index), array)) = path.0.split_last() {
            removed.push((KeyPath(array.to_vec()), *index));
        }
    };

    found.sort_by(|a, b| a.path.cmp(&b.path));
    let rejected = found
        .iter()
        .filter(|f| !f.unknown)
        .map(|f| f.path.clone())
        .collect();
    for Found { path, message, .. } in found {
        errors.extend(label(&path, message, overrides));
    }
    Typed {
        config,
        rejected,
        removed,
    }
}

/// The field named by serde's "missing field `x`" message.
fn missing_field(message: &str) -> Option<&str> {
    message.strip_prefix("missing field `")?.strip_suffix('`')
}

/// Maps a path in the current (pruned) document back to the original one.
fn original(current: &KeyPath, removed: &[(KeyPath, usize)]) -> KeyPath {
    let mut out = KeyPath::default();
    for seg in &current.0 {
        let seg = match seg {
            Seg::Index(index) => {
                let mut gone: Vec<usize> = removed
                    .iter()
                    .filter(|(array, _)| *array == out)
                    .map(|(_, i)| *i)
                    .collect();
                gone.sort_unstable();
                let mut index = *index;
                for i in gone {
                    if i <= index {
                        index += 1;
                    }
                }
                Seg::Index(index)
            }
            key => key.clone(),
        };
        out.0.push(seg);
    }
    out
}

/// The error(s) for a problem at `path`: under the override(s) that set it when it came from the
/// environment, else under the path itself.
fn label(path: &KeyPath, message: String, overrides: &[EnvOverride]) -> Vec<ConfigError> {
    let from_env: Vec<&EnvOverride> = overrides
        .iter()
        .filter(|o| path.starts_with(&o.path) || o.path.starts_with(path))
        .collect();
    if from_env.is_empty() {
        return vec![ConfigError::new(path.to_string(), message)];
    }
    from_env
        .into_iter()
        .map(|o| ConfigError::new(o.label(), format!("`{path}`: {message}")))
        .collect()
}

fn unknown_key_message(path: &KeyPath) -> String {
    match suggestion(path) {
        Some(known) => format!("unknown key (did you mean `{known}`?)"),
        None => "unknown key".to_owned(),
    }
}

/// The known key closest to an unknown one, when it is close enough to be the obvious intent.
fn suggestion(path: &KeyPath) -> Option<KeyPath> {
    let (Seg::Key(unknown), parent) = path.0.split_last()? else {
        return None;
    };
    let sample = schema_sample();
    // Arrays of tables: any element shows the keys; the sample's first one is enough.
    let parent_in_sample = KeyPath(
        parent
            .iter()
            .map(|seg| match seg {
                Seg::Index(_) => Seg::Index(0),
                key => key.clone(),
            })
            .collect(),
    );
    let Some(Value::Table(known)) = parent_in_sample.get(&sample) else {
        return None;
    };
    let (best, distance) = known
        .keys()
        .map(|k| (k, edit_distance(unknown, k)))
        .min_by_key(|(_, d)| *d)?;
    (distance <= (unknown.len() / 3).max(1)).then(|| {
        let mut out = KeyPath(parent.to_vec());
        out.0.push(Seg::Key(best.clone()));
        out
    })
}

/// Every key the schema knows, as a document: the defaults, with the optional keys filled in.
fn schema_sample() -> Value {
    let mut config = Config::default();
    config.mqtt.username = Some(String::new());
    config.mqtt.password = Some(String::new());
    Value::try_from(config).unwrap_or(Value::Table(toml::Table::new()))
}

/// Levenshtein distance, on chars.
fn edit_distance(a: &str, b: &str) -> usize {
    let b: Vec<char> = b.chars().collect();
    let mut row: Vec<usize> = (0..=b.len()).collect();
    for (i, ca) in a.chars().enumerate() {
        let mut diagonal = row[0];
        row[0] = i + 1;
        for (j, cb) in b.iter().enumerate() {
            let above = row[j + 1];
            row[j + 1] = (above + 1)
                .min(row[j] + 1)
                .min(diagonal + usize::from(ca != *cb));
            diagonal = above;
        }
    }
    row[b.len()]
}

#[cfg(test)]
mod tests {
    use super::*;

    fn errors_of(text: &str) -> Vec<String> {
        let doc = Value::Table(toml::from_str(text).unwrap());
        let mut errors = Vec::new();
        deserialize(doc, &[], &mut errors);
        errors.iter().map(ToString::to_string).collect()
    }

    #[test]
    fn unknown_keys_get_a_suggestion_when_one_is_close() {
        let errors = errors_of("mqtt.hostt = 'x'\n[[models]]\npat = 'a'\n[kafka]\nzzz = 1");
        assert_eq!(
            errors,
            [
                "kafka.zzz: unknown key",
                "models[0]: missing field `path`",
                "models[0].pat: unknown key (did you mean `models[0].path`?)",
                "mqtt.hostt: unknown key (did you mean `mqtt.host`?)",
            ]
        );
    }

    #[test]
    fn indices_after_a_removed_element_are_the_original_ones() {
        let errors = errors_of("mqtt.topics = [1, 'a/+/b', 2]");
        assert_eq!(errors.len(), 2, "{errors:?}");
        assert!(errors[0].starts_with("mqtt.topics[0]: invalid type: integer"));
        assert!(errors[1].starts_with("mqtt.topics[2]: invalid type: integer"));
    }

    #[test]
    fn a_bad_required_key_is_reported_once() {
        let errors = errors_of("[[models]]\npath = 3\n[[models]]\n[[models]]\npath = 'ok'");
        assert_eq!(
            errors,
            [
                "models[0].path: invalid type: integer `3`, expected path string",
                "models[1]: missing field `path`",
            ]
        );
    }

    #[test]
    fn edit_distance_counts_edits() {
        assert_eq!(edit_distance("hostt", "host"), 1);
        assert_eq!(edit_distance("prot", "port"), 2);
        assert_eq!(edit_distance("", "abc"), 3);
    }
}
