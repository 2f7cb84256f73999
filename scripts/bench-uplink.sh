#!/usr/bin/env bash
# The uplink benchmark: starts the edge and cloud brokers (if not running), builds fovea in
# release, writes a backlog of 10 minutes of traffic (25 frames/s: a result per frame and one
# frame per second) to fresh local topics, and replicates it to the cloud. Prints records/s, MB/s
# and the catch-up time. Extra arguments go to `fovea bench-uplink` (e.g. --minutes 2).
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

scripts/install-deps.sh >/dev/null
# shellcheck source=scripts/env.sh
source scripts/env.sh
scripts/services.sh start edge cloud >/dev/null
cargo build --release -p fovea 2>&1 | tail -1

run="$FOVEA_RUN_DIR/bench-uplink"
mkdir -p "$run"
tag="b$(date +%s)"   # fresh topics and group each run: the backlog is exactly what this run wrote
cat > "$run/fovea.toml" <<TOML
[node]
id = "bench"
state_dir = "$run/state"

[log]
level = "warn"

[kafka]
brokers = "127.0.0.1:$FOVEA_EDGE_KAFKA_PORT"
topics = { frames = "$tag.frames", results = "$tag.results", deadletter = "$tag.deadletter" }

[uplink]
enabled = true
brokers = "127.0.0.1:$FOVEA_CLOUD_KAFKA_PORT"
results_topic = "$tag.results"
frames_topic = "$tag.frames"

[uplink.frames]
enabled = true

[[models]]
path = "$root/models/efficientnet-lite0"

[[routes]]
cameras = "*"
models = ["efficientnet-lite0"]
TOML
echo "machine: $(nproc) cores, $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | sed 's/^ //')"
exec "$root/target/release/fovea" bench-uplink --config "$run/fovea.toml" --images "${FOVEA_BENCH_IMAGES:-$root/models/samples}" "$@"
