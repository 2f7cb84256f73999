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

use harness::{free_port, publish, repo_root, temp_dir};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt as _;
use std::os::unix::net::UnixDatagram;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

// ------------------------------------------------------------------------------------ helpers

fn cache_dir() -> PathBuf {
    std::env::var_os("FOVEA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/fovea")
        })
}

fn nisshi_bin() -> PathBuf {
    let path = std::env::var_os("FOVEA_NISSHI_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| cache_dir().join("nisshi/bin/nisshi"));
    assert!(
        path.exists(),
        "{} not found (set FOVEA_NISSHI_BIN, or run scripts/install-deps.sh)",
        path.display()
    );
    path
}

/// A system tool; its absence fails the test with the fix.
fn tool(name: &str) -> PathBuf {
    for dir in ["/usr/bin", "/usr/sbin", "/bin", "/sbin"] {
        let path = Path::new(dir).join(name);
        if path.exists() {
            return path;
        }
    }
    panic!("{name} not found: run scripts/install-deps.sh (its packaging tools block)");
}

fn run(cmd: &mut Command) -> Output {
    cmd.output()
        .unwrap_or_else(|e| panic!("running {cmd:?}: {e}"))
}

/// Runs a command that must succeed; returns its stdout.
fn ok(cmd: &mut Command) -> String {
    let out = run(cmd);
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\n{}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn bytes(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A child process killed (SIGKILL) when dropped.
struct Guard(Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status}");
        }
        assert!(Instant::now() < deadline, "{what} never listened on {port}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn unit_files() -> Vec<PathBuf> {
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
fn unit_settings(unit: &str) -> BTreeMap<String, Vec<String>> {
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

fn one(settings: &BTreeMap<String, Vec<String>>, key: &str) -> String {
    let values = settings
        .get(key)
        .unwrap_or_else(|| panic!("the unit has no {key}"));
    assert_eq!(values.len(), 1, "{key} set more than once: {values:?}");
    values[0].clone()
}

/// A command line from an Exec*= setting, as words. Only what fovea's units use is accepted:
/// no quoting, no specifiers, no variables.
fn exec_words(value: &str) -> Vec<String> {
    let value = value.trim_start_matches(['-', '@', ':', '+', '!']);
    assert!(
        !value.contains(['"', '\'', '%', '$', '\\']),
        "Exec line needs a real parser: {value}"
    );
    value.split_whitespace().map(str::to_string).collect()
}

/// A systemd time span as used in the units: "30s", "2min", "5min", "20".
fn seconds(span: &str) -> u64 {
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

// ------------------------------------------------------------------------------ unit checks

/// Copies the units to `dir` with their executables pointed at ones that exist here
/// (systemd-analyze verify checks that ExecStart binaries exist).
fn units_with_local_binaries(dir: &Path) -> Vec<PathBuf> {
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
fn verify_problems(units: &[PathBuf]) -> Vec<String> {
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

/// `systemd-analyze security --offline=true`: the overall exposure (0 = locked down, 10 = none).
fn exposure(unit: &Path) -> f64 {
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

/// Subscribes `client` (persistent session, QoS 1) and disconnects, so that messages queue.
fn subscribe_and_leave(port: u16, client: &str) {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut opts = MqttOptions::new(client, "127.0.0.1", port);
        opts.set_clean_session(false);
        let (c, mut events) = AsyncClient::new(opts, 16);
        c.subscribe("cameras/+/frames", QoS::AtLeastOnce)
            .await
            .unwrap();
        loop {
            match tokio::time::timeout(Duration::from_secs(10), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::SubAck(_)))) => break,
                Ok(Ok(_)) => {}
                other => panic!("subscribing: {other:?}"),
            }
        }
        c.disconnect().await.unwrap();
        let _ = tokio::time::timeout(Duration::from_secs(2), async {
            while events.poll().await.is_ok() {}
        })
        .await;
    });
}

/// Reconnects `client` and counts the messages the broker kept for it.
fn collect_queued(port: u16, client: &str, want: usize) -> usize {
    use rumqttc::{AsyncClient, Event, MqttOptions, Packet};
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async {
        let mut opts = MqttOptions::new(client, "127.0.0.1", port);
        opts.set_clean_session(false);
        let (_c, mut events) = AsyncClient::new(opts, 64);
        let mut n = 0;
        while n < want {
            match tokio::time::timeout(Duration::from_secs(3), events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::Publish(_)))) => n += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("mqtt: {e}"),
                Err(_) => break, // nothing more is coming
            }
        }
        n
    })
}

/// mosquitto on a free port with `extra` config lines; returns (port, guard).
fn mosquitto(dir: &Path, name: &str, extra: &str) -> (u16, Guard) {
    let port = free_port();
    let conf = dir.join(format!("{name}.conf"));
    std::fs::write(
        &conf,
        format!("listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n{extra}"),
    )
    .unwrap();
    let bin = std::env::var_os("FOVEA_MOSQUITTO_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| tool("mosquitto"));
    let log = std::fs::File::create(dir.join(format!("{name}.log"))).unwrap();
    let mut child = Command::new(bin)
        .arg("-c")
        .arg(&conf)
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    wait_for_port(port, &mut child, "mosquitto");
    (port, Guard(child))
}

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

/// The .deb, built once per test run by scripts/package.sh from the debug binary these tests
/// were built with (no release build).
fn deb() -> PathBuf {
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

fn control_fields(deb: &Path) -> BTreeMap<String, String> {
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

fn sha256(path: &Path) -> String {
    use sha2::Digest as _;
    hex::encode(sha2::Sha256::digest(bytes(path)))
}

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

/// Mount points at or under `dir`, deepest first.
fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"));
    let mut mounts: Vec<PathBuf> = mountinfo
        .lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(|m| {
            PathBuf::from(
                m.replace("\\040", " ")
                    .replace("\\011", "\t")
                    .replace("\\012", "\n")
                    .replace("\\134", "\\"),
            )
        })
        .filter(|m| m.starts_with(dir))
        .collect();
    mounts.sort_by_key(|m| std::cmp::Reverse(m.components().count()));
    mounts
}

fn unmount_all_under(dir: &Path) {
    for m in mounts_under(dir) {
        let status = Command::new(tool("umount")).arg(&m).status();
        if !status.is_ok_and(|s| s.success()) {
            let _ = Command::new(tool("umount")).arg("-l").arg(&m).status();
        }
    }
}

/// Removes a folder that may hold a root file system, never through a mount (a bind-mounted
/// /dev or /proc would take the host's with it): anything still mounted leaves it in place.
fn remove_root(dir: &Path) {
    unmount_all_under(dir);
    let left = mounts_under(dir);
    if left.is_empty() {
        let _ = std::fs::remove_dir_all(dir);
    } else {
        eprintln!(
            "leaving {} in place: still mounted: {left:?}",
            dir.display()
        );
    }
}

/// A tarball of a clean Debian 12 (debootstrap --variant=minbase, the default mirror), built
/// once and cached.
fn clean_debian_tarball() -> PathBuf {
    let arch = ok(Command::new(tool("dpkg")).arg("--print-architecture"))
        .trim()
        .to_string();
    let dir = cache_dir().join("debootstrap");
    std::fs::create_dir_all(&dir).unwrap();
    let tarball = dir.join(format!("bookworm-minbase-{arch}.tar"));
    let lock = std::fs::File::create(dir.join(".lock")).unwrap();
    lock.lock().unwrap(); // one build at a time, across test processes too
    if tarball.is_file() {
        return tarball;
    }
    // Leftovers of an interrupted build (debootstrap mounts /proc and /sys inside).
    for entry in std::fs::read_dir(&dir).unwrap() {
        let path = entry.unwrap().path();
        if path
            .file_name()
            .unwrap()
            .to_string_lossy()
            .starts_with("build-")
        {
            remove_root(&path);
        }
    }
    let build = dir.join(format!("build-{}", std::process::id()));
    let started = Instant::now();
    let out = run(Command::new(tool("debootstrap"))
        .args(["--variant=minbase", "bookworm"])
        .arg(&build)
        .stdin(Stdio::null()));
    unmount_all_under(&build);
    if !out.status.success() {
        let log =
            std::fs::read_to_string(build.join("debootstrap/debootstrap.log")).unwrap_or_default();
        remove_root(&build);
        panic!("debootstrap failed: {}\n{log}", text(&out));
    }
    let partial = dir.join(format!(
        "{}.partial",
        tarball.file_name().unwrap().to_string_lossy()
    ));
    ok(Command::new(tool("tar"))
        .arg("--numeric-owner")
        .arg("-C")
        .arg(&build)
        .arg("-cf")
        .arg(&partial)
        .arg("."));
    std::fs::rename(&partial, &tarball).unwrap();
    remove_root(&build);
    eprintln!(
        "debootstrap: clean Debian cached at {} in {:.0} s",
        tarball.display(),
        started.elapsed().as_secs_f64()
    );
    tarball
}

/// A scratch root extracted from the clean tarball, with /proc mounted; unmounted and removed
/// when dropped (the processes run in it must be gone first: declare their guards after it).
struct ScratchRoot {
    path: PathBuf,
}

impl ScratchRoot {
    fn new(tarball: &Path) -> ScratchRoot {
        let path = tempfile::Builder::new()
            .prefix("fovea-scratch-root-")
            .tempdir()
            .unwrap()
            .keep();
        let root = ScratchRoot { path };
        ok(Command::new(tool("tar"))
            .args(["--numeric-owner", "-xpf"])
            .arg(tarball)
            .arg("-C")
            .arg(&root.path));
        ok(Command::new(tool("mount"))
            .args(["-t", "proc", "proc"])
            .arg(root.path.join("proc")));
        // Name resolution for apt, as on the host.
        std::fs::copy("/etc/resolv.conf", root.path.join("etc/resolv.conf")).unwrap();
        root
    }

    fn host_path(&self, inside: &str) -> PathBuf {
        self.path.join(inside.trim_start_matches('/'))
    }

    /// `chroot ROOT args...` as root, with a clean environment.
    fn command(&self, args: &[&str]) -> Command {
        let mut cmd = Command::new(tool("chroot"));
        cmd.arg(&self.path)
            .args(args)
            .env_clear()
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin")
            .env("LANG", "C.UTF-8")
            .env("DEBIAN_FRONTEND", "noninteractive")
            .stdin(Stdio::null());
        cmd
    }
}

impl Drop for ScratchRoot {
    fn drop(&mut self) {
        remove_root(&self.path);
    }
}

/// How systemd would start the unit's commands, as far as a chroot can: the unit's
/// Environment=, an unprivileged user (DynamicUser=), its UMask=, the state directory created
/// and owned by that user, $HOME=/. Brokers and the metrics endpoint point at free local ports:
/// a box with nothing else installed.
struct ServiceEnv {
    uid: u32,
    umask: String,
    env: Vec<(String, String)>,
}

impl ServiceEnv {
    fn command(
        &self,
        root: &ScratchRoot,
        words: &[String],
        extra_env: &[(&str, String)],
    ) -> Command {
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c")
            // WATCHDOG_PID is the main process, as systemd sets it: sh and chroot exec, so the
            // pid stays the same.
            .arg(r#"umask "$1"; root="$2"; user="$3"; shift 3; export WATCHDOG_PID=$$; exec "$0" --userspec="$user" "$root" "$@""#)
            .arg(tool("chroot"))
            .arg(&self.umask)
            .arg(&root.path)
            .arg(format!("{0}:{0}", self.uid))
            .args(words)
            .env_clear()
            .env("PATH", "/usr/bin:/bin")
            .env("HOME", "/")
            .env("LANG", "C.UTF-8")
            .stdin(Stdio::null());
        for (k, v) in &self.env {
            cmd.env(k, v);
        }
        for (k, v) in extra_env {
            cmd.env(k, v);
        }
        cmd
    }
}

/// The sd_notify datagrams fovea sends, with the time each arrived.
struct Notifications {
    socket: UnixDatagram,
    got: Vec<(Instant, String)>,
}

impl Notifications {
    /// Waits until a datagram with the line `line` has arrived at or after `since`; returns when.
    fn wait_for(
        &mut self,
        line: &str,
        since: Instant,
        limit: Duration,
        node: &mut Guard,
        log: &Path,
    ) -> Instant {
        let deadline = Instant::now() + limit;
        let mut buf = [0u8; 4096];
        loop {
            if let Some((t, _)) = self
                .got
                .iter()
                .find(|(t, s)| *t >= since && s.lines().any(|l| l == line))
            {
                return *t;
            }
            match self.socket.recv(&mut buf) {
                Ok(n) => self.got.push((
                    Instant::now(),
                    String::from_utf8_lossy(&buf[..n]).into_owned(),
                )),
                Err(_) => {
                    if let Ok(Some(status)) = node.0.try_wait() {
                        panic!(
                            "fovea exited ({status}) before {line}: {:?}\n{}",
                            self.got,
                            std::fs::read_to_string(log).unwrap_or_default()
                        );
                    }
                }
            }
            assert!(
                Instant::now() < deadline,
                "no {line} within {limit:?}: {:?}\n{}",
                self.got,
                std::fs::read_to_string(log).unwrap_or_default()
            );
        }
    }
}

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
