#!/usr/bin/env bash
# Disk soak: runs the demo's services and node with photos published at the demo's rate (or
# faster) for some minutes, and samples the local broker's data folder every 30 s, to show that
# it levels off under the topics' retention instead of growing without end (README, "Disk").
#
# Usage: scripts/soak-disk.sh [minutes, default 12]
#   FOVEA_SOAK_CAMERAS (2) x FOVEA_SOAK_FPS (1 frame/s): the demo's rate.
#   FOVEA_SOAK_FRAMES_BYTES: kafka.retention.frames.retention_bytes for the run (default 64 MiB
#     per partition, so that the cap is reached within a few minutes; the packaged 1 GiB would
#     take an hour at this rate). Results and dead letters keep their packaged retention.
#   FOVEA_BIN: the fovea binary (default target/release/fovea, else target/debug/fovea).
# Its own ports and run folder (under $FOVEA_CACHE/soak), so the demo's services are untouched.
# Not run by CI (it takes minutes by design); its figures are in the README.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)
minutes="${1:-12}"
export FOVEA_RUN_DIR="${FOVEA_CACHE:-$HOME/.cache/fovea}/soak"
export FOVEA_MQTT_PORT=18931 FOVEA_EDGE_KAFKA_PORT=19193
# shellcheck source=scripts/env.sh
source scripts/env.sh
cameras="${FOVEA_SOAK_CAMERAS:-2}"
fps="${FOVEA_SOAK_FPS:-1}"
frames_bytes="${FOVEA_SOAK_FRAMES_BYTES:-67108864}"
fovea="${FOVEA_BIN:-}"
if [[ -z $fovea ]]; then
  fovea="$root/target/release/fovea"
  [[ -x $fovea ]] || fovea="$root/target/debug/fovea"
fi
[[ -x $fovea ]] || { echo "no fovea binary: cargo build --release -p fovea" >&2; exit 2; }

scripts/services.sh stop all >/dev/null 2>&1 || true
rm -rf "$FOVEA_RUN_DIR"
scripts/services.sh start mqtt edge
run="$FOVEA_RUN_DIR/node"
data="$FOVEA_RUN_DIR/edge"
mkdir -p "$run"
metrics_port=19465
cat >"$run/fovea.toml" <<TOML
[node]
id = "soak"
state_dir = "$run/state"
[mqtt]
port = $FOVEA_MQTT_PORT
[kafka]
brokers = "127.0.0.1:$FOVEA_EDGE_KAFKA_PORT"
data_dir = "$data"
[kafka.retention.frames]
retention_bytes = $frames_bytes
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

pids=()
cleanup() {
  kill "${pids[@]}" 2>/dev/null || true
  wait 2>/dev/null || true
  scripts/services.sh stop all >/dev/null 2>&1 || true
}
trap cleanup EXIT
"$fovea" run --config "$run/fovea.toml" >"$run/fovea.log" 2>&1 &
pids+=($!)
until grep -q "mqtt subscribed" "$run/fovea.log"; do sleep 0.5; done
"$fovea" camera --mqtt "127.0.0.1:$FOVEA_MQTT_PORT" --images "$root/models/samples" \
  --cameras "$cameras" --fps "$fps" --forever --envelope --quiet &
pids+=($!)

metric() { curl -s "http://127.0.0.1:$metrics_port/metrics" | awk -v s="$1" '$1 == s { print $2 }'; }
echo "soak: $cameras cameras x $fps frame/s for $minutes min; frames retention_bytes=$frames_bytes per partition, 3 partitions; nisshi sweeps every minute"
printf '%6s %10s %12s %12s %12s\n' "min" "acked" "data MiB" "db MiB" "wal MiB"
end=$((SECONDS + minutes * 60))
start=$SECONDS
while ((SECONDS < end)); do
  sleep 30
  acked=$(metric fovea_frames_acked_total)
  total=$(du -s --block-size=1 "$data" | cut -f1)
  db=$(stat -c %s "$data/nisshi.db" 2>/dev/null || echo 0)
  wal=$(stat -c %s "$data/nisshi.db-wal" 2>/dev/null || echo 0)
  awk -v m="$(((SECONDS - start)))" -v a="${acked:-0}" -v t="$total" -v d="$db" -v w="$wal" \
    'BEGIN { printf "%6.1f %10d %12.1f %12.1f %12.1f\n", m / 60, a, t / 1048576, d / 1048576, w / 1048576 }'
done
echo "fovea log warnings:"
grep -c " WARN " "$run/fovea.log" || true
grep "topic fovea" "$run/fovea.log" | head -5
