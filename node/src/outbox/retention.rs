//! Checking a topic's retention against the config: pure comparison of what the broker reports
//! with what fovea wants, so the decisions (leave it, correct it, warn that it cannot be checked)
//! are unit-tested without a broker. `topics.rs` does the I/O.

use crate::config::Retention;
use std::collections::HashMap;

/// One setting of one topic that is not what the config asks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mismatch {
    pub key: &'static str,
    pub wanted: String,
    /// What the broker reports; `None` when it reports nothing for the key (nisshi reports only
    /// the settings a topic was created or altered with).
    pub found: Option<String>,
}

impl std::fmt::Display for Mismatch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.found {
            Some(found) => write!(f, "{}={found} (wanted {})", self.key, self.wanted),
            None => write!(f, "{} not reported (wanted {})", self.key, self.wanted),
        }
    }
}

/// The settings of `wanted` that `reported` (key -> value, as DescribeConfigs gives them) does
/// not match. Values are compared as numbers where both parse, so `"+3600000"` matches.
pub fn mismatches(wanted: &Retention, reported: &HashMap<String, Option<String>>) -> Vec<Mismatch> {
    wanted
        .entries()
        .into_iter()
        .filter_map(|(key, want)| {
            let found = reported.get(key).cloned().flatten();
            let same = found.as_deref().is_some_and(|f| {
                let f = f.trim();
                f == want || f.parse::<i64>().ok() == want.parse::<i64>().ok()
            });
            (!same).then_some(Mismatch {
                key,
                wanted: want,
                found,
            })
        })
        .collect()
}

/// What to log about a topic after the (optional) correction, from what was found before and
/// after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// Everything as configured from the start.
    AsConfigured,
    /// Differed, and now matches.
    Corrected(Vec<Mismatch>),
    /// Still differs: the broker refused or ignored the change, or correcting is off.
    Differs(Vec<Mismatch>),
    /// The broker reports nothing for these keys even after setting them: fovea cannot tell
    /// whether it honours them.
    Unreported(Vec<&'static str>),
}

pub fn verdict(before: Vec<Mismatch>, after: Vec<Mismatch>) -> Verdict {
    if before.is_empty() {
        return Verdict::AsConfigured;
    }
    if after.is_empty() {
        return Verdict::Corrected(before);
    }
    if after.iter().all(|m| m.found.is_none()) {
        return Verdict::Unreported(after.iter().map(|m| m.key).collect());
    }
    Verdict::Differs(after)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wanted() -> Retention {
        Retention {
            retention_ms: 3_600_000,
            retention_bytes: 1 << 30,
            segment_bytes: 64 << 20,
        }
    }

    fn reported(pairs: &[(&str, &str)]) -> HashMap<String, Option<String>> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), Some((*v).to_owned())))
            .collect()
    }

    #[test]
    fn equal_values_match_even_when_written_differently() {
        let r = reported(&[
            ("retention.ms", " +3600000"),
            ("retention.bytes", "1073741824"),
            ("segment.bytes", "67108864"),
            ("cleanup.policy", "delete"),
        ]);
        assert!(mismatches(&wanted(), &r).is_empty());
    }

    #[test]
    fn missing_and_different_values_are_named() {
        let r = reported(&[("retention.ms", "604800000")]);
        let m = mismatches(&wanted(), &r);
        assert_eq!(m.len(), 3);
        assert_eq!(m[0].to_string(), "retention.ms=604800000 (wanted 3600000)");
        assert_eq!(
            m[1].to_string(),
            "retention.bytes not reported (wanted 1073741824)"
        );
    }

    #[test]
    fn verdicts() {
        let differs = mismatches(&wanted(), &reported(&[("retention.ms", "1")]));
        assert_eq!(verdict(vec![], vec![]), Verdict::AsConfigured);
        assert!(matches!(
            verdict(differs.clone(), vec![]),
            Verdict::Corrected(_)
        ));
        // Only the unreported keys remain: the broker accepted the change but does not say.
        let unreported: Vec<_> = differs[1..].to_vec();
        assert_eq!(
            verdict(differs.clone(), unreported),
            Verdict::Unreported(vec!["retention.bytes", "segment.bytes"])
        );
        assert!(matches!(
            verdict(differs.clone(), differs),
            Verdict::Differs(_)
        ));
    }
}
