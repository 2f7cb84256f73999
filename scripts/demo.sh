#!/usr/bin/env bash
# The demo: fovea's main job end to end on this machine.
# Installs what is missing, starts mosquitto and the local Kafka broker on loopback, runs the
# fovea node, publishes the sample photos in models/samples as two simulated cameras (1 frame/s
# each), and prints every result the node writes to Kafka, live, until Ctrl-C.
# A first run on a new machine spends about 20 minutes installing and building (it says what,
# before it starts); later runs show the first result within seconds.
set -euo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

# Only what the demo needs (no linters or packaging tools).
scripts/install-deps.sh demo
# shellcheck source=scripts/env.sh
source scripts/env.sh
scripts/services.sh start mqtt edge

# FOVEA_DEMO_PROFILE=dev builds the debug profile instead (scripts/check-standalone.sh does, to
# reuse the build the tests just made); CARGO_TARGET_DIR is honoured.
profile="${FOVEA_DEMO_PROFILE:-release}"
case "$profile" in
  release) profile_dir=release ;;
  dev) profile_dir=debug ;;
  *) echo "FOVEA_DEMO_PROFILE must be release or dev, not $profile" >&2; exit 2 ;;
esac
fovea="${CARGO_TARGET_DIR:-$root/target}/$profile_dir/fovea"
if [[ -x $fovea ]]; then
  echo "== building fovea ($profile; only what changed)"
else
  echo "== building fovea ($profile; about 5 minutes on 2 cores the first time)"
fi
cargo build --profile "$profile" -p fovea

images="${FOVEA_DEMO_IMAGES:-$root/models/samples}"
run="$FOVEA_RUN_DIR/demo"
mkdir -p "$run"
cat > "$run/fovea.toml" <<TOML
# Written by scripts/demo.sh. See \`fovea default-config\` for every setting.
[node]
id = "demo"
state_dir = "$run/state"

[mqtt]
port = $FOVEA_MQTT_PORT

[kafka]
brokers = "127.0.0.1:$FOVEA_EDGE_KAFKA_PORT"

[inference]
onnxruntime_library = "$ORT_DYLIB_PATH"

[[models]]
path = "$root/models/efficientnet-lite0"

[[models]]
path = "$root/models/ssdlite-person"

[[routes]]
cameras = "*"
models = ["efficientnet-lite0", "ssdlite-person"]
TOML
"$fovea" validate "$run/fovea.toml"

pids=()
node_status="" # the node's exit status, once it has been waited for
# shellcheck disable=SC2317 # run by the trap (shellcheck 0.9 misses that when the script ends in exit)
cleanup() {
  # A second Ctrl-C (or timeout's second SIGINT) must not cut the report short: the node is
  # in a session of its own and drains anyway, for at most its drain timeout (20 s).
  trap '' INT TERM
  trap - EXIT
  echo
  echo "== stopping the node (SIGTERM: it drains what is in flight)"
  for p in "${pids[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
  if [[ -z $node_status ]] && ((${#pids[@]})); then
    node_status=0
    wait "${pids[0]}" 2>/dev/null || node_status=$?
  fi
  wait 2>/dev/null || true
  # The node's last words on a clean stop: "stopped after N s of drain: ... frames in, ... acked".
  echo "== node exited with status ${node_status:-none}: $(grep -o 'stopped after .*' "$run/fovea.log" 2>/dev/null | tail -n 1)"
  echo "node log: $run/fovea.log"
  # Say what is really still running: the services run in sessions of their own (Ctrl-C does
  # not reach them) and keep their data for the next run.
  echo "demo services:"
  scripts/services.sh status mqtt edge || true
  echo "(stop them with: scripts/services.sh stop)"
}
trap cleanup INT TERM EXIT

# In a session of its own: Ctrl-C reaches the whole terminal process group, and a node that saw
# it and then the cleanup's SIGTERM would take the second signal as "exit now" instead of
# draining. This way it gets exactly one signal, from cleanup.
setsid "$fovea" run --config "$run/fovea.toml" >"$run/fovea.log" 2>&1 &
pids+=($!)
# Wait for the node to subscribe before cameras publish.
for _ in $(seq 1 300); do
  grep -q "mqtt subscribed" "$run/fovea.log" 2>/dev/null && break
  if ! kill -0 "${pids[0]}" 2>/dev/null; then cat "$run/fovea.log"; exit 1; fi
  sleep 0.2
done
echo "== node running (log: $run/fovea.log); results from fovea.results:"
"$fovea" tail --brokers "127.0.0.1:$FOVEA_EDGE_KAFKA_PORT" --topic fovea.results --topic fovea.deadletter &
pids+=($!)
"$fovea" camera --mqtt "127.0.0.1:$FOVEA_MQTT_PORT" --images "$images" --cameras 2 --fps 1 --forever --envelope --quiet &
pids+=($!)
# Ctrl-C interrupts this wait: cleanup (the trap) waits for the node and keeps its status.
status=0
wait "${pids[0]}" || status=$?
node_status="${node_status:-$status}"
exit "$node_status"
