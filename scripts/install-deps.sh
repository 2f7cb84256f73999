#!/usr/bin/env bash
# Install what fovea's build, demo and tests need, on a brand-new Debian 12 machine or an
# already prepared one. Idempotent: a warm run only checks (< 5 s).
#
# Usage: scripts/install-deps.sh [demo|test]     (default: test, which includes demo)
#   demo  what the demo needs: mosquitto, the build's C libraries, nisshi (the local Kafka
#         broker, built once: ~15 min on 2 cores) and ONNX Runtime (a PyPI wheel, ~1 min)
#   test  the demo's group, plus rustfmt/clippy, the packaging tools the tests use
#         (systemd-analyze, dpkg-dev, debootstrap, cargo-deb: ~3 min once) and cargo-fuzz
#         with the nightly toolchain (scripts/fuzz.sh: ~1 min once)
# Slow things are cached under ${FOVEA_CACHE:-$HOME/.cache/fovea}; see scripts/env.sh for the
# resulting paths.
set -euo pipefail

GROUP="${1:-test}"
case "$GROUP" in
  demo | test) ;;
  *) printf 'usage: %s [demo|test]\n' "$0" >&2; exit 2 ;;
esac

CACHE="${FOVEA_CACHE:-$HOME/.cache/fovea}"
NISSHI_VERSION=0.8.1
ORT_VERSION=1.31.1
NISSHI_ROOT="$CACHE/nisshi"
NISSHI_BIN="$NISSHI_ROOT/bin/nisshi"
ORT_SO="$CACHE/onnxruntime/$ORT_VERSION/libonnxruntime.so.$ORT_VERSION"
DEB_PACKAGES=(mosquitto mosquitto-clients libssl-dev pkg-config curl)
# Matches a `cargo [+toolchain] install ... nisshi` process (argv0 must be cargo,
# so a shell whose command line merely mentions it does not count).
NISSHI_BUILD_PATTERN='^([^ ]*/)?cargo( [^ ]+)* install( [^ ]+)* nisshi( |$)'

log() { printf '[install-deps] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# A fresh login may not have rustup's bin dir on PATH yet.
if ! command -v rustup >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

SUDO=()
if [[ $EUID -ne 0 ]]; then SUDO=(sudo); fi

mkdir -p "$CACHE"
# Two concurrent runs must not both start a 15-minute build.
exec 9>"$CACHE/.install-deps.lock"
if ! flock -n 9; then
  log "another install-deps.sh run holds $CACHE/.install-deps.lock; waiting for it to finish"
  flock 9
fi

# ---------------------------------------------------------------- plan
# Say what is missing and roughly how long it takes before starting, so that a first run's
# quarter of an hour is expected, not a surprise.
nisshi_ok() {
  [[ -x "$NISSHI_BIN" ]] && { "$NISSHI_BIN" --version >/dev/null 2>&1 || "$NISSHI_BIN" --help >/dev/null 2>&1; }
}
plan=()
command -v mosquitto >/dev/null 2>&1 || [[ -x /usr/sbin/mosquitto ]] || plan+=("Debian packages: mosquitto, libssl-dev, pkg-config (about 1 minute)")
nisshi_ok || plan+=("nisshi $NISSHI_VERSION, the local Kafka-protocol broker, built with cargo install (about 15 minutes on 2 cores, once; cached in $NISSHI_ROOT)")
[[ -s "$ORT_SO" ]] || plan+=("ONNX Runtime $ORT_VERSION from its PyPI wheel (about 1 minute, once)")
if [[ $GROUP == test ]]; then
  command -v debootstrap >/dev/null 2>&1 || plan+=("packaging tools for the tests: systemd, dpkg-dev, debootstrap (about 1 minute)")
  cargo deb --version >/dev/null 2>&1 || plan+=("cargo-deb, built with cargo install (about 2 minutes, once)")
  cargo fuzz --version >/dev/null 2>&1 || plan+=("cargo-fuzz (and the nightly toolchain) for scripts/fuzz.sh, built with cargo install (about 1 minute, once)")
fi
if ((${#plan[@]})); then
  log "first run on this machine: installing (group '$GROUP')"
  for p in "${plan[@]}"; do log "  - $p"; done
fi

# ---------------------------------------------------------------- Debian
# shellcheck source=scripts/apt.sh
. "$(dirname "${BASH_SOURCE[0]}")/apt.sh"

mosquitto_was_installed=0
deb_installed mosquitto && mosquitto_was_installed=1
install_debs "${DEB_PACKAGES[@]}"

# The demo runs its own mosquitto on a loopback port; a system service on 1883
# would be an open broker nobody asked for.
if [[ $mosquitto_was_installed -eq 0 ]]; then
  if [[ -d /run/systemd/system ]] && command -v systemctl >/dev/null 2>&1; then
    "${SUDO[@]}" systemctl disable --now mosquitto.service >/dev/null 2>&1 || true
  elif [[ -f /run/mosquitto/mosquitto.pid ]] && kill -0 "$(cat /run/mosquitto/mosquitto.pid)" 2>/dev/null; then
    "${SUDO[@]}" service mosquitto stop >/dev/null 2>&1 || "${SUDO[@]}" kill "$(cat /run/mosquitto/mosquitto.pid)" || true
  fi
fi

# ---------------------------------------------------------------- nisshi
if ! nisshi_ok; then
  # Someone (another run, or a hand-started build) may already be building it.
  if pgrep -f "$NISSHI_BUILD_PATTERN" >/dev/null; then
    log "a 'cargo install nisshi' is already running; waiting for it (log: $CACHE/nisshi-build.log)"
    while pgrep -f "$NISSHI_BUILD_PATTERN" >/dev/null; do sleep 10; done
  fi
fi

if ! nisshi_ok; then
  if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    # nisshi 0.8.1 needs rustc >= 1.96, newer than stable here.
    log "installing the nightly toolchain"
    rustup toolchain install nightly --profile minimal
  fi
  build_log="$CACHE/nisshi-build.log"
  log "building nisshi $NISSHI_VERSION (about 15 minutes on 2 cores; log: $build_log)"
  # A target dir in the cache lets an interrupted build resume; removed after success (~1.8 GB).
  if ! cargo +nightly install nisshi --version "$NISSHI_VERSION" --locked --features libsql \
    --root "$NISSHI_ROOT" --target-dir "$CACHE/nisshi-target" >"$build_log" 2>&1; then
    tail -n 40 "$build_log" >&2
    die "nisshi build failed (full log: $build_log)"
  fi
  rm -rf "$CACHE/nisshi-target"
  nisshi_ok || die "nisshi built but $NISSHI_BIN does not run"
fi

# ---------------------------------------------------------------- ONNX Runtime
if [[ ! -s "$ORT_SO" ]]; then
  if ! command -v python3 >/dev/null 2>&1 || ! python3 -m pip --version >/dev/null 2>&1; then
    install_debs python3 python3-pip
  fi
  bash "$(dirname "${BASH_SOURCE[0]}")/fetch-ort.sh" "$(uname -m)" "$CACHE/ort" "$ORT_SO"
fi

# ---------------------------------------------------------------- test group
if [[ $GROUP == test ]]; then
  rustup component add rustfmt clippy >/dev/null 2>&1 \
    || rustup component add rustfmt clippy # again, loudly, to show the error

  # Packaging tools:
  # For scripts/package.sh and tests/packaging.rs: systemd-analyze (verify, security), dpkg-deb
  # and dpkg-shlibdeps (dpkg-dev), debootstrap (the clean Debian the .deb is installed into; the
  # tests cache its root under $CACHE/debootstrap), and cargo-deb, built once (~2 minutes) into
  # ~/.cargo/bin. A warm run only checks.
  CARGO_DEB_VERSION=3.8.0
  install_debs systemd dpkg-dev debootstrap
  if ! cargo deb --version 2>/dev/null | grep -qxF "cargo-deb $CARGO_DEB_VERSION"; then
    log "cargo install cargo-deb $CARGO_DEB_VERSION (about 2 minutes, once)"
    cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
  fi

  # The fuzz targets' tools: the nightly toolchain and cargo-fuzz (scripts/fuzz.sh keeps the
  # version and installs them the same way when run on its own).
  bash "$(dirname "${BASH_SOURCE[0]}")/fuzz.sh" --install
fi
# ---------------------------------------------------------------- end of test group

# ---------------------------------------------------------------- done
mosquitto_bin="$(command -v mosquitto || echo /usr/sbin/mosquitto)"
[[ -x "$mosquitto_bin" ]] || die "mosquitto not found at $mosquitto_bin"
printf 'FOVEA_NISSHI_BIN=%s\nORT_DYLIB_PATH=%s\nFOVEA_MOSQUITTO_BIN=%s\n' \
  "$NISSHI_BIN" "$ORT_SO" "$mosquitto_bin"
