#!/usr/bin/env bash
# The appliance figures: start-up time to READY, resident memory idle and under load, and the
# drain time after SIGTERM under load, of the release binary run as systemd would run it (with a
# NOTIFY_SOCKET). Starts mosquitto and the local Kafka broker (if not running), builds fovea in
# release, and prints the figures. Options (environment):
#   FOVEA_BENCH_STARTS=5     start-ups measured (the median is printed)
#   FOVEA_BENCH_CAMERAS=4    simulated cameras under load, FOVEA_BENCH_FPS=5 frames/s each
#   FOVEA_BENCH_SECONDS=30   length of the load
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh >/dev/null
# shellcheck source=scripts/env.sh
source scripts/env.sh
scripts/services.sh start mqtt edge >/dev/null
cargo build --release -p fovea 2>&1 | tail -1

run="$FOVEA_RUN_DIR/bench-service"
rm -rf "$run"
mkdir -p "$run"
metrics_port=19464
cat >"$run/fovea.toml" <<TOML
[node]
id = "bench-service"
state_dir = "$run/state"

[log]
level = "warn"

[mqtt]
port = $FOVEA_MQTT_PORT
client_id = "fovea-bench-service"

[kafka]
brokers = "127.0.0.1:$FOVEA_EDGE_KAFKA_PORT"
topics = { frames = "benchsvc.frames", results = "benchsvc.results", deadletter = "benchsvc.deadletter" }

[inference]
onnxruntime_library = "$ORT_DYLIB_PATH"

[metrics]
listen = "127.0.0.1:$metrics_port"

[[models]]
path = "$root/models/efficientnet-lite0"

[[models]]
path = "$root/models/ssdlite-person"

[[routes]]
cameras = "*"
models = ["efficientnet-lite0", "ssdlite-person"]
TOML

echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
echo "binary: $(stat -c %s target/release/fovea) bytes ($(numfmt --to=iec-i --suffix=B "$(stat -c %s target/release/fovea)"))"
exec python3 - "$root/target/release/fovea" "$run" "$metrics_port" "$FOVEA_MQTT_PORT" \
  "${FOVEA_BENCH_IMAGES:-$root/models/samples}" <<'PY'
import os, socket, statistics, subprocess, sys, time, urllib.request

fovea, run, metrics_port, mqtt_port, images = sys.argv[1:6]
starts = int(os.environ.get("FOVEA_BENCH_STARTS", "5"))
cameras = int(os.environ.get("FOVEA_BENCH_CAMERAS", "4"))
fps = float(os.environ.get("FOVEA_BENCH_FPS", "5"))
seconds = float(os.environ.get("FOVEA_BENCH_SECONDS", "30"))
config = os.path.join(run, "fovea.toml")
sock_path = os.path.join(run, "notify.sock")


def rss_kib(pid, key="VmRSS"):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    return 0


def metric(name):
    body = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5).read().decode()
    for line in body.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


def start():
    """Starts the node with a notification socket; returns (process, socket, seconds to READY)."""
    if os.path.exists(sock_path):
        os.unlink(sock_path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(120)
    env = dict(os.environ, NOTIFY_SOCKET=sock_path, WATCHDOG_USEC="10000000")
    log = open(os.path.join(run, "fovea.log"), "ab")
    t0 = time.monotonic()
    proc = subprocess.Popen([fovea, "run", "--config", config], env=env, stdout=log, stderr=log)
    while True:
        msg = sock.recv(4096).decode()
        if msg.startswith("READY=1"):
            return proc, sock, time.monotonic() - t0


def stop(proc, sock):
    t0 = time.monotonic()
    proc.terminate()
    code = proc.wait(60)
    sock.close()
    return code, time.monotonic() - t0


ready = []
for _ in range(starts):
    proc, sock, took = start()
    ready.append(took)
    stop(proc, sock)
print(f"start-up to READY=1: median {statistics.median(ready) * 1000:.0f} ms "
      f"(min {min(ready) * 1000:.0f}, max {max(ready) * 1000:.0f}; {starts} starts; models loaded, spool open)")

proc, sock, _ = start()
time.sleep(10)
idle = rss_kib(proc.pid)
print(f"RSS idle (10 s after READY): {idle / 1024:.0f} MiB")

camera = subprocess.Popen(
    [fovea, "camera", "--mqtt", f"127.0.0.1:{mqtt_port}", "--images", images,
     "--cameras", str(cameras), "--fps", str(fps), "--forever", "--envelope", "--quiet"],
    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
acked0 = metric("fovea_frames_acked_total") or 0
samples = []
t_end = time.monotonic() + seconds
while time.monotonic() < t_end:
    samples.append(rss_kib(proc.pid))
    time.sleep(0.5)
acked = (metric("fovea_frames_acked_total") or 0) - acked0
hwm = rss_kib(proc.pid, "VmHWM")
print(f"RSS under load ({cameras} cameras x {fps:g} fps of the shared photos, both models, {seconds:.0f} s, "
      f"{acked / seconds:.1f} frames/s acked): median {statistics.median(samples) / 1024:.0f} MiB, "
      f"peak {hwm / 1024:.0f} MiB")
code, drain = stop(proc, sock)
camera.terminate()
camera.wait(10)
print(f"SIGTERM under that load: exit code {code} after {drain * 1000:.0f} ms")
PY
