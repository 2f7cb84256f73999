#!/usr/bin/env bash
# Builds fovea's Debian package.
#
#   scripts/package.sh [x86_64|aarch64|armv7] [--profile release|dev] [--no-build] [--out DIR] [--fast]
#
#   x86_64 (default on this machine)  amd64 package, ONNX Runtime from the cache that
#                                     scripts/install-deps.sh fills
#   aarch64                           arm64 package; binary from `scripts/cross.sh build aarch64
#                                     --release`, ONNX Runtime from `scripts/cross.sh ort aarch64`
#   armv7                             armhf package, without ONNX Runtime (none is published for
#                                     armv7; the package description says so)
#   --profile dev                     package the debug build (target/debug/fovea, stripped): for
#                                     the tests, which already built it. x86_64 only.
#   --no-build                        package the binary as it is; do not run cargo build
#   --out DIR                         where the .deb goes (default target/debian/)
#   --fast                            faster, larger compression
#
# Installs cargo-deb (cargo install --locked, into ~/.cargo/bin) when it is missing. Prints the
# path of the .deb on stdout; progress goes to stderr. FOVEA_ORT_X86_64 names another x86_64
# libonnxruntime.so (1.31.x) to package.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FOVEA_CACHE:-$HOME/.cache/fovea}"
ORT_VERSION=1.31.1
CARGO_DEB_VERSION=3.8.0

log() { printf '[package] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
usage() {
  sed -n '2,20p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

if ! command -v cargo >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

# ---------------------------------------------------------------- arguments
arch="$(uname -m)"
profile=release
build=1
out="${CARGO_TARGET_DIR:-$ROOT/target}/debian"
fast=()
while [[ $# -gt 0 ]]; do
  case "$1" in
    x86_64 | amd64) arch=x86_64 ;;
    aarch64 | arm64) arch=aarch64 ;;
    armv7 | armhf) arch=armv7 ;;
    --profile)
      [[ $# -ge 2 ]] || usage
      profile="$2"
      shift
      ;;
    --profile=*) profile="${1#--profile=}" ;;
    --no-build) build=0 ;;
    --out)
      [[ $# -ge 2 ]] || usage
      out="$2"
      shift
      ;;
    --out=*) out="${1#--out=}" ;;
    --fast) fast=(--fast) ;;
    -h | --help) usage ;;
    *) die "unknown argument '$1'" ;;
  esac
  shift
done
[[ $profile == release || $profile == dev ]] || die "--profile is release or dev, not '$profile'"

case "$arch" in
  x86_64)
    triple=""
    variant=()
    ;;
  aarch64)
    triple=aarch64-unknown-linux-gnu
    variant=(--variant arm64)
    ;;
  armv7)
    triple=armv7-unknown-linux-gnueabihf
    variant=(--variant armhf)
    ;;
  *) die "unsupported architecture '$arch' (x86_64, aarch64 or armv7)" ;;
esac
[[ -z $triple || $profile == release ]] || die "cross packages are release builds (--profile release)"
[[ -z $triple || $(uname -m) == x86_64 ]] || die "cross packages are built on x86_64"
if [[ -z $triple && $(uname -m) != x86_64 ]]; then
  die "native packages other than x86_64 are not set up (ONNX Runtime staging)"
fi

cd "$ROOT"
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"
profile_dir=release
[[ $profile == dev ]] && profile_dir=debug
if [[ -n $triple ]]; then
  bin="$target_dir/$triple/$profile_dir/fovea"
else
  bin="$target_dir/$profile_dir/fovea"
fi

# ---------------------------------------------------------------- tools
command -v dpkg-shlibdeps >/dev/null 2>&1 || die "dpkg-shlibdeps missing: apt-get install dpkg-dev (scripts/install-deps.sh does)"
if ! cargo deb --version 2>/dev/null | grep -qF "$CARGO_DEB_VERSION"; then
  log "cargo install cargo-deb $CARGO_DEB_VERSION (about 2 minutes, once)"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi

# ---------------------------------------------------------------- binary
if [[ $build -eq 1 ]]; then
  if [[ -n $triple ]]; then
    [[ -f scripts/cross.sh ]] || die "scripts/cross.sh is missing (needed for $arch)"
    bash scripts/cross.sh build "$arch" --release >/dev/null
  else
    log "cargo build -p fovea --locked --profile $profile"
    cargo build -p fovea --locked --profile "$profile" >&2
  fi
fi
[[ -x $bin ]] || die "no binary at $bin (build it, or drop --no-build)"

# The cross variants name libc6 (>= X) by hand: the binary must not need a newer glibc.
if [[ -n $triple ]]; then
  need="$(readelf -VW "$bin" | grep -oE 'GLIBC_[0-9]+\.[0-9]+(\.[0-9]+)?' | sed 's/GLIBC_//' | sort -uV | tail -n 1)"
  declared="$(sed -n "/^\[package.metadata.deb.variants.${variant[1]}\]/,/^\[/p" node/Cargo.toml |
    grep -oE 'libc6 \(>= [0-9.]+\)' | grep -oE '[0-9][0-9.]*' | head -n 1)"
  [[ -n $need && -n $declared ]] || die "could not compare glibc versions (binary: '$need', Cargo.toml: '$declared')"
  if [[ $(printf '%s\n%s\n' "$need" "$declared" | sort -V | tail -n 1) != "$declared" ]]; then
    die "$bin needs glibc $need but the ${variant[1]} variant declares libc6 (>= $declared)"
  fi
fi

# ---------------------------------------------------------------- ONNX Runtime
# Staged where node/Cargo.toml's assets expect it; the lock keeps two runs (two architectures)
# from packaging each other's library.
stage="$ROOT/target/deb-staging"
mkdir -p "$stage" "$CACHE"
exec 9>"$stage/.lock"
flock 9
rm -rf "$stage/onnxruntime"
mkdir -p "$stage/onnxruntime"
case "$arch" in
  x86_64)
    ort="${FOVEA_ORT_X86_64:-$CACHE/onnxruntime/$ORT_VERSION/libonnxruntime.so.$ORT_VERSION}"
    [[ -s $ort ]] || die "ONNX Runtime not found at $ort: run scripts/install-deps.sh"
    ;;
  aarch64)
    ort="$(bash scripts/cross.sh ort aarch64 | tail -n 1)"
    [[ -s $ort ]] || die "scripts/cross.sh ort aarch64 gave no library ('$ort')"
    ;;
  armv7) ort="" ;;
esac
if [[ -n $ort ]]; then
  cp "$ort" "$stage/onnxruntime/libonnxruntime.so"
  # Its licence and notices come from the wheel it was taken from (the same in every wheel of
  # a version), installed beside the README.
  shopt -s nullglob
  wheels=("$CACHE"/ort/onnxruntime-"$ORT_VERSION"-*.whl "$CACHE"/onnxruntime/*/onnxruntime-"$ORT_VERSION"-*.whl)
  shopt -u nullglob
  [[ ${#wheels[@]} -gt 0 ]] || die "no onnxruntime $ORT_VERSION wheel under $CACHE for its licence"
  python3 - "${wheels[0]}" "$stage/onnxruntime" <<'PY'
import os, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
with zipfile.ZipFile(wheel) as z:
    for name in ("LICENSE", "ThirdPartyNotices.txt"):
        member = "onnxruntime/" + name
        with z.open(member) as src, open(os.path.join(dest, name), "wb") as out:
            out.write(src.read())
PY
fi

# ---------------------------------------------------------------- package
mkdir -p "$out"
args=(deb -p fovea --no-build --profile "$profile" --output "$out" "${variant[@]}" "${fast[@]}")
[[ -n $triple ]] && args+=(--target "$triple")
# The dev profile keeps full debug info (180 MB); the package gets the stripped binary.
[[ $profile == dev ]] && args+=(--strip)
log "cargo ${args[*]}"
errs="$(mktemp)"
trap 'rm -f "$errs"' EXIT
status=0
deb="$(cargo "${args[@]}" 2>"$errs" | tail -n 1)" || status=$?
# cargo-deb warns about every asset under a target/ folder that it does not build itself; the
# staged ONNX Runtime files are meant that way. Everything else it says is shown.
grep -v -e "deb-staging/onnxruntime/.* does not match the pattern" -e "dev profile is not supported" \
  -e "To enable debug symbols set" "$errs" >&2 || true
[[ $status -eq 0 ]] || die "cargo deb failed"
[[ -f $deb ]] || die "cargo deb did not report a package (got '$deb')"
log "$(stat -c %s "$deb") bytes"
printf '%s\n' "$deb"
