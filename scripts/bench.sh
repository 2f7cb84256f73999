#!/usr/bin/env bash
# The main-path benchmark: starts mosquitto and the local Kafka broker (if not running), builds
# fovea in release, and runs `fovea bench` with the classifier on 640x480 JPEG frames made from
# models/samples. Prints frames/s (inference alone and end to end), their ratio, per-stage
# latency p50/p99 and peak RSS. Extra arguments go to `fovea bench` (e.g. --frames 1000).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh >/dev/null
# shellcheck source=scripts/env.sh
source scripts/env.sh
scripts/services.sh start mqtt edge >/dev/null
cargo build --release -p fovea 2>&1 | tail -1

run="$FOVEA_RUN_DIR/bench"
# A fresh spool each run (--backlog fills it before the node starts).
rm -rf "$run/state"
mkdir -p "$run"
cat > "$run/fovea.toml" <<TOML
[node]
id = "bench"
state_dir = "$run/state"

[log]
level = "warn"

[mqtt]
port = $FOVEA_MQTT_PORT
client_id = "fovea-bench-node"

[kafka]
brokers = "127.0.0.1:$FOVEA_EDGE_KAFKA_PORT"
topics = { frames = "bench.frames", results = "bench.results", deadletter = "bench.deadletter" }

[inference]
onnxruntime_library = "$ORT_DYLIB_PATH"
workers = ${FOVEA_BENCH_WORKERS:-1}
intra_threads = 1

[[models]]
path = "$root/models/efficientnet-lite0"

[[routes]]
cameras = "*"
models = ["efficientnet-lite0"]
TOML
echo "machine: $(nproc) cores, $(awk '/MemTotal/ {printf "%.0f GiB", $2/1048576}' /proc/meminfo), $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
exec "$root/target/release/fovea" bench --config "$run/fovea.toml" --images "${FOVEA_BENCH_IMAGES:-$root/models/samples}" "$@"
