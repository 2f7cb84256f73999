#!/usr/bin/env bash
# The test command (README, CI): install/check dependencies, then format check,
# clippy with warnings as errors, the whole workspace's tests, the fuzz targets for a bounded
# time, and the unit tests under qemu-user for aarch64.
# Tests start their own brokers on ephemeral ports from FOVEA_NISSHI_BIN,
# FOVEA_MOSQUITTO_BIN and ORT_DYLIB_PATH, so no demo services are started here.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

# A fresh login may not have rustup's bin dir on PATH yet.
if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

step() { printf '\n==== %s\n' "$*"; }

step "scripts/install-deps.sh"
bash scripts/install-deps.sh

# shellcheck source=scripts/env.sh
. scripts/env.sh

# CI logs are plain text.
if [[ "${CI:-}" == "true" ]]; then
  export CARGO_TERM_COLOR=never
fi

step "cargo fmt --check"
cargo fmt --all -- --check
# The fuzz targets are a workspace of their own (fuzz/).
cargo fmt --manifest-path fuzz/Cargo.toml -- --check

step "cargo clippy"
cargo clippy --workspace --all-targets -- -D warnings

step "cargo test"
log=$(mktemp)
trap 'rm -f "$log"' EXIT
status=0
# --no-fail-fast: one failing test binary must not hide the results of the others.
cargo test --workspace --no-fail-fast 2>&1 | tee "$log" || status=$?

# The fuzz targets (fuzz/, README "Fuzzing"), 20 s each on their seed corpora, one line each;
# a crash fails the run. Skip with FOVEA_SKIP_FUZZ=1 while iterating locally; CI never sets it.
if [[ "${FOVEA_SKIP_FUZZ:-0}" != 1 ]]; then
  step "scripts/fuzz.sh"
  bash scripts/fuzz.sh 20 2>&1 | tee -a "$log" || status=$?
fi

# A clone of HEAD in an empty folder runs the demo on its own (scripts/check-standalone.sh says
# what it checks); it reuses the dev build cargo test just made. Skip with
# FOVEA_SKIP_STANDALONE=1 while iterating locally; CI never sets it.
if [[ "${FOVEA_SKIP_STANDALONE:-0}" != 1 ]]; then
  step "scripts/check-standalone.sh"
  bash scripts/check-standalone.sh 2>&1 | tee -a "$log" || status=$?
fi

# The unit tests of both crates again, built for aarch64 and run under qemu-user (the ONNX
# Runtime model tests included); the ARM targets' other needs are in cross/README.md. Skip with
# FOVEA_SKIP_CROSS=1 (e.g. while iterating locally); CI never sets it.
if [[ "${FOVEA_SKIP_CROSS:-0}" != 1 ]]; then
  step "scripts/cross.sh test aarch64"
  bash scripts/cross.sh test aarch64 2>&1 | tee -a "$log" || status=$?
fi
# One closing line for the whole run (cargo prints one per test binary, the last often a
# doc-test run with nothing in it; check-standalone.sh and fuzz.sh one line per check or target).
awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i) ~ /^passed;?$/) p += $(i-1); if ($(i) ~ /^failed;?$/) f += $(i-1); if ($(i) ~ /^ignored;?$/) s += $(i-1) } }
     /^standalone check ok: / { p++ }
     /^standalone check FAILED: / { f++ }
     /^fuzz [^ ]+: .*, no crash$/ { p++ }
     /^fuzz [^ ]+: (CRASH|FAILED)/ { f++ }
     END { printf "\n%d passed, %d failed, %d skipped\n", p, f, s }' "$log"
exit "$status"
