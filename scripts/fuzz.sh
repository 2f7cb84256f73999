#!/usr/bin/env bash
# The fuzz targets in fuzz/ (README, "Fuzzing"): builds them all once with cargo-fuzz on the
# nightly toolchain, runs each for a bounded time on a copy of its seed corpus in fuzz/corpus/
# (the repository is not written to), prints one line per target and exits 1 if any crashed.
#
# Usage: scripts/fuzz.sh [seconds-per-target] [target...]   (default 30 s, every target)
#        scripts/fuzz.sh --install    only install what it needs (scripts/install-deps.sh test)
#
# Builds go to $FOVEA_CACHE/fuzz-target, so a fresh clone (CI) reuses the previous build. A
# crash's input is kept in fuzz/artifacts/<target>/ (ignored by git) and, if small, printed in
# base64 so that it can be taken from a CI log; reproduce it with
#   cargo +nightly fuzz run --sanitizer none -a <target> <file>
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

CARGO_FUZZ_VERSION=0.13.2
# fovea's code is safe Rust (the one unsafe module, librdkafka's, is reached by no target), so
# AddressSanitizer would find nothing there while halving the executions; and the `cc` crate
# would build zstd-sys instrumented, which librdkafka's configure then cannot link against.
# Debug assertions (-a) turn integer overflow into a crash.
BUILD=(--sanitizer none --debug-assertions)
TRIPLE=x86_64-unknown-linux-gnu

log() { printf '[fuzz] %s\n' "$*" >&2; }

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

install() {
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
  fi
  if ! cargo fuzz --version 2>/dev/null | grep -qxF "cargo-fuzz $CARGO_FUZZ_VERSION"; then
    log "cargo install cargo-fuzz $CARGO_FUZZ_VERSION (about 1 minute, once)"
    cargo install cargo-fuzz --version "$CARGO_FUZZ_VERSION" --locked --quiet
  fi
}

if [[ "${1:-}" == --install ]]; then
  install
  exit 0
fi

SECONDS_PER_TARGET="${1:-30}"
[[ "$SECONDS_PER_TARGET" =~ ^[1-9][0-9]*$ ]] || { log "usage: $0 [seconds-per-target] [target...]"; exit 2; }
shift || true

install
# shellcheck source=scripts/env.sh
. scripts/env.sh
export CARGO_TARGET_DIR="${FOVEA_FUZZ_TARGET_DIR:-$FOVEA_CACHE/fuzz-target}"

if ! cargo +nightly fetch --locked --manifest-path fuzz/Cargo.toml >/dev/null 2>&1; then
  cargo +nightly fetch --locked --manifest-path fuzz/Cargo.toml || true
  log "fuzz/Cargo.lock does not fit fuzz/Cargo.toml and the crates it uses; update it with"
  log "  cargo +nightly update --workspace --manifest-path fuzz/Cargo.toml"
  exit 1
fi

if (($#)); then
  targets=("$@")
else
  mapfile -t targets < <(cargo +nightly fuzz list)
fi

start=$(date +%s)
cargo +nightly fuzz build "${BUILD[@]}" # every target, in one build
log "built the fuzz targets in $(($(date +%s) - start)) s"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
status=0
for target in "${targets[@]}"; do
  bin="$CARGO_TARGET_DIR/$TRIPLE/release/$target"
  if [[ ! -x "$bin" || ! -d "fuzz/corpus/$target" ]]; then
    echo "fuzz $target: FAILED (no such target, or no fuzz/corpus/$target)"
    status=1
    continue
  fi
  mkdir -p "$work/$target/corpus" "$work/$target/artifacts"
  cp fuzz/corpus/"$target"/* "$work/$target/corpus/"
  # -timeout: an input that takes 10 s is a hang; -rss_limit_mb: the targets need little.
  if "$bin" "$work/$target/corpus" -max_total_time="$SECONDS_PER_TARGET" -timeout=10 \
    -rss_limit_mb=1024 -print_final_stats=1 -artifact_prefix="$work/$target/artifacts/" \
    >"$work/$target/log" 2>&1; then
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$work/$target/log")
    echo "fuzz $target: ${runs:-?} runs, no crash"
  else
    status=1
    mkdir -p "fuzz/artifacts/$target"
    cp "$work/$target/artifacts/"* "fuzz/artifacts/$target/" 2>/dev/null || true
    tail -n 40 "$work/$target/log" >&2
    found=$(find "$work/$target/artifacts" -type f | head -n 1)
    if [[ -n "$found" ]]; then
      kept="fuzz/artifacts/$target/$(basename "$found")"
      echo "fuzz $target: CRASH, input in $kept"
      if (($(stat -c %s "$found") <= 4096)); then
        echo "fuzz $target: input (base64): $(base64 -w0 "$found")"
      fi
    else
      echo "fuzz $target: CRASH (no input saved; log above)"
    fi
  fi
done
log "fuzzing took $(($(date +%s) - start)) s in all"
exit "$status"
