#!/usr/bin/env bash
# Environment for fovea's builds, tests and demo services.
#
# Usage (preferred):   source scripts/env.sh
# Also works:          eval "$(scripts/env.sh)"   (executed, it prints `export` lines)
#
# Every variable keeps a value that is already set, so a caller can point at
# another cache, broker binary or port. Paths are where scripts/install-deps.sh
# puts things; this file installs nothing and checks nothing.
#
# No `set -euo pipefail` at top level: when sourced it would change the
# caller's interactive shell.

export FOVEA_CACHE="${FOVEA_CACHE:-$HOME/.cache/fovea}"
export FOVEA_ORT_VERSION="${FOVEA_ORT_VERSION:-1.31.1}"
# The `ort` crate (load-dynamic) reads ORT_DYLIB_PATH; rc.15 needs ONNX Runtime >= 1.31.
export ORT_DYLIB_PATH="${ORT_DYLIB_PATH:-$FOVEA_CACHE/onnxruntime/$FOVEA_ORT_VERSION/libonnxruntime.so.$FOVEA_ORT_VERSION}"
# ONNX Runtime's PyPI build sends usage telemetry unless told not to (the unit sets it too).
export ORT_DISABLE_TELEMETRY="${ORT_DISABLE_TELEMETRY:-1}"
export FOVEA_NISSHI_BIN="${FOVEA_NISSHI_BIN:-$FOVEA_CACHE/nisshi/bin/nisshi}"
# Debian puts mosquitto in /usr/sbin, which a non-root PATH often lacks.
FOVEA_MOSQUITTO_BIN="${FOVEA_MOSQUITTO_BIN:-$(command -v mosquitto || echo /usr/sbin/mosquitto)}"
export FOVEA_MOSQUITTO_BIN
# Fixed loopback ports for the demo services (scripts/services.sh); tests use ephemeral ones.
export FOVEA_MQTT_PORT="${FOVEA_MQTT_PORT:-18830}"
export FOVEA_EDGE_KAFKA_PORT="${FOVEA_EDGE_KAFKA_PORT:-19092}"
export FOVEA_CLOUD_KAFKA_PORT="${FOVEA_CLOUD_KAFKA_PORT:-29092}"
export FOVEA_RUN_DIR="${FOVEA_RUN_DIR:-$FOVEA_CACHE/run}"

# Executed rather than sourced: print the values for `eval`.
if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  for v in FOVEA_CACHE FOVEA_ORT_VERSION ORT_DYLIB_PATH ORT_DISABLE_TELEMETRY FOVEA_NISSHI_BIN FOVEA_MOSQUITTO_BIN \
    FOVEA_MQTT_PORT FOVEA_EDGE_KAFKA_PORT FOVEA_CLOUD_KAFKA_PORT FOVEA_RUN_DIR; do
    printf 'export %s=%q\n' "$v" "${!v}"
  done
fi
