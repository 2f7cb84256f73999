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

pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// `../shared/images/NAME` beside the repository.
pub fn shared_image(name: &str) -> Vec<u8> {
    let path = repo_root().join("../shared/images").join(name);
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
        let _ = Command::new("kill")
            .arg(format!("-{sig}"))
            .arg(self.child.id().to_string())
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

impl Mosquitto {
    pub fn start(dir: &Path) -> Mosquitto {
        let bin = binary("FOVEA_MOSQUITTO_BIN", PathBuf::from("/usr/sbin/mosquitto"));
        let port = free_port();
        let conf = dir.join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {port} 127.0.0.1\nallow_anonymous true\npersistence false\n\
                 max_inflight_messages 32\nmax_queued_messages 100000\n"
            ),
        )
        .expect("mosquitto.conf");
        let log = dir.join("mosquitto.log");
        let mut child = spawn_logged(Command::new(bin).arg("-c").arg(&conf), &log);
        wait_for_port(port, "mosquitto", &mut child, &log);
        Mosquitto {
            port,
            proc: Proc { child, log },
        }
    }
}

pub struct Kafka {
    pub port: u16,
    pub proc: Proc,
}

impl Kafka {
    pub fn start(dir: &Path, name: &str) -> Kafka {
        let bin = binary("FOVEA_NISSHI_BIN", cache_dir().join("nisshi/bin/nisshi"));
        let port = free_port();
        let data = dir.join(name);
        std::fs::create_dir_all(&data).expect("broker dir");
        let url = format!("tcp://127.0.0.1:{port}");
        let log = dir.join(format!("{name}.log"));
        let mut cmd = Command::new(bin);
        cmd.current_dir(&data).args([
            "broker",
            "--cluster-id",
            name,
            "--listener-url",
            &url,
            "--advertised-listener-url",
            &url,
            "--storage-engine",
            "sqlite://nisshi.db",
            "--group-initial-rebalance-delay",
            "0s",
        ]);
        let mut child = spawn_logged(&mut cmd, &log);
        wait_for_port(port, "nisshi", &mut child, &log);
        let kafka = Kafka {
            port,
            proc: Proc { child, log },
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

    pub fn brokers(&self) -> String {
        format!("127.0.0.1:{}", self.port)
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
        let consumer = self.consumer();
        let md = consumer
            .fetch_metadata(Some(topic), Duration::from_secs(10))
            .expect("metadata");
        let partitions = md.topics()[0].partitions().len() as i32;
        assert!(partitions > 0, "topic {topic} missing");
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            tpl.add_partition_offset(topic, p, Offset::Beginning)
                .unwrap();
        }
        consumer.assign(&tpl).expect("assign");
        let mut out = Vec::new();
        let deadline = Instant::now() + timeout;
        let mut settle_until: Option<Instant> = None;
        loop {
            let now = Instant::now();
            if now > deadline || settle_until.is_some_and(|s| now > s) {
                return out;
            }
            if let Some(Ok(m)) = consumer.poll(Duration::from_millis(100)) {
                out.push(m.detach());
                if out.len() >= want && settle_until.is_none() {
                    settle_until = Some(Instant::now() + Duration::from_millis(1500));
                }
            }
        }
    }
}

#[allow(unused_imports)] // not every test binary reads headers
pub use fovea::tools::tail::header;

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
        let log = dir.join("fovea.log");
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_fovea"));
        cmd.arg("run")
            .arg("--config")
            .arg(&path)
            .arg("--log-level")
            .arg("debug");
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

/// Publishes `(topic, payload)` pairs with QoS 1 and waits until the broker acked them all.
pub fn publish(port: u16, messages: &[(String, Vec<u8>)]) {
    let rt = tokio::runtime::Runtime::new().expect("runtime");
    rt.block_on(async {
        let mut opts = MqttOptions::new(format!("test-pub-{}", free_port()), "127.0.0.1", port);
        opts.set_max_packet_size(268_435_455, 268_435_455);
        let (client, mut events) = AsyncClient::new(opts, 64);
        for (topic, payload) in messages {
            client
                .publish(topic.clone(), QoS::AtLeastOnce, false, payload.clone())
                .await
                .expect("publish");
        }
        let mut acked = 0;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while acked < messages.len() {
            match tokio::time::timeout_at(deadline, events.poll()).await {
                Ok(Ok(Event::Incoming(Packet::PubAck(_)))) => acked += 1,
                Ok(Ok(_)) => {}
                Ok(Err(e)) => panic!("mqtt publish connection: {e}"),
                Err(_) => panic!("only {acked} of {} publishes acked", messages.len()),
            }
        }
        let _ = client.disconnect().await;
    });
}

pub fn temp_dir() -> TempDir {
    tempfile::Builder::new()
        .prefix("fovea-test-")
        .tempdir()
        .expect("temp dir")
}
