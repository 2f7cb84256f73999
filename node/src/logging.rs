//! Logging: to journald when the process runs under systemd (structured fields, levels kept), else
//! to stderr as one line per event: `unix-seconds.millis LEVEL target: message key=value ...`.
//! Key-values given to the log macros (`log::info!(camera = id; "...")`) become journald fields or
//! trailing `key=value` pairs. Levels come from the config: a default and per-module ones.

use crate::config::LogConfig;
use log::{Level, LevelFilter, Log, Metadata, Record};
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::io::Write;
use std::str::FromStr;

/// Installs the logger once. `override_level` (from `--log-level` or `RUST_LOG`-like use) wins over
/// the config's default level.
pub fn init(cfg: &LogConfig, override_level: Option<&str>) -> anyhow::Result<()> {
    let filter = Filter::new(override_level.unwrap_or(&cfg.level), &cfg.modules);
    log::set_max_level(filter.max());
    if systemd_journal_logger::connected_to_journal() {
        let journal = systemd_journal_logger::JournalLog::new()?;
        log::set_boxed_logger(Box::new(Filtered {
            filter,
            inner: journal,
        }))?;
    } else {
        log::set_boxed_logger(Box::new(Filtered {
            filter,
            inner: Stderr,
        }))?;
    }
    Ok(())
}

#[derive(Debug, Clone)]
struct Filter {
    default: LevelFilter,
    /// Longest module prefix wins.
    modules: Vec<(String, LevelFilter)>,
}

impl Filter {
    fn new(default: &str, modules: &BTreeMap<String, String>) -> Self {
        let mut modules: Vec<_> = modules
            .iter()
            .map(|(m, l)| {
                (
                    m.clone(),
                    LevelFilter::from_str(l).unwrap_or(LevelFilter::Info),
                )
            })
            .collect();
        modules.sort_by_key(|(m, _)| std::cmp::Reverse(m.len()));
        Filter {
            default: LevelFilter::from_str(default).unwrap_or(LevelFilter::Info),
            modules,
        }
    }

    fn level_for(&self, target: &str) -> LevelFilter {
        self.modules
            .iter()
            .find(|(m, _)| target == m || target.starts_with(&format!("{m}::")))
            .map(|(_, l)| *l)
            .unwrap_or(self.default)
    }

    fn max(&self) -> LevelFilter {
        self.modules
            .iter()
            .map(|(_, l)| *l)
            .fold(self.default, std::cmp::Ord::max)
    }
}

struct Filtered<L> {
    filter: Filter,
    inner: L,
}

impl<L: Log> Log for Filtered<L> {
    fn enabled(&self, metadata: &Metadata) -> bool {
        metadata.level() <= self.filter.level_for(metadata.target())
    }
    fn log(&self, record: &Record) {
        if self.enabled(record.metadata()) {
            self.inner.log(record);
        }
    }
    fn flush(&self) {
        self.inner.flush();
    }
}

struct Stderr;

impl Log for Stderr {
    fn enabled(&self, _: &Metadata) -> bool {
        true
    }
    fn log(&self, record: &Record) {
        let level = match record.level() {
            Level::Error => "ERROR",
            Level::Warn => "WARN ",
            Level::Info => "INFO ",
            Level::Debug => "DEBUG",
            Level::Trace => "TRACE",
        };
        let ts = crate::job::now_ms();
        let _ = writeln!(
            std::io::stderr().lock(),
            "{}.{:03} {level} {}: {}{}",
            ts / 1000,
            ts % 1000,
            record.target(),
            record.args(),
            key_values(record)
        );
    }
    fn flush(&self) {}
}

/// A record's key-values as ` key=value` pairs; values with spaces, quotes or `=` are quoted.
fn key_values(record: &Record) -> String {
    struct Pairs(String);
    impl<'kvs> log::kv::VisitSource<'kvs> for Pairs {
        fn visit_pair(
            &mut self,
            key: log::kv::Key<'kvs>,
            value: log::kv::Value<'kvs>,
        ) -> Result<(), log::kv::Error> {
            let v = value.to_string();
            if v.is_empty() || v.contains([' ', '"', '=']) {
                let _ = write!(self.0, " {key}={v:?}");
            } else {
                let _ = write!(self.0, " {key}={v}");
            }
            Ok(())
        }
    }
    let mut pairs = Pairs(String::new());
    let _ = record.key_values().visit(&mut pairs);
    pairs.0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn key_values_follow_the_message() {
        let kvs: [(&str, &str); 2] = [("camera", "dock-1"), ("reason", "bad jpeg")];
        let record = Record::builder()
            .args(format_args!("rejected"))
            .key_values(&kvs)
            .build();
        assert_eq!(key_values(&record), " camera=dock-1 reason=\"bad jpeg\"");
        assert_eq!(key_values(&Record::builder().build()), "");
    }

    #[test]
    fn longest_module_prefix_wins() {
        let modules = [
            ("fovea".to_string(), "warn".to_string()),
            ("fovea::ingress".to_string(), "debug".to_string()),
        ]
        .into();
        let f = Filter::new("info", &modules);
        assert_eq!(f.level_for("fovea::ingress::mqtt"), LevelFilter::Debug);
        assert_eq!(f.level_for("fovea::outbox"), LevelFilter::Warn);
        assert_eq!(f.level_for("foveax"), LevelFilter::Info);
        assert_eq!(f.level_for("rdkafka"), LevelFilter::Info);
        assert_eq!(f.max(), LevelFilter::Debug);
    }
}
