#![allow(clippy::unwrap_used, clippy::expect_used)]
//! The systemd units and the Debian package, checked with the real tools:
//! - every unit in `systemd/` passes `systemd-analyze verify`, and `systemd-analyze security`
//!   rates fovea.service and fovea-kafka.service at or under a measured exposure;
//! - the mosquitto snippet is accepted by mosquitto and keeps a longer queue than its default;
//! - fovea-kafka.service's command line starts nisshi with its database in the working folder;
//! - the .deb (scripts/package.sh, from the debug binary these tests were built with) holds the
//!   binary, the units, the config as a conffile, both models and ONNX Runtime;
//! - it installs with apt into a clean Debian 12 (debootstrap minbase, built once and cached as
//!   a tarball under `${FOVEA_CACHE:-~/.cache/fovea}/debootstrap/`), and the installed unit's
//!   ExecStartPre and ExecStart, run in that root as an unprivileged user the way systemd would
//!   run them, pass validation, notify READY=1, feed the watchdog, and on SIGTERM notify
//!   STOPPING=1 and exit 0 within the drain deadline.
//!
//! No systemd runs here (PID 1 is not systemd), so the sandboxing itself is not exercised: the
//! unit's comments say how each restriction was checked.

mod harness;

// This file is the test crate's root, so a bare `mod tools;` would look for tests/tools.rs (which
// Cargo would also take for a test of its own): the submodules name their folder.
#[path = "packaging/chroot.rs"]
mod chroot;
#[path = "packaging/deb.rs"]
mod deb;
#[path = "packaging/mqtt.rs"]
mod mqtt;
#[path = "packaging/service.rs"]
mod service;
#[path = "packaging/tools.rs"]
mod tools;
#[path = "packaging/units.rs"]
mod units;

use chroot::{ScratchRoot, clean_debian_tarball};
use deb::{control_fields, deb, sha256};
use harness::{free_port, publish, repo_root, temp_dir};
use mqtt::{collect_queued, mosquitto, subscribe_and_leave};
use service::{Notifications, ServiceEnv};
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use tools::{Guard, bytes, cache_dir, nisshi_bin, ok, read, run, text, tool, wait_for_port};
use units::{
    exec_words, exposure, one, seconds, unit_settings, units_with_local_binaries, verify_problems,
};

// ------------------------------------------------------------------------------ unit checks

#[test]
fn units_pass_systemd_analyze_verify() {
    let dir = temp_dir();
    let units = units_with_local_binaries(dir.path());
    let names: Vec<_> = units.iter().map(|u| u.file_name().unwrap()).collect();
    assert!(
        names.iter().any(|n| *n == "fovea.service")
            && names.iter().any(|n| *n == "fovea-kafka.service"),
        "{names:?}"
    );
    let problems = verify_problems(&units);
    assert!(problems.is_empty(), "systemd-analyze verify: {problems:#?}");

    // The check itself can fail: a misspelt key and a missing binary are reported.
    let bad = dir.path().join("bad").join("fovea.service");
    std::fs::create_dir_all(bad.parent().unwrap()).unwrap();
    std::fs::write(
        &bad,
        read(&units[names.iter().position(|n| *n == "fovea.service").unwrap()])
            .replace("ProtectHome=", "ProtectHoem=")
            .replace(env!("CARGO_BIN_EXE_fovea"), "/nonexistent/fovea"),
    )
    .unwrap();
    let problems = verify_problems(std::slice::from_ref(&bad));
    assert!(
        problems.iter().any(|p| p.contains("ProtectHoem"))
            && problems.iter().any(|p| p.contains("/nonexistent/fovea")),
        "{problems:#?}"
    );
}

#[test]
fn units_are_hardened() {
    let dir = temp_dir();
    let units = units_with_local_binaries(dir.path());
    let unit = |name: &str| units.iter().find(|u| u.ends_with(name)).unwrap().clone();
    // Measured with systemd 252 (Debian 12): fovea.service 1.1, fovea-kafka.service 0.9 ("OK",
    // "SAFE"). What is left is the network (both need TCP/IP; fovea also to non-local hosts),
    // the host's root directory, and /proc's non-process files for fovea (ONNX Runtime reads
    // /proc/cpuinfo).
    let fovea = exposure(&unit("fovea.service"));
    let kafka = exposure(&unit("fovea-kafka.service"));
    eprintln!("exposure: fovea.service {fovea}, fovea-kafka.service {kafka}");
    assert!(fovea <= 1.1, "fovea.service exposure {fovea} > 1.1");
    assert!(kafka <= 0.9, "fovea-kafka.service exposure {kafka} > 0.9");

    // The drain ends before systemd's SIGKILL, and the node is notify-type with a watchdog.
    let s = unit_settings(&read(&repo_root().join("systemd/fovea.service")));
    let start = exec_words(&one(&s, "Service.ExecStart"));
    let drain = start
        .iter()
        .position(|w| w == "--drain-timeout")
        .map(|i| start[i + 1].parse::<u64>().unwrap())
        .expect("ExecStart sets --drain-timeout");
    let stop = seconds(&one(&s, "Service.TimeoutStopSec"));
    assert!(
        drain + 5 <= stop,
        "--drain-timeout {drain} s vs TimeoutStopSec {stop} s"
    );
    assert_eq!(one(&s, "Service.Type"), "notify");
    assert!(seconds(&one(&s, "Service.WatchdogSec")) > 0);
    assert_eq!(
        one(&s, "Service.ExecStartPre"),
        "/usr/bin/fovea validate /etc/fovea/fovea.toml"
    );
    assert_eq!(
        start[..4],
        ["/usr/bin/fovea", "run", "--config", "/etc/fovea/fovea.toml"]
    );
}

// --------------------------------------------------------------------------------- mosquitto

#[test]
fn mosquitto_takes_the_snippet_and_queues_more_for_a_stopped_fovea() {
    let dir = temp_dir();
    let conf_d = dir.path().join("conf.d");
    std::fs::create_dir_all(&conf_d).unwrap();
    std::fs::copy(
        repo_root().join("systemd/mosquitto-fovea.conf"),
        conf_d.join("fovea.conf"),
    )
    .unwrap();
    // 1500 frames wait for a fovea that is down: mosquitto's default keeps 1000 of them.
    let frames: Vec<(String, Vec<u8>)> = (0..1500)
        .map(|i| (format!("cameras/cam-{}/frames", i % 3), vec![7u8; 512]))
        .collect();
    let queued = |extra: &str, name: &str| {
        let (port, _broker) = mosquitto(dir.path(), name, extra);
        subscribe_and_leave(port, "fovea-test");
        publish(port, &frames);
        collect_queued(port, "fovea-test", frames.len())
    };
    let with_snippet = queued(&format!("include_dir {}\n", conf_d.display()), "snippet");
    let default = queued("", "default");
    eprintln!(
        "queued for a stopped subscriber: {with_snippet} with the snippet, {default} without"
    );
    assert_eq!(with_snippet, frames.len());
    assert!(default < frames.len(), "mosquitto's default kept {default}");
}

// ------------------------------------------------------------------------------ fovea-kafka

#[test]
fn kafka_unit_command_starts_nisshi_with_its_database_in_the_state_directory() {
    let s = unit_settings(&read(&repo_root().join("systemd/fovea-kafka.service")));
    assert_eq!(
        one(&s, "Service.WorkingDirectory"),
        format!("%S/{}", one(&s, "Service.StateDirectory"))
    );
    assert_eq!(
        one(&s, "Unit.ConditionFileIsExecutable"),
        "/usr/local/bin/nisshi"
    );
    let words = exec_words(&one(&s, "Service.ExecStart"));
    assert_eq!(words[0], "/usr/local/bin/nisshi");
    // fovea's default config writes to 127.0.0.1:9092.
    let default_config: toml::Table = read(&repo_root().join("node/src/config/default.toml"))
        .parse()
        .unwrap();
    let brokers = default_config["kafka"]["brokers"].as_str().unwrap();
    assert_eq!(
        words
            .iter()
            .filter(|w| **w == format!("tcp://{brokers}"))
            .count(),
        2,
        "listener and advertised listener on fovea's default {brokers}: {words:?}"
    );

    // The same command, on a free port, in a folder standing for the state directory.
    let dir = temp_dir();
    let port = free_port();
    let args: Vec<String> = words[1..]
        .iter()
        .map(|w| w.replace(brokers, &format!("127.0.0.1:{port}")))
        .collect();
    let log = std::fs::File::create(dir.path().join("nisshi.log")).unwrap();
    let mut child = Guard(
        Command::new(nisshi_bin())
            .args(&args)
            .current_dir(dir.path())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    wait_for_port(port, &mut child.0, "nisshi");
    assert!(
        dir.path().join("nisshi.db").exists(),
        "nisshi.db not in the working directory: {}",
        read(&dir.path().join("nisshi.log"))
    );
}

// ---------------------------------------------------------------------------------- package

#[test]
fn deb_holds_the_binary_units_config_models_and_onnx_runtime() {
    let deb = deb();

    let f = control_fields(&deb);
    assert_eq!(f["Package"], "fovea");
    assert_eq!(f["Version"], format!("{}-1", env!("CARGO_PKG_VERSION")));
    assert_eq!(f["Architecture"], "amd64");
    assert_eq!(f["Section"], "net");
    assert_eq!(f["Priority"], "optional");
    assert!(f["Maintainer"].contains('@'), "{f:?}");
    assert!(f["Description"].len() > 100, "{f:?}");
    let depends: Vec<&str> = f["Depends"]
        .split(',')
        .map(|d| d.split_whitespace().next().unwrap())
        .collect();
    // The binary links libssl and zlib; ONNX Runtime is C++.
    for lib in ["libc6", "libssl3", "zlib1g", "libstdc++6"] {
        assert!(
            depends.contains(&lib),
            "Depends lacks {lib}: {}",
            f["Depends"]
        );
    }
    let installed_kib: u64 = f["Installed-Size"].parse().unwrap();
    assert!(
        (40_000..200_000).contains(&installed_kib),
        "Installed-Size {installed_kib}"
    );

    // Maintainer scripts: enable at install (works in a chroot), start only under systemd.
    let dir = temp_dir();
    let control = dir.path().join("control");
    ok(Command::new(tool("dpkg-deb"))
        .arg("--control")
        .arg(&deb)
        .arg(&control));
    assert_eq!(
        read(&control.join("conffiles")).lines().collect::<Vec<_>>(),
        ["/etc/fovea/fovea.toml", "/etc/mosquitto/conf.d/fovea.conf"]
    );
    let postinst = read(&control.join("postinst"));
    assert!(
        postinst.contains("deb-systemd-helper enable fovea.service"),
        "{postinst}"
    );
    let start = postinst
        .find("deb-systemd-invoke $_dh_action fovea.service")
        .expect(&postinst);
    assert!(
        postinst[..start].contains("if [ -d /run/systemd/system ]; then"),
        "{postinst}"
    );
    assert!(read(&control.join("prerm")).contains("deb-systemd-invoke stop fovea.service"));

    // Contents, compared with their sources.
    let root = dir.path().join("root");
    ok(Command::new(tool("dpkg-deb"))
        .arg("-x")
        .arg(&deb)
        .arg(&root));
    let repo = repo_root();
    let same = |installed: &str, source: &Path| {
        let path = root.join(installed.trim_start_matches('/'));
        assert!(path.is_file(), "{installed} missing from the package");
        assert!(
            bytes(&path) == bytes(source),
            "{installed} differs from {}",
            source.display()
        );
    };
    same(
        "/usr/lib/systemd/system/fovea.service",
        &repo.join("systemd/fovea.service"),
    );
    same(
        "/usr/lib/systemd/system/fovea-kafka.service",
        &repo.join("systemd/fovea-kafka.service"),
    );
    same(
        "/etc/fovea/fovea.toml",
        &repo.join("node/src/config/default.toml"),
    );
    same(
        "/etc/mosquitto/conf.d/fovea.conf",
        &repo.join("systemd/mosquitto-fovea.conf"),
    );
    same("/usr/share/doc/fovea/README.md", &repo.join("README.md"));
    same(
        "/usr/share/fovea/models/README.md",
        &repo.join("models/README.md"),
    );
    for model in ["efficientnet-lite0", "ssdlite-person"] {
        let files: Vec<PathBuf> = std::fs::read_dir(repo.join("models").join(model))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        for want in ["manifest.toml", "model.onnx", "LICENSE.weights"] {
            assert!(files.iter().any(|p| p.ends_with(want)), "{model}/{want}");
        }
        for file in files {
            same(
                &format!(
                    "/usr/share/fovea/models/{model}/{}",
                    file.file_name().unwrap().to_str().unwrap()
                ),
                &file,
            );
        }
    }
    let ort = root.join("usr/lib/fovea/libonnxruntime.so");
    assert_eq!(
        sha256(&ort),
        sha256(&cache_dir().join("onnxruntime/1.31.1/libonnxruntime.so.1.31.1")),
        "the packaged ONNX Runtime is not 1.31.1 from the cache"
    );
    assert!(
        root.join("usr/share/doc/fovea/onnxruntime/LICENSE")
            .is_file()
    );
    assert!(root.join("usr/share/doc/fovea/copyright").is_file());

    // The binary is executable, stripped of the debug build's 180 MB of debug info, and is the
    // one whose default config was packaged.
    let bin = root.join("usr/bin/fovea");
    let meta = std::fs::metadata(&bin).unwrap();
    assert_eq!(meta.permissions().mode() & 0o777, 0o755);
    assert!(
        meta.len() < 60_000_000,
        "usr/bin/fovea is {} bytes: not stripped?",
        meta.len()
    );
    let printed = ok(Command::new(&bin).arg("default-config"));
    assert_eq!(printed, read(&root.join("etc/fovea/fovea.toml")));

    // What the unit and the config name is in the package.
    let unit = unit_settings(&read(&root.join("usr/lib/systemd/system/fovea.service")));
    for value in [
        one(&unit, "Service.ExecStart"),
        one(&unit, "Service.ExecStartPre"),
    ] {
        let words = exec_words(&value);
        assert!(
            root.join(words[0].trim_start_matches('/')).is_file(),
            "{value}"
        );
    }
    let env = unit["Service.Environment"].clone();
    let ort_path = env
        .iter()
        .find_map(|e| e.strip_prefix("ORT_DYLIB_PATH="))
        .expect("the unit sets ORT_DYLIB_PATH");
    assert!(
        root.join(ort_path.trim_start_matches('/')).is_file(),
        "{ort_path}"
    );
    let config: toml::Table = read(&root.join("etc/fovea/fovea.toml")).parse().unwrap();
    for model in config["models"].as_array().unwrap() {
        let path = model["path"].as_str().unwrap();
        assert!(
            root.join(path.trim_start_matches('/'))
                .join("manifest.toml")
                .is_file(),
            "the default config names {path}, which the package lacks"
        );
    }
}

// ------------------------------------------------------------------- install on clean Debian

#[test]
fn deb_installs_on_clean_debian_and_the_unit_runs_with_notify_and_watchdog() {
    let tarball = clean_debian_tarball();
    let deb = deb();
    let started = Instant::now();
    let root = ScratchRoot::new(&tarball);

    // apt resolves the dependencies from the archive (the root's lists may be old).
    std::fs::copy(&deb, root.host_path("/tmp/fovea.deb")).unwrap();
    ok(&mut root.command(&["apt-get", "update", "-qq"]));
    let install = ok(&mut root.command(&[
        "apt-get",
        "install",
        "-y",
        "-q",
        "--no-install-recommends",
        "-o",
        "Dpkg::Use-Pty=0",
        "/tmp/fovea.deb",
    ]));
    eprintln!("{install}");
    let status =
        ok(&mut root.command(&["dpkg-query", "-W", "-f", "${Status} ${Version}", "fovea"]));
    assert_eq!(
        status,
        format!("install ok installed {}-1", env!("CARGO_PKG_VERSION"))
    );
    ok(&mut root.command(&["dpkg-query", "-W", "libssl3"]));
    // Enabled by the postinst although no systemd runs; fovea-kafka only comes with fovea.
    let wants = root.host_path("/etc/systemd/system/multi-user.target.wants");
    assert!(
        wants.join("fovea.service").is_symlink(),
        "fovea.service not enabled"
    );
    assert!(!wants.join("fovea-kafka.service").exists());

    // The installed unit, as systemd would read it.
    let unit_path = root.host_path("/usr/lib/systemd/system/fovea.service");
    let unit = unit_settings(&read(&unit_path));
    assert_eq!(one(&unit, "Service.DynamicUser"), "yes");
    let state_dir = format!("/var/lib/{}", one(&unit, "Service.StateDirectory"));
    let env_file = one(&unit, "Service.EnvironmentFile");
    let env_file = env_file
        .strip_prefix('-')
        .expect("EnvironmentFile is optional");
    assert!(
        !root.host_path(env_file).exists(),
        "the package must not ship {env_file}"
    );
    let service = ServiceEnv {
        uid: 61184, // the first of systemd's dynamic user ids
        umask: one(&unit, "Service.UMask"),
        env: unit["Service.Environment"]
            .iter()
            .map(|e| {
                let (k, v) = e.split_once('=').unwrap();
                (k.to_string(), v.to_string())
            })
            .collect(),
    };
    let host_state = root.host_path(&state_dir);
    std::fs::create_dir_all(&host_state).unwrap();
    ok(Command::new(tool("chown"))
        .arg(format!("{0}:{0}", service.uid))
        .arg(&host_state));
    std::fs::set_permissions(&host_state, std::fs::Permissions::from_mode(0o700)).unwrap();

    let closed = [free_port(), free_port(), free_port()];
    let mut overrides = vec![
        ("FOVEA_MQTT__PORT", closed[0].to_string()),
        ("FOVEA_KAFKA__BROKERS", format!("127.0.0.1:{}", closed[1])),
    ];
    if read(&root.host_path("/etc/fovea/fovea.toml")).contains("\n[metrics]") {
        overrides.push(("FOVEA_METRICS__LISTEN", format!("127.0.0.1:{}", closed[2])));
    }

    // ExecStartPre.
    let pre = exec_words(&one(&unit, "Service.ExecStartPre"));
    let out = run(&mut service.command(&root, &pre, &overrides));
    assert!(out.status.success(), "ExecStartPre {pre:?}: {}", text(&out));
    assert!(text(&out).contains(": OK ("), "{}", text(&out));

    // ExecStart, with a notify socket and a short watchdog (the unit's would make this wait
    // 15 s for a ping).
    let notify_path = root.host_path("/run/fovea-test-notify.sock");
    std::fs::create_dir_all(notify_path.parent().unwrap()).unwrap();
    let _ = std::fs::remove_file(&notify_path);
    let notify = UnixDatagram::bind(&notify_path).unwrap();
    std::fs::set_permissions(&notify_path, std::fs::Permissions::from_mode(0o777)).unwrap();
    notify
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let mut env = overrides.clone();
    env.push(("NOTIFY_SOCKET", "/run/fovea-test-notify.sock".into()));
    env.push(("WATCHDOG_USEC", "2000000".into()));
    let start = exec_words(&one(&unit, "Service.ExecStart"));
    let drain = start
        .iter()
        .position(|w| w == "--drain-timeout")
        .map(|i| start[i + 1].parse::<u64>().unwrap())
        .unwrap_or(20);
    let logs = temp_dir();
    let log_path = logs.path().join("fovea.log");
    let log = std::fs::File::create(&log_path).unwrap();
    let mut node = Guard(
        service
            .command(&root, &start, &env)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let pid = node.0.id();
    let log_text = || std::fs::read_to_string(&log_path).unwrap_or_default();
    let mut notes = Notifications {
        socket: notify,
        got: Vec::new(),
    };
    let start_limit = Duration::from_secs(seconds(&one(&unit, "Service.TimeoutStartSec")));
    let launched = Instant::now();
    let ready_at = notes.wait_for("READY=1", launched, start_limit, &mut node, &log_path);
    eprintln!("READY=1 after {:.2} s", (ready_at - launched).as_secs_f64());
    // The watchdog keeps being fed (every 1 s here) while the node is idle and its brokers are
    // down.
    notes.wait_for(
        "WATCHDOG=1",
        ready_at + Duration::from_millis(500),
        Duration::from_secs(5),
        &mut node,
        &log_path,
    );

    // SIGTERM: STOPPING=1, then exit 0 within the drain deadline (systemd kills at
    // TimeoutStopSec, which is later).
    ok(Command::new("kill").arg("-TERM").arg(pid.to_string()));
    let term_at = Instant::now();
    notes.wait_for(
        "STOPPING=1",
        term_at,
        Duration::from_secs(5),
        &mut node,
        &log_path,
    );
    let exit = loop {
        if let Some(status) = node.0.try_wait().unwrap() {
            break status;
        }
        assert!(
            term_at.elapsed() < Duration::from_secs(drain + 2),
            "fovea still running {drain} s after SIGTERM:\n{}",
            log_text()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(exit.code(), Some(0), "{}", log_text());
    eprintln!(
        "stopped {:.2} s after SIGTERM",
        term_at.elapsed().as_secs_f64()
    );
    // It ran as the unprivileged user and kept its state where StateDirectory= puts it.
    let spool = host_state.join("spool");
    assert!(spool.is_dir(), "no spool in {state_dir}: {}", log_text());
    let meta = std::fs::metadata(&spool).unwrap();
    assert_eq!(std::os::unix::fs::MetadataExt::uid(&meta), service.uid);
    assert_eq!(
        meta.permissions().mode() & 0o077,
        0,
        "UMask not applied to {}",
        spool.display()
    );

    // Removal and purge run their maintainer scripts cleanly without systemd.
    ok(&mut root.command(&["dpkg", "--purge", "fovea"]));
    for gone in [
        "/usr/bin/fovea",
        "/etc/fovea/fovea.toml",
        "/usr/lib/systemd/system/fovea.service",
        "/usr/lib/fovea/libonnxruntime.so",
    ] {
        assert!(!root.host_path(gone).exists(), "{gone} left after purge");
    }
    assert!(
        !wants.join("fovea.service").is_symlink(),
        "enable symlink left after purge"
    );
    drop(node);
    drop(root);
    eprintln!(
        "install + run + purge: {:.1} s",
        started.elapsed().as_secs_f64()
    );
}
