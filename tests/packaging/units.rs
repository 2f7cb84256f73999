//! Reading and checking the systemd units in `systemd/`: the unit files, their settings parsed
//! into `Section.Key` values (with the Exec command lines and time spans fovea's units use), and
//! `systemd-analyze verify` and `security` run on copies pointed at binaries that exist here.
//! Several tests read the same settings, so the parsing lives in one place.

use crate::harness::repo_root;
use crate::tools::{nisshi_bin, ok, read, run, text, tool};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub(crate) fn unit_files() -> Vec<PathBuf> {
    let mut units: Vec<PathBuf> = std::fs::read_dir(repo_root().join("systemd"))
        .expect("systemd/")
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.extension().is_some_and(|e| {
                ["service", "socket", "timer", "target"].contains(&e.to_str().unwrap())
            })
        })
        .collect();
    units.sort();
    units
}

/// The settings of a unit file: `Section.Key` -> values in order (keys may repeat).
pub(crate) fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
    let mut out: BTreeMap<String, Vec<String>> = BTreeMap::new();
    let mut section = String::new();
    for line in unit.lines().map(str::trim) {
        if line.is_empty() || line.starts_with('#') || line.starts_with(';') {
            continue;
        }
        if let Some(s) = line.strip_prefix('[').and_then(|l| l.strip_suffix(']')) {
            section = s.to_string();
            continue;
        }
        assert!(
            !line.ends_with('\\'),
            "continued lines are not parsed here: {line}"
        );
        let (key, value) = line
            .split_once('=')
            .unwrap_or_else(|| panic!("not a setting: {line}"));
        out.entry(format!("{section}.{}", key.trim()))
            .or_default()
            .push(value.trim().to_string());
    }
    out
}

pub(crate) fn one(settings: &BTreeMap<String, Vec<String>>, key: &str) -> String {
    let values = settings
        .get(key)
        .unwrap_or_else(|| panic!("the unit has no {key}"));
    assert_eq!(values.len(), 1, "{key} set more than once: {values:?}");
    values[0].clone()
}

/// A command line from an Exec*= setting, as words. Only what fovea's units use is accepted:
/// no quoting, no specifiers, no variables.
pub(crate) fn exec_words(value: &str) -> Vec<String> {
    let value = value.trim_start_matches(['-', '@', ':', '+', '!']);
    assert!(
        !value.contains(['"', '\'', '%', '$', '\\']),
        "Exec line needs a real parser: {value}"
    );
    value.split_whitespace().map(str::to_string).collect()
}

/// A systemd time span as used in the units: "30s", "2min", "5min", "20".
pub(crate) fn seconds(span: &str) -> u64 {
    let digits: String = span.chars().take_while(char::is_ascii_digit).collect();
    let n: u64 = digits
        .parse()
        .unwrap_or_else(|_| panic!("time span {span:?}"));
    match &span[digits.len()..] {
        "" | "s" | "sec" => n,
        "min" | "m" => n * 60,
        other => panic!("time span unit {other:?} in {span:?}"),
    }
}

/// Copies the units to `dir` with their executables pointed at ones that exist here
/// (systemd-analyze verify checks that ExecStart binaries exist).
pub(crate) fn units_with_local_binaries(dir: &Path) -> Vec<PathBuf> {
    let fovea = env!("CARGO_BIN_EXE_fovea");
    let nisshi = nisshi_bin();
    unit_files()
        .iter()
        .map(|unit| {
            let text = read(unit)
                .replace("/usr/bin/fovea", fovea)
                .replace("/usr/local/bin/nisshi", nisshi.to_str().unwrap());
            let copy = dir.join(unit.file_name().unwrap());
            std::fs::write(&copy, text).unwrap();
            copy
        })
        .collect()
}

/// `systemd-analyze verify` on `units`: the lines it printed about them (empty = clean). It
/// exits 0 on unknown keys and bad values, so its messages are what counts.
pub(crate) fn verify_problems(units: &[PathBuf]) -> Vec<String> {
    let out = run(Command::new(tool("systemd-analyze"))
        .arg("verify")
        .args(units));
    let all = text(&out);
    let names: Vec<String> = units
        .iter()
        .map(|u| u.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    let mut problems: Vec<String> = all
        .lines()
        .filter(|l| names.iter().any(|n| l.contains(n.as_str())))
        .map(str::to_string)
        .collect();
    if !out.status.success() && problems.is_empty() {
        problems.push(format!("exit {}: {all}", out.status));
    }
    if !all.is_empty() {
        eprintln!("systemd-analyze verify said:\n{all}");
    }
    problems
}

/// `systemd-analyze security --offline=true`: the overall exposure (0 = locked down, 10 = none).
pub(crate) fn exposure(unit: &Path) -> f64 {
    let out = ok(Command::new(tool("systemd-analyze"))
        .args(["security", "--offline=true", "--no-pager"])
        .arg(unit));
    out.lines()
        .find_map(|l| {
            let rest = l.split_once("Overall exposure level for ")?.1;
            rest.split_whitespace().nth(1)?.parse().ok()
        })
        .unwrap_or_else(|| panic!("no exposure level in:\n{out}"))
}
