//! The .deb under test and what it says about itself: the package built once per test run by
//! scripts/package.sh from the debug binary, its control fields, and a file digest for comparing
//! what it installs with its source. Both package tests share the one build.

use crate::harness::repo_root;
use crate::tools::{bytes, ok, tool};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Instant;

/// The .deb, built once per test run by scripts/package.sh from the debug binary these tests
/// were built with (no release build).
pub(crate) fn deb() -> PathBuf {
    static DEB: OnceLock<PathBuf> = OnceLock::new();
    DEB.get_or_init(|| {
        // A target folder of its own holding (a link to) that binary: cargo-deb deletes the
        // amd64 .debs in its target's debian/ folder, which would take a release package
        // built by hand with it.
        let tmp = Path::new(env!("CARGO_TARGET_TMPDIR"));
        let target_dir = tmp.join("packaging-target");
        let _ = std::fs::remove_dir_all(&target_dir);
        std::fs::create_dir_all(target_dir.join("debug")).unwrap();
        let bin = target_dir.join("debug/fovea");
        std::fs::hard_link(env!("CARGO_BIN_EXE_fovea"), &bin)
            .or_else(|_| std::fs::copy(env!("CARGO_BIN_EXE_fovea"), &bin).map(drop))
            .unwrap();
        let out = tmp.join("packaging-deb");
        let _ = std::fs::remove_dir_all(&out);
        let started = Instant::now();
        let stdout = ok(Command::new("bash")
            .arg(repo_root().join("scripts/package.sh"))
            .args([
                "x86_64",
                "--profile",
                "dev",
                "--no-build",
                "--fast",
                "--out",
            ])
            .arg(&out)
            .env("CARGO_TARGET_DIR", &target_dir)
            .stdin(Stdio::null()));
        let deb = PathBuf::from(stdout.lines().last().expect("package.sh printed nothing"));
        assert!(deb.is_file(), "{}", deb.display());
        eprintln!(
            "package.sh: {} ({} bytes) in {:.1} s",
            deb.display(),
            std::fs::metadata(&deb).unwrap().len(),
            started.elapsed().as_secs_f64()
        );
        deb
    })
    .clone()
}

pub(crate) fn control_fields(deb: &Path) -> BTreeMap<String, String> {
    let info = ok(Command::new(tool("dpkg-deb")).args(["--field"]).arg(deb));
    let mut fields = BTreeMap::new();
    let mut last = String::new();
    for line in info.lines() {
        if line.starts_with(' ') {
            fields.entry(last.clone()).and_modify(|v: &mut String| {
                v.push('\n');
                v.push_str(line.trim());
            });
        } else if let Some((k, v)) = line.split_once(':') {
            last = k.to_string();
            fields.insert(k.to_string(), v.trim().to_string());
        }
    }
    fields
}

pub(crate) fn sha256(path: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes(path)))
}
