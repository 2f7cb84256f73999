#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The commands around the node, driven as a user would: `fovea camera` publishes the sample
//! photos, the node infers, `fovea tail` prints the decoded results; `fovea default-config`
//! prints a config that `fovea validate` accepts.

mod harness;

use harness::*;
use std::process::Command;

fn fovea() -> Command {
    Command::new(env!("CARGO_BIN_EXE_fovea"))
}

#[test]
fn camera_publishes_a_folder_and_tail_prints_the_results() {
    let dir = temp_dir();
    let mqtt = Mosquitto::start(dir.path());
    let kafka = Kafka::start(dir.path(), "edge");
    let _node = Node::start(dir.path(), &node_config(&mqtt, &kafka, ""));

    let images = samples_dir();
    let out = fovea()
        .args([
            "camera",
            "--mqtt",
            &format!("127.0.0.1:{}", mqtt.port),
            "--images",
        ])
        .arg(&images)
        .args(["--cameras", "2", "--fps", "0", "--envelope", "--quiet"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "camera failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("published 8 frames from 2 camera(s)"),
        "{stdout}"
    );
    assert!(stdout.contains("broker acknowledged 8"), "{stdout}");

    let out = fovea()
        .args([
            "tail",
            "--brokers",
            &kafka.brokers(),
            "--from-beginning",
            "--count",
            "8",
            "--idle-exit",
            "60",
        ])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "tail failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(lines.len(), 8, "{stdout}");
    assert!(
        lines
            .iter()
            .all(|l| l.starts_with("fovea.results cam-") && l.contains(" OK ")),
        "{stdout}"
    );
    // Each camera sent each photo once; the classifier's answers show up decoded.
    assert_eq!(
        lines.iter().filter(|l| l.contains("Egyptian cat")).count(),
        2,
        "{stdout}"
    );
    assert_eq!(
        lines.iter().filter(|l| l.contains("espresso")).count(),
        2,
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.contains("ssdlite-person@1") && l.contains("person 0.")),
        "{stdout}"
    );
    // `--envelope` names the photo in the frame's metadata; the result carries it and tail
    // prints it (scripts/check-standalone.sh counts the demo's results per photo this way).
    for photo in ["astronaut.png", "chelsea.png", "coffee.png", "rocket.jpg"] {
        let tag = format!(" | metadata: file={photo}");
        assert_eq!(
            lines.iter().filter(|l| l.ends_with(&tag)).count(),
            2,
            "{photo}: {stdout}"
        );
    }
}

#[test]
fn default_config_is_printed_and_validates_once_models_exist() {
    let out = fovea().arg("default-config").output().unwrap();
    assert!(out.status.success());
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("[kafka]") && text.contains("record_limit_bytes"));

    // The default names the models' installed location; point it at the repository's instead.
    let dir = temp_dir();
    let models = repo_root().join("models");
    let text = text.replace("/usr/share/fovea/models", &models.display().to_string());
    let path = dir.path().join("fovea.toml");
    std::fs::write(&path, text).unwrap();
    let out = fovea().arg("validate").arg(&path).output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("efficientnet-lite0@1, ssdlite-person@1"),
        "{stdout}"
    );
}

#[test]
fn validate_names_a_route_to_a_missing_model() {
    let dir = temp_dir();
    let models = repo_root().join("models");
    let path = dir.path().join("fovea.toml");
    std::fs::write(
        &path,
        format!(
            "[[models]]\npath = \"{}/efficientnet-lite0\"\n\n[[routes]]\ncameras = \"*\"\nmodels = [\"yolo\"]\n",
            models.display()
        ),
    )
    .unwrap();
    let out = fovea().arg("validate").arg(&path).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("routes[0].models[0]") && stderr.contains("\"yolo\""),
        "{stderr}"
    );
}
