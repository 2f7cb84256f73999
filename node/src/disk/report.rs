//! The disk budget as `fovea validate` prints it: one line per part, one per filesystem, and a
//! warning for every filesystem the parts cannot grow to fit on.

use super::budget::{self, Part, human};
use super::usage;
use crate::config::Config;
use std::fmt::Write as _;

/// The printed budget, and the warnings (printed apart, on stderr).
pub struct Report {
    pub text: String,
    pub warnings: Vec<String>,
}

pub fn report(cfg: &Config) -> Report {
    let parts = budget::parts(cfg);
    let measured: Vec<_> = parts.iter().map(usage::measure).collect();
    let filesystems = budget::sum(&parts, &measured);
    let mut text = String::from("disk budget (what fovea may use on disk; README \"Disk\"):\n");
    for (part, m) in parts.iter().zip(&measured) {
        let now = match (part.own_folder, m.used) {
            (false, _) => String::new(),
            (true, Some(used)) => format!(", now {}", human(used)),
            (true, None) => ", now unknown (not readable)".into(),
        };
        let _ = writeln!(
            text,
            "  {:<13} {:>10}  in {}{now}  [{}]",
            part.name,
            part.budget.map_or_else(|| "unbounded".into(), human),
            part.path.display(),
            part.basis
        );
    }
    let mut warnings = Vec::new();
    for fs in &filesystems {
        let names = names(&parts, &fs.parts);
        let first = &parts[fs.parts[0]].path;
        let total = fs.budget.map_or_else(|| "unbounded".into(), human);
        let _ = writeln!(
            text,
            "  filesystem of {}: {total} for {names}; {} there now, {} free",
            first.display(),
            human(fs.used),
            human(fs.free)
        );
        if fs.fits() {
            continue;
        }
        warnings.push(match fs.budget {
            None => format!(
                "disk budget: {names} on the filesystem of {} has no bound (a retention_bytes of -1): nothing stops it filling the disk",
                first.display()
            ),
            Some(b) => format!(
                "disk budget: {names} may grow to {} on the filesystem of {} ({} there now), but only {} is free: lower them (README \"Disk\") or give them a bigger disk",
                human(b),
                first.display(),
                human(fs.used),
                human(fs.free)
            ),
        });
    }
    Report { text, warnings }
}

fn names(parts: &[Part], indices: &[usize]) -> String {
    indices
        .iter()
        .map(|&i| {
            let p = &parts[i];
            format!(
                "{} ({})",
                p.name,
                p.budget.map_or_else(|| "unbounded".into(), human)
            )
        })
        .collect::<Vec<_>>()
        .join(" + ")
}
