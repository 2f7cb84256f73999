//! Key paths into the TOML document (`mqtt.port`, `models[0].path`): the one vocabulary shared by
//! the parser errors, the unknown-key report, the env overrides and the retry loop that removes
//! bad keys.

use std::fmt;
use toml::Value;

/// One step of a path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub(super) enum Seg {
    Key(String),
    Index(usize),
}

#[derive(Debug, Clone, Default, PartialEq, Eq, PartialOrd, Ord)]
pub(super) struct KeyPath(pub(super) Vec<Seg>);

impl KeyPath {
    pub(super) fn keys<S: Into<String>>(keys: impl IntoIterator<Item = S>) -> Self {
        Self(keys.into_iter().map(|k| Seg::Key(k.into())).collect())
    }

    /// The path serde_ignored reports for a key nothing wanted.
    pub(super) fn from_ignored(path: &serde_ignored::Path<'_>) -> Self {
        use serde_ignored::Path as P;
        match path {
            P::Root => Self::default(),
            P::Seq { parent, index } => Self::from_ignored(parent).with(Seg::Index(*index)),
            P::Map { parent, key } => Self::from_ignored(parent).with(Seg::Key(key.clone())),
            P::Some { parent } | P::NewtypeStruct { parent } | P::NewtypeVariant { parent } => {
                Self::from_ignored(parent)
            }
        }
    }

    /// The path serde_path_to_error reports for a failed value; `None` when it passes through a
    /// non-string key (not possible in TOML, so a bug rather than a config mistake).
    pub(super) fn from_serde(path: &serde_path_to_error::Path) -> Option<Self> {
        use serde_path_to_error::Segment;
        let mut segs = Vec::new();
        for seg in path {
            match seg {
                Segment::Seq { index } => segs.push(Seg::Index(*index)),
                Segment::Map { key } => segs.push(Seg::Key(key.clone())),
                // A unit variant read from a string: the field itself is the place to point at.
                Segment::Enum { .. } => {}
                Segment::Unknown => return None,
            }
        }
        Some(Self(segs))
    }

    fn with(mut self, seg: Seg) -> Self {
        self.0.push(seg);
        self
    }

    /// This path, then element `index`.
    pub(super) fn index(self, index: usize) -> Self {
        self.with(Seg::Index(index))
    }

    /// This path, then `key`.
    pub(super) fn key(self, key: impl Into<String>) -> Self {
        self.with(Seg::Key(key.into()))
    }

    pub(super) fn starts_with(&self, prefix: &KeyPath) -> bool {
        self.0.starts_with(&prefix.0)
    }

    /// The value at this path, if the document has one.
    pub(super) fn get<'a>(&self, mut value: &'a Value) -> Option<&'a Value> {
        for seg in &self.0 {
            value = match (seg, value) {
                (Seg::Key(k), Value::Table(t)) => t.get(k)?,
                (Seg::Index(i), Value::Array(a)) => a.get(*i)?,
                _ => return None,
            };
        }
        Some(value)
    }

    pub(super) fn get_mut<'a>(&self, mut value: &'a mut Value) -> Option<&'a mut Value> {
        for seg in &self.0 {
            value = match (seg, value) {
                (Seg::Key(k), Value::Table(t)) => t.get_mut(k)?,
                (Seg::Index(i), Value::Array(a)) => a.get_mut(*i)?,
                _ => return None,
            };
        }
        Some(value)
    }

    /// Removes the value at this path; false when there is none (or the path is the root).
    pub(super) fn remove(&self, root: &mut Value) -> bool {
        let Some((last, parent)) = self.0.split_last() else {
            return false;
        };
        match (last, KeyPath(parent.to_vec()).get_mut(root)) {
            (Seg::Key(k), Some(Value::Table(t))) => t.remove(k).is_some(),
            (Seg::Index(i), Some(Value::Array(a))) if *i < a.len() => {
                a.remove(*i);
                true
            }
            _ => false,
        }
    }
}

/// A dotted path of plain keys, as written in code: `"mqtt.port"`.
impl From<&str> for KeyPath {
    fn from(dotted: &str) -> Self {
        Self::keys(dotted.split('.'))
    }
}

impl fmt::Display for KeyPath {
    /// TOML-like: `kafka.topics.results`, `models[0].path`, `log.modules."fovea::ingress"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Index(index) => write!(f, "[{index}]")?,
                Seg::Key(key) => {
                    if i > 0 {
                        f.write_str(".")?;
                    }
                    let bare = !key.is_empty()
                        && key
                            .chars()
                            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-');
                    if bare {
                        f.write_str(key)?;
                    } else {
                        write!(f, "{key:?}")?;
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_quotes_keys_that_are_not_bare() {
        let path = KeyPath(vec![
            Seg::Key("models".into()),
            Seg::Index(2),
            Seg::Key("path".into()),
        ]);
        assert_eq!(path.to_string(), "models[2].path");
        let path = KeyPath::keys(["log", "modules", "fovea::ingress"]);
        assert_eq!(path.to_string(), r#"log.modules."fovea::ingress""#);
    }

    #[test]
    fn remove_takes_keys_and_array_elements() {
        let mut doc: Value = Value::Table(toml::from_str("a = [1, 2]\n[b]\nc = 3").unwrap());
        assert!(KeyPath(vec![Seg::Key("a".into()), Seg::Index(0)]).remove(&mut doc));
        assert!(KeyPath::keys(["b", "c"]).remove(&mut doc));
        assert!(!KeyPath::keys(["b", "c"]).remove(&mut doc));
        let expected: toml::Table = toml::from_str("a = [2]\n[b]").unwrap();
        assert_eq!(doc, Value::Table(expected));
    }
}
