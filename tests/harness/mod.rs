//! Test harness for the end-to-end tests: real mosquitto, a real Kafka-protocol broker (nisshi)
//! and the real `fovea` binary, each started on a free loopback port in a temporary folder and
//! killed when the test ends. Binaries come from `scripts/install-deps.sh` (see `scripts/env.sh`):
//! a missing one fails the test with a message saying so, never skips it.
#![allow(dead_code)]

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::OwnedMessage;
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use rumqttc::{AsyncClient, Event, MqttOptions, Packet, QoS};
use std::io::Read;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

mod slow_proxy;
#[allow(unused_imports)] // only slow_broker throttles its broker
pub use slow_proxy::SlowProxy;

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The repository's sample photos (provenance in `models/samples/README.md`).
pub fn samples_dir() -> PathBuf {
    repo_root().join("models/samples")
}

/// `models/samples/NAME` in the repository.
pub fn sample_image(name: &str) -> Vec<u8> {
    let path = samples_dir().join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

fn cache_dir() -> PathBuf {
    std::env::var_os("FOVEA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/fovea")
        })
}

/// A binary from an env var, else a default path; panics with the fix if it is missing.
fn binary(var: &str, default: PathBuf) -> PathBuf {
    let path = std::env::var_os(var).map(PathBuf::from).unwrap_or(default);
    assert!(
        path.exists(),
        "{} not found (set {var}, or run scripts/install-deps.sh)",
        path.display()
    );
    path
}

pub fn ort_library() -> PathBuf {
    binary(
        "ORT_DYLIB_PATH",
        cache_dir().join("onnxruntime/1.31.1/libonnxruntime.so.1.31.1"),
    )
}

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("no free port")
}

fn wait_for_port(port: u16, what: &str, child: &mut Child, log: &Path) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited with {status}: {}", read(log));
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not open port {port}: {}",
            read(log)
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn read(path: &Path) -> String {
    let mut s = String::new();
    let _ = std::fs::File::open(path).and_then(|mut f| f.read_to_string(&mut s));
    s
}

fn spawn_logged(cmd: &mut Command, log: &Path) -> Child {
    let out = std::fs::File::create(log).expect("log file");
    let err = out.try_clone().expect("log file");
    cmd.stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .spawn()
        .unwrap_or_else(|e| panic!("spawning {cmd:?}: {e}"))
}

/// A process killed (SIGKILL) when dropped.
pub struct Proc {
    pub child: Child,
    pub log: PathBuf,
}

impl Proc {
    pub fn log_text(&self) -> String {
        read(&self.log)
    }

    /// Sends a signal by name ("TERM", "KILL", ...).
    pub fn signal(&self, sig: &str) {
        if !self.is_running_now() {
            return;
        }
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
            .stderr(Stdio::null())
            .status();
    }

    /// Waits for the process to exit, at most `timeout`; returns its exit code.
    pub fn wait(&mut self, timeout: Duration) -> Option<i32> {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status.code().unwrap_or(-1));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    fn is_running_now(&self) -> bool {
        Path::new(&format!("/proc/{}", self.child.id())).exists()
    }

    pub fn is_running(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

pub struct Mosquitto {
    pub port: u16,
    pub proc: Proc,
}

/// The text of `systemd/mosquitto-fovea.conf`, the snippet the .deb installs as
/// `/etc/mosquitto/conf.d/fovea.conf`: the tests run mosquitto with the settings fovea ships.
pub fn packaged_mosquitto_snippet() -> String {
    let path = repo_root().join("systemd/mosquitto-fovea.conf");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("reading {}: {e}", path.display()))
}

/// A test's mosquitto config: the lines Debian's `mosquitto.conf` and the user would add around
/// the packaged snippet (a listener, authentication), then the snippet itself, unchanged. No
/// `max_inflight_messages`: the in-flight window is mosquitto's default (20), as on a box.
pub fn mosquitto_config(port: u16) -> String {
    format!(
        "# Written by the test harness (tests/harness/mod.rs).\n\
         listener {port} 127.0.0.1\n\
         # Loopback only, and the cameras of a test have no credentials.\n\
         allow_anonymous true\n\
         # Debian's mosquitto.conf turns persistence on; the snippet only sets how often it saves.\n\
         # A test's mosquitto is never restarted, so its queue in memory is all that counts, and\n\
         # without persistence it writes no database into the test folder.\n\
         persistence false\n\
         # Every packet logged (debug), so that a test can count from the broker's side what it\n\
         # delivered to fovea and what fovea acknowledged (Mosquitto::session).\n\
         log_type all\n\
         \n\
         # ---- systemd/mosquitto-fovea.conf, as the .deb installs it ----\n\
         {}",
        packaged_mosquitto_snippet()
    )
}

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        let bin = binary("FOVEA_MOSQUITTO_BIN", PathBuf::from("/usr/sbin/mosquitto"));
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(&conf, mosquitto_config(port)).expect("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        let mut child = spawn_logged(Command::new(bin).arg("-c").arg(&conf), &log);
        wait_for_port(port, "mosquitto", &mut child, &log);
        Mosquitto {
            port,
            proc: Proc { child, log },
        }
    }
}

/// What mosquitto's log says passed between it and one client (`log_type all`).
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Session {
    /// Connections the client made (CONNECT accepted).
    pub connects: usize,
    /// PUBLISH packets sent to the client for the first time (`d0`), and again after a
    /// reconnect (`d1`).
    pub delivered: usize,
    pub redelivered: usize,
    /// PUBACKs received from the client.
    pub acked: usize,
    /// Message ids delivered and not acked yet, in the order mosquitto sent them first.
    pub unacked: Vec<u16>,
    /// PINGREQs from the client.
    pub pings: usize,
    /// Disconnects mosquitto made because the client was silent beyond 1.5 keep-alives.
    pub keepalive_timeouts: usize,
    /// Connections that ended without a DISCONNECT from the client ("closed its connection",
    /// socket errors): a kill, or a client that gave up on the connection.
    pub dropped: usize,
    /// PUBLISH packets mosquitto received from every other client (the publishers).
    pub published: usize,
}

impl Mosquitto {
    /// Counts the log's lines about `client` (and the publishes from everyone else).
    pub fn session(&self, client: &str) -> Session {
        session_of(&self.proc.log_text(), client)
    }

    /// Polls the log until mosquitto delivered `want` messages to `client` (first deliveries)
    /// and had every delivery acked, at most `timeout`; returns the last count.
    pub fn wait_all_acked(&self, client: &str, want: usize, timeout: Duration) -> Session {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.session(client);
            if (s.delivered >= want && s.unacked.is_empty()) || Instant::now() > deadline {
                return s;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
}

/// [`Mosquitto::session`] on a log's text. Lines look like
/// `1796185541: Sending PUBLISH to subby (d0, q1, r0, m2, 'cameras/a/frames', ... (6 bytes))` and
/// `1796185541: Received PUBACK from subby (Mid: 2, RC:0)`.
pub fn session_of(log: &str, client: &str) -> Session {
    let mut s = Session::default();
    let mut unacked: Vec<u16> = Vec::new();
    let to = format!("Sending PUBLISH to {client} (");
    let ack = format!("Received PUBACK from {client} (Mid: ");
    let timeout = format!("Client {client} has exceeded timeout");
    let connected = format!(" as {client} (");
    for line in log.lines() {
        let Some((_, text)) = line.split_once(": ") else {
            continue;
        };
        if let Some(rest) = text.strip_prefix(&to) {
            let mid = rest
                .split(", ")
                .find_map(|f| f.strip_prefix('m')?.parse::<u16>().ok());
            if rest.starts_with("d1") {
                s.redelivered += 1;
            } else {
                s.delivered += 1;
            }
            if let Some(mid) = mid.filter(|m| !unacked.contains(m)) {
                unacked.push(mid);
            }
        } else if let Some(rest) = text.strip_prefix(&ack) {
            s.acked += 1;
            if let Some(mid) = rest.split(',').next().and_then(|m| m.parse::<u16>().ok()) {
                unacked.retain(|m| *m != mid);
            }
        } else if text.starts_with("New client connected") && text.contains(&connected) {
            s.connects += 1;
        } else if text == format!("Received PINGREQ from {client}") {
            s.pings += 1;
        } else if text.starts_with(&timeout) {
            s.keepalive_timeouts += 1;
        } else if text.starts_with(&format!("Client {client} closed its connection"))
            || text.starts_with(&format!("Socket error on client {client},"))
        {
            s.dropped += 1;
        } else if text.starts_with("Received PUBLISH from ")
            && !text.contains(&format!("from {client} "))
        {
            s.published += 1;
        }
    }
    s.unacked = unacked;
    s
}

pub struct Kafka {
    pub port: u16,
    pub proc: Proc,
    dir: PathBuf,
    name: String,
}

/// The `--storage-engine` argument of `systemd/fovea-kafka.service`'s ExecStart: the tests run
/// nisshi as the package does (its retention sweep interval included).
pub fn packaged_storage_engine() -> String {
    let unit = std::fs::read_to_string(repo_root().join("systemd/fovea-kafka.service"))
        .expect("systemd/fovea-kafka.service");
    let exec = unit
        .lines()
        .find(|l| l.starts_with("ExecStart="))
        .expect("ExecStart= in fovea-kafka.service");
    let mut words = exec.split_whitespace();
    words
        .find(|w| *w == "--storage-engine")
        .and_then(|_| words.next())
        .expect("--storage-engine in fovea-kafka.service")
        .to_owned()
}

impl Kafka {
    pub fn start(dir: &Path, name: &str) -> Kafka {
        Kafka::start_on(dir, name, free_port())
    }

    /// Stops the broker (SIGTERM, then SIGKILL after 10 s); its data stays.
    pub fn stop(&mut self) {
        self.proc.signal("TERM");
        if self.proc.wait(Duration::from_secs(10)).is_none() {
            self.proc.signal("KILL");
            self.proc.wait(Duration::from_secs(5));
        }
    }

    /// Starts the broker again on the same port with the same data.
    pub fn restart(&mut self) {
        self.stop();
        let again = Kafka::start_on(&self.dir, &self.name, self.port);
        *self = again;
    }

    /// Starts a broker on `port` (which may have been reserved while the broker was down), with
    /// the storage settings of the packaged `fovea-kafka.service`.
    pub fn start_on(dir: &Path, name: &str, port: u16) -> Kafka {
        Kafka::start_with_storage(dir, name, port, &packaged_storage_engine())
    }

    /// Like [`Kafka::start`], but nisshi sweeps expired records every `interval` (e.g. "2s")
    /// instead of the packaged unit's minute: for tests of retention, which would otherwise wait
    /// a minute for each sweep. Everything else is the packaged setting.
    pub fn start_sweeping_every(dir: &Path, name: &str, interval: &str) -> Kafka {
        let packaged = packaged_storage_engine();
        let (base, _) = packaged.split_once('?').unwrap_or((&packaged, ""));
        let storage = format!("{base}?maintenance_interval={interval}");
        Kafka::start_with_storage(dir, name, free_port(), &storage)
    }

    /// A broker on a free port whose clients are told to connect to `advertised_port` (a proxy
    /// in front of it, [`SlowProxy`]): Kafka clients use the advertised address after bootstrap.
    pub fn start_behind(dir: &Path, name: &str, port: u16, advertised_port: u16) -> Kafka {
        Kafka::start_full(
            dir,
            name,
            port,
            Some(advertised_port),
            &packaged_storage_engine(),
        )
    }

    fn start_with_storage(dir: &Path, name: &str, port: u16, storage: &str) -> Kafka {
        Kafka::start_full(dir, name, port, None, storage)
    }

    fn start_full(
        dir: &Path,
        name: &str,
        port: u16,
        advertised_port: Option<u16>,
        storage: &str,
    ) -> Kafka {
        let bin = binary("FOVEA_NISSHI_BIN", cache_dir().join("nisshi/bin/nisshi"));
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("broker dir");
        let url = format!("tcp://127.0.0.1:{port}");
        let advertised = format!("tcp://127.0.0.1:{}", advertised_port.unwrap_or(port));
        let log = dir.join(format!("{name}-{}.log", now_ms()));
        let mut cmd = Command::new(bin);
        cmd.current_dir(&data).args([
            "broker",
            "--cluster-id",
            name,
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &advertised,
            "--storage-engine",
            storage,
            "--group-initial-rebalance-delay",
            "0s",
        ]);
        let mut child = spawn_logged(&mut cmd, &log);
        wait_for_port(port, "nisshi", &mut child, &log);
        let kafka = Kafka {
            port,
            proc: Proc { child, log },
            dir: dir.to_path_buf(),
            name: name.to_string(),
        };
        let consumer = kafka.consumer();
        let deadline = Instant::now() + Duration::from_secs(30);
        while consumer
            .fetch_metadata(None, Duration::from_secs(2))
            .is_err()
        {
            assert!(Instant::now() < deadline, "nisshi never answered metadata");
        }
        kafka
    }

    /// Creates topic `name` with `partitions` and topic `settings` (before the node creates it
    /// with its own).
    pub fn create_topic(&self, name: &str, partitions: i32, settings: &[(&str, &str)]) {
        use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
        use rdkafka::client::DefaultClientContext;
        let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .create()
            .expect("admin client");
        let topic = settings.iter().fold(
            NewTopic::new(name, partitions, TopicReplication::Fixed(1)),
            |t, (k, v)| t.set(k, v),
        );
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let results = rt
            .block_on(admin.create_topics(&[topic], &AdminOptions::new()))
            .expect("create_topics");
        assert!(results.iter().all(Result::is_ok), "{results:?}");
    }

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    /// The broker's data folder (its SQLite database and WAL).
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join(&self.name)
    }

    pub fn consumer(&self) -> BaseConsumer {
        ClientConfig::new()
            .set("bootstrap.servers", self.brokers())
            .set("group.id", "fovea-tests")
            .set("enable.auto.commit", "false")
            .set("fetch.message.max.bytes", "67108864")
            .create()
            .expect("kafka consumer")
    }

    /// Reads `topic` from the beginning until `want` records arrived (then `settle` longer, to
    /// catch extras) or `timeout` passed. Returns everything read.
    pub fn read(&self, topic: &str, want: usize, timeout: Duration) -> Vec<OwnedMessage> {
        self.read_until(topic, timeout, |out| out.len() >= want)
    }

    /// Reads `topic` from the beginning until `enough` says so of what was read (then 1.5 s
    /// longer, to catch extras) or `timeout` passed. Returns everything read. For a topic that
    /// may hold duplicates, where a count of records says nothing about which arrived.
    pub fn read_until(
        &self,
        topic: &str,
        timeout: Duration,
        mut enough: impl FnMut(&[OwnedMessage]) -> bool,
    ) -> Vec<OwnedMessage> {
        let consumer = self.consumer();
        let deadline = Instant::now() + timeout;
        // The node creates its topics when it first reaches the broker: wait for them.
        let partitions = loop {
            let md = consumer
                .fetch_metadata(Some(topic), Duration::from_secs(10))
                .expect("metadata");
            let n = md
                .topics()
                .first()
                .map_or(0, |t| t.partitions().len() as i32);
            if n > 0 {
                break n;
            }
            assert!(Instant::now() < deadline, "topic {topic} never appeared");
            std::thread::sleep(Duration::from_millis(200));
        };
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .expect("partition offset");
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let mut settle_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now > deadline || settle_until.is_some_and(|s| now > s) {
                return out;
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                out.push(m.detach());
                if settle_until.is_none() && enough(&out) {
                    settle_until = Some(Instant::now() + Duration::from_millis(1500));
                }
            }
        }
    }
}

#[allow(unused_imports)] // not every test binary reads headers
pub use fovea::records::header_of as header;

/// The fovea node under test.
pub struct Node {
    pub proc: Proc,
    pub dir: PathBuf,
}

/// A config for a node on these brokers with the repository's models; `extra` is appended
/// (TOML tables for anything a test changes).
pub fn node_config(mqtt: &Mosquitto, kafka: &Kafka, extra: &str) -> String {
    let models = repo_root().join("models");
    format!(
        r#"
[node]
id = "test-node"
state_dir = "state"

[mqtt]
port = {mqtt_port}
{mqtt_extra}

[kafka]
brokers = "{brokers}"
{kafka_extra}

[inference]
onnxruntime_library = "{ort}"
{inference_extra}

[large_frames]
{large_extra}

[metrics]
listen = "127.0.0.1:{metrics_port}"

[health]
{health_extra}

[spool]
{spool_extra}

[[models]]
path = "{models}/efficientnet-lite0"

[[models]]
path = "{models}/ssdlite-person"

[[routes]]
cameras = "*"
models = ["efficientnet-lite0", "ssdlite-person"]
"#,
        mqtt_port = mqtt.port,
        mqtt_extra = section(extra, "mqtt"),
        brokers = kafka.brokers(),
        kafka_extra = section(extra, "kafka"),
        inference_extra = section(extra, "inference"),
        large_extra = section(extra, "large_frames"),
        metrics_port = free_port(),
        health_extra = section(extra, "health"),
        spool_extra = section(extra, "spool"),
        ort = ort_library().display(),
        models = models.display(),
    )
}

/// Lines of `extra` written as `section.key = value`, for that section.
fn section(extra: &str, name: &str) -> String {
    extra
        .lines()
        .filter_map(|l| l.trim().strip_prefix(&format!("{name}.")))
        .collect::<Vec<_>>()
        .join("\n")
}

impl Node {
    /// Starts `fovea run` and waits until it has subscribed to the camera topics.
    pub fn start(dir: &Path, config: &str) -> Node {
        let path = dir.join("fovea.toml");
        std::fs::write(&path, config).expect("config");
        Node::launch(dir)
    }

    /// Starts the node again with the same config, state and client id (after a kill or stop).
    pub fn restart(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
        *self = Node::launch(&self.dir);
    }

    /// SIGKILL, like a power cut for the process.
    pub fn kill(&mut self) {
        let _ = self.proc.child.kill();
        let _ = self.proc.child.wait();
    }

    /// SIGTERM and wait for a clean exit; returns the log.
    pub fn stop(&mut self) -> String {
        self.proc.signal("TERM");
        let code = self.proc.wait(Duration::from_secs(30));
        assert_eq!(
            code,
            Some(0),
            "fovea did not stop cleanly: {}",
            self.proc.log_text()
        );
        self.proc.log_text()
    }

    fn launch(dir: &Path) -> Node {
        Node::launch_with(dir, &[], &[])
    }

    /// Starts `fovea run` with the config already in `dir`, extra arguments and environment.
    pub fn launch_with(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Node {
        let path = dir.join("fovea.toml");
        let log = dir.join(format!("fovea-{}.log", now_ms()));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fovea"));
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--log-level")
            .arg("debug")
            .args(args)
            .envs(env.iter().copied());
        let child = spawn_logged(&mut cmd, &log);
        let mut node = Node {
            proc: Proc { child, log },
            dir: dir.to_path_buf(),
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !node.proc.log_text().contains("mqtt subscribed") {
            assert!(
                node.proc.is_running(),
                "fovea exited: {}",
                node.proc.log_text()
            );
            assert!(
                Instant::now() < deadline,
                "fovea never subscribed: {}",
                node.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        node
    }
}

impl Node {
    /// `GET path` on the node's metrics endpoint: (status, body).
    pub fn http_get(&self, path: &str) -> (u16, String) {
        let config = std::fs::read_to_string(self.dir.join("fovea.toml")).expect("config");
        let listen = metrics_listen(&config);
        let mut stream = std::net::TcpStream::connect(&listen).expect("metrics endpoint");
        stream
            .set_read_timeout(Some(Duration::from_secs(10)))
            .expect("timeout");
        use std::io::Write as _;
        write!(stream, "GET {path} HTTP/1.1\r\nHost: {listen}\r\n\r\n").expect("request");
        let mut response = String::new();
        stream.read_to_string(&mut response).expect("response");
        let (head, body) = response.split_once("\r\n\r\n").expect("HTTP response");
        let status = head
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status code");
        (status, body.to_string())
    }
}

impl Node {
    /// Polls `/metrics` until `series` is `want` (at most 90 s, else fails with the node's log);
    /// returns the last body.
    pub fn wait_metric(&self, series: &str, want: f64) -> String {
        let deadline = Instant::now() + Duration::from_secs(90);
        let mut last = None;
        loop {
            let (_, body) = self.http_get("/metrics");
            last = metric(&body, series).or(last);
            if last == Some(want) {
                return body;
            }
            assert!(
                Instant::now() < deadline,
                "{series} is {last:?}, expected {want}; log:\n{}",
                self.proc.log_text()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// `metrics.listen` of a node config.
pub fn metrics_listen(config: &str) -> String {
    let table: toml::Table = config.parse().expect("config TOML");
    table["metrics"]["listen"]
        .as_str()
        .expect("metrics.listen")
        .to_string()
}

/// The value of one series (`name{labels}` exactly as rendered) in a Prometheus text body.
pub fn metric(body: &str, series: &str) -> Option<f64> {
    body.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Publishes `(topic, payload)` pairs with QoS 1 and waits until the broker acked them all.
pub fn publish(port: u16, messages: &[(String, Vec<u8>)]) {
    publish_with(port, messages, 100, Duration::from_secs(60));
}

/// [`publish`] with up to `inflight` publishes un-acked at once (rumqttc's default is 100), all
/// acked within `timeout`: for thousands of messages.
pub fn publish_with(port: u16, messages: &[(String, Vec<u8>)], inflight: u16, timeout: Duration) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut opts = MqttOptions::new(format!("test-pub-{}", free_port()), "127.0.0.1", port);
        opts.set_max_packet_size(268_435_455, 268_435_455)
            .set_inflight(inflight);
        let (client, mut events) = AsyncClient::new(opts, 64);
        // The event loop must run while we publish: it drains the request channel.
        let want = messages.len();
        let poller = tokio::spawn(async move {
            let mut acked = 0;
            while acked < want {
                match events.poll().await {
                    Ok(Event::Incoming(Packet::PubAck(_))) => acked += 1,
                    Ok(_) => {}
                    Err(e) => panic!("mqtt publish connection: {e}"),
                }
            }
            events
        });
        for (topic, payload) in messages {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .expect("publish");
        }
        let mut events = tokio::time::timeout(timeout, poller)
            .await
            .unwrap_or_else(|_| panic!("not all {want} publishes were acked"))
            .expect("mqtt poller");
        let _ = client.disconnect().await;
        let _ = tokio::time::timeout(Duration::from_secs(1), events.poll()).await;
    });
}

/// A tmpfs of `mib` MiB mounted at `at` until dropped; `None`, with a line saying why, where
/// mounting is not allowed (it needs root).
pub struct Tmpfs(std::path::PathBuf);

impl Tmpfs {
    pub fn mount(at: &Path, mib: u64) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).expect("tmpfs mount point");
        let out = std::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={mib}m"), "tmpfs"])
            .arg(at)
            .output();
        match out {
            Ok(o) if o.status.success() => Some(Tmpfs(at.to_path_buf())),
            Ok(o) => {
                println!(
                    "SKIPPED: cannot mount a tmpfs ({}); this test needs root",
                    String::from_utf8_lossy(&o.stderr).trim()
                );
                None
            }
            Err(e) => {
                println!("SKIPPED: cannot run mount ({e}); this test needs root");
                None
            }
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = std::process::Command::new("umount").arg(&self.0).status();
    }
}

pub fn now_ms() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// Runs `fovea` with `args`; returns (exit code, stdout, stderr).
pub fn fovea(args: &[&str]) -> (Option<i32>, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_fovea"))
        .args(args)
        .output()
        .expect("running fovea");
    (
        out.status.code(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("fovea-test-")
        .tempdir()
        .expect("temp dir")
}

/// A steady load: `cameras` cameras each publishing `fps` frames per second (QoS 1, Frame
/// envelopes with sequence numbers from 1), cycling through `images`, until stopped.
pub struct Load {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    handle: Option<std::thread::JoinHandle<u64>>,
}

impl Load {
    pub fn start(port: u16, cameras: usize, fps: f64, images: Vec<Vec<u8>>) -> Load {
        use fovea_proto::v1::Frame;
        use prost::Message as _;
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let handle = std::thread::spawn(move || {
            let rt = tokio::runtime::Runtime::new().expect("runtime");
            rt.block_on(async move {
                let mut opts =
                    MqttOptions::new(format!("test-load-{}", free_port()), "127.0.0.1", port);
                opts.set_max_packet_size(268_435_455, 268_435_455)
                    .set_inflight(200);
                let (client, mut events) = AsyncClient::new(opts, 256);
                let acked = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                let acks = acked.clone();
                tokio::spawn(async move {
                    loop {
                        match events.poll().await {
                            Ok(Event::Incoming(Packet::PubAck(_))) => {
                                acks.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                            }
                            Ok(_) => {}
                            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                    }
                });
                let period = Duration::from_secs_f64(1.0 / fps);
                let started = tokio::time::Instant::now();
                let mut seq = 0u64;
                while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                    seq += 1;
                    tokio::time::sleep_until(started + period.mul_f64((seq - 1) as f64)).await;
                    for cam in 1..=cameras {
                        let frame = Frame {
                            sequence: seq,
                            data: images[(seq as usize + cam) % images.len()].clone().into(),
                            ..Frame::default()
                        };
                        client
                            .publish(
                                format!("cameras/load-{cam}/frames"),
                                QoS::AtLeastOnce,
                                false,
                                frame.encode_to_vec(),
                            )
                            .await
                            .expect("publish");
                    }
                }
                let sent = seq * cameras as u64;
                let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
                while acked.load(std::sync::atomic::Ordering::Relaxed) < sent {
                    assert!(
                        tokio::time::Instant::now() < deadline,
                        "mosquitto did not ack every publish"
                    );
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                seq
            })
        });
        Load {
            stop,
            handle: Some(handle),
        }
    }

    /// Stops publishing; returns how many frames each camera sent (sequences 1..=n), once the
    /// MQTT broker acknowledged them all.
    pub fn stop(mut self) -> u64 {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.handle
            .take()
            .map(|h| h.join().expect("load thread"))
            .unwrap_or(0)
    }
}

/// Small JPEG frames (640x480) made from the shared photos: light enough for a steady load.
pub fn small_jpegs() -> Vec<Vec<u8>> {
    sample_jpegs(640, 480, 80)
}

/// The four sample photos resized to `width` x `height`, as JPEGs of `quality`.
pub fn sample_jpegs(width: u32, height: u32, quality: u8) -> Vec<Vec<u8>> {
    ["chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg"]
        .iter()
        .map(|name| {
            let img = image::load_from_memory(&sample_image(name)).expect("photo");
            let img = img
                .resize_exact(width, height, image::imageops::FilterType::Triangle)
                .to_rgb8();
            let mut out = Vec::new();
            image::codecs::jpeg::JpegEncoder::new_with_quality(
                &mut std::io::Cursor::new(&mut out),
                quality,
            )
            .encode_image(&img)
            .expect("jpeg");
            out
        })
        .collect()
}

/// Record ids seen per (camera, camera sequence).
pub type ByFrame = std::collections::HashMap<(String, u64), Vec<String>>;

/// (camera, camera sequence) of every result record, and the record ids seen for each.
pub fn results_by_frame(records: &[OwnedMessage]) -> ByFrame {
    use fovea_proto::v1::InferenceResult;
    use prost::Message as _;
    use rdkafka::message::Message as _;
    let mut out = ByFrame::default();
    for r in records {
        let result = InferenceResult::decode(r.payload().unwrap_or_default()).expect("result");
        out.entry((result.camera_id, result.camera_sequence))
            .or_default()
            .push(result.record_id);
    }
    out
}

/// (camera, camera sequence) of every frame record.
pub fn frames_by_frame(records: &[OwnedMessage]) -> ByFrame {
    use fovea_proto::v1::Frame;
    use prost::Message as _;
    use rdkafka::message::Message as _;
    let mut out = ByFrame::default();
    for r in records {
        let frame = Frame::decode(r.payload().unwrap_or_default()).expect("frame");
        out.entry((frame.camera_id, frame.sequence))
            .or_default()
            .push(frame.record_id);
    }
    out
}

/// Runs `fovea frames export` of the frames topic into `out` (reassembling chunks, checking
/// each frame's CRC); fails the test unless it exits 0. Returns its summary line.
pub fn export_frames(kafka: &Kafka, out: &Path) -> String {
    export_frames_with(kafka, out, &[])
}

/// Same with `extra` arguments (e.g. `--config` for the claim-check URLs it may fetch).
pub fn export_frames_with(kafka: &Kafka, out: &Path, extra: &[&str]) -> String {
    let (code, stdout, stderr) = run_export(kafka, out, extra);
    assert_eq!(code, Some(0), "export failed: {stdout}{stderr}");
    stdout
}

/// Runs `fovea frames export` into `out` with `extra` arguments, whatever its exit code:
/// (exit code, stdout, stderr).
pub fn run_export(kafka: &Kafka, out: &Path, extra: &[&str]) -> (Option<i32>, String, String) {
    let brokers = kafka.brokers();
    let mut args = vec![
        "frames",
        "export",
        "--brokers",
        &brokers,
        "--out",
        out.to_str().expect("utf-8 path"),
        "--idle-exit",
        "8",
    ];
    args.extend_from_slice(extra);
    fovea(&args)
}

/// Noise PNGs (side 183 ~ 100 KB, 606 ~ 1.1 MB, 1155 ~ 4 MB, 4083 ~ 50 MB): the bench's generator.
#[allow(unused_imports)] // not every test binary makes large frames
pub use fovea::tools::bench::noise_png;

/// How often the node renewed its MQTT session to get back deliveries it shed (its log).
pub fn session_renewals(node: &Node) -> usize {
    node.proc
        .log_text()
        .lines()
        .filter(|l| l.contains("reconnecting for the deliveries shed"))
        .count()
}

/// Peak resident memory of a process (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc/PID/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmHWM in /proc/PID/status")
        * 1024
}

/// A `fovea.v1.Frame` envelope around `image`, with camera sequence `seq` and `metadata`.
pub fn envelope(seq: u64, image: &[u8], metadata: &[(&str, &str)]) -> Vec<u8> {
    let frame = fovea_proto::v1::Frame {
        sequence: seq,
        data: image.to_vec().into(),
        metadata: metadata
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..fovea_proto::v1::Frame::default()
    };
    prost::Message::encode_to_vec(&frame)
}

/// Splits `image` into FrameChunk payloads of at most `piece` bytes on `cameras/<camera>/chunks`,
/// as a small camera would (metadata `site = dock` on the frame).
pub fn chunked_upload(
    camera: &str,
    frame_id: &str,
    image: &[u8],
    piece: usize,
) -> Vec<(String, Vec<u8>)> {
    use prost::Message as _;
    let metadata = std::collections::HashMap::from([("site".to_string(), "dock".to_string())]);
    fovea_proto::chunks::split(frame_id, camera, "image/png", &metadata, image, piece)
        .expect("split")
        .into_iter()
        .map(|c| (format!("cameras/{camera}/chunks"), c.encode_to_vec()))
        .collect()
}

/// How many records carry each `fovea-record-id`.
pub fn record_id_counts(records: &[OwnedMessage]) -> std::collections::HashMap<String, usize> {
    let mut out = std::collections::HashMap::new();
    for r in records {
        let id = header(r, fovea_proto::headers::RECORD_ID).unwrap_or_default();
        *out.entry(id).or_insert(0) += 1;
    }
    out
}

/// `n` pseudo-random letters and digits (the same every run): text that neither compresses nor
/// repeats, for metadata that must stay large on the wire.
pub fn noise_text(n: usize) -> String {
    let mut state = 0x9e37_79b9_u32;
    (0..n)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            char::from(b"abcdefghijklmnopqrstuvwxyz0123456789"[state as usize % 36])
        })
        .collect()
}

/// The one file `fovea frames export` wrote for `camera` under `out`.
pub fn exported_file(out: &Path, camera: &str) -> Vec<u8> {
    let dir = out.join(camera);
    let files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("dir entry").path())
        .collect();
    assert_eq!(files.len(), 1, "{camera}: {files:?}");
    std::fs::read(&files[0]).expect("exported file")
}
