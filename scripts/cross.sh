#!/usr/bin/env bash
# Cross builds of fovea for ARM devices, with Debian's cross toolchains and qemu-user.
#
#   scripts/cross.sh build aarch64|armv7 [--release]   build the fovea binary; prints its path
#   scripts/cross.sh test  aarch64|armv7 [FILTER...]   build the unit tests of both crates (debug)
#                                                      and run them under qemu-user
#   scripts/cross.sh ort   aarch64                     fetch ONNX Runtime for aarch64 (cached);
#                                                      prints the path of libonnxruntime.so
#   scripts/cross.sh env   aarch64|armv7               print the exports it uses, for running
#                                                      cargo by hand: eval "$(scripts/cross.sh env aarch64)"
#
# Idempotent: installs what is missing (Debian cross compilers and libc, qemu-user, the rustup
# target), then builds. Linkers and qemu runners are in .cargo/config.toml; OpenSSL is built from
# source for the target (feature fovea/vendored-openssl). Uses CARGO_TARGET_DIR when set, else
# the workspace's target/. Details, device requirements and measurements: cross/README.md.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
CACHE="${FOVEA_CACHE:-$HOME/.cache/fovea}"
ORT_VERSION=1.31.1
# The cross builds need OpenSSL for the target; building it from source avoids Debian multiarch
# (libssl-dev:arm64 must match the host's libssl-dev version exactly, which the archive does not
# always offer). See cross/README.md.
FEATURES=(--features fovea/vendored-openssl)

log() { printf '[cross] %s\n' "$*" >&2; }
die() {
  log "ERROR: $*"
  exit 1
}
usage() {
  sed -n '2,10p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//' >&2
  exit 2
}

# A fresh login may not have rustup's bin dir on PATH yet.
if ! command -v rustup >/dev/null 2>&1 && [[ -f "$HOME/.cargo/env" ]]; then
  # shellcheck source=/dev/null
  . "$HOME/.cargo/env"
fi

SUDO=()
if [[ $EUID -ne 0 ]]; then SUDO=(sudo); fi

# ---------------------------------------------------------------- arguments
[[ $# -ge 2 ]] || usage
cmd="$1"
arch="$2"
shift 2

case "$arch" in
  aarch64 | arm64)
    arch=aarch64
    TRIPLE=aarch64-unknown-linux-gnu
    GNU=aarch64-linux-gnu # Debian's tool prefix and its sysroot under /usr
    DEB_ARCH=arm64
    QEMU=qemu-aarch64
    QEMU_CPU=cortex-a72 # as in .cargo/config.toml: a Raspberry Pi 4's core
    ;;
  armv7 | armhf)
    arch=armv7
    TRIPLE=armv7-unknown-linux-gnueabihf
    GNU=arm-linux-gnueabihf
    DEB_ARCH=armhf
    QEMU=qemu-arm
    QEMU_CPU=cortex-a7
    ;;
  *) die "unknown arch '$arch' (aarch64 or armv7)" ;;
esac
TRIPLE_ENV="${TRIPLE//-/_}" # aarch64_unknown_linux_gnu, as the cc crate spells it in variables

# ---------------------------------------------------------------- Debian
# shellcheck source=scripts/apt.sh
. "$ROOT/scripts/apt.sh"

# Two concurrent runs must not both run apt-get (dpkg's lock would fail the second) nor fill
# the same cache folder; held while installing and fetching, released before cargo runs.
lock() {
  mkdir -p "$CACHE"
  exec 8>"$CACHE/.cross.lock"
  flock 8
}
unlock() { exec 8>&-; }

# Toolchain for building: C/C++ cross compilers (librdkafka, OpenSSL, zstd), the target's libc,
# perl and make for OpenSSL's and librdkafka's own build systems.
toolchain() {
  local debs=("gcc-$GNU" "g++-$GNU" "libc6-dev-$DEB_ARCH-cross" make perl)
  if [[ ${1:-} == qemu ]]; then debs+=(qemu-user); fi
  install_debs "${debs[@]}"
  if ! rustup target list --installed | grep -qx "$TRIPLE"; then
    log "rustup target add $TRIPLE"
    rustup target add "$TRIPLE" >/dev/null 2>&1 || rustup target add "$TRIPLE"
  fi
}

# librdkafka's bundled ./configure reads plain CC/CXX/AR, so they name the cross tools; the
# host-specific variables keep build scripts and anything compiled for the host on the host
# compiler (the cc crate prefers CC_<triple> over CC).
cross_env() {
  local host
  host="$(rustc -vV | sed -n 's/^host: //p')" # x86_64-unknown-linux-gnu here
  HOST_ENV="${host//-/_}"
  export CC="$GNU-gcc" CXX="$GNU-g++" AR="$GNU-ar"
  export "CC_$TRIPLE_ENV=$GNU-gcc" "CXX_$TRIPLE_ENV=$GNU-g++" "AR_$TRIPLE_ENV=$GNU-ar"
  export "CC_$HOST_ENV=gcc" "CXX_$HOST_ENV=g++" "AR_$HOST_ENV=ar"
}

# ---------------------------------------------------------------- qemu for the tests
# Debian 12's qemu-user 7.2 crashes while ONNX Runtime's aarch64 library loads (it reads the
# host's x86 CPU and cache description; qemu >= 8 shows the guest an emulated /proc/cpuinfo).
# When the system's qemu is older than 8, the runner is the static qemu-user of the release's
# backports (10.0 for bookworm), fetched with `apt-get download` under a private apt state (the
# system's sources and packages stay as they are) and cached. Prints the directory holding
# qemu-aarch64 and qemu-arm; fails if they cannot be had.
qemu_major() { "$1" --version 2>/dev/null | awk '/version/ { split($3, v, "."); print v[1]; exit }'; }

qemu_dir() {
  # FOVEA_QEMU_DIR: a folder with your own qemu-aarch64/qemu-arm (>= 8) to use instead.
  if [[ -n ${FOVEA_QEMU_DIR:-} ]]; then
    if [[ $(qemu_major "$FOVEA_QEMU_DIR/$QEMU") -ge 8 ]]; then
      printf '%s\n' "$FOVEA_QEMU_DIR"
      return 0
    fi
    log "FOVEA_QEMU_DIR: $FOVEA_QEMU_DIR/$QEMU is missing or older than qemu 8"
    return 1
  fi
  local sys
  sys="$(command -v "$QEMU" || true)"
  if [[ -n $sys && $(qemu_major "$sys") -ge 8 ]]; then
    dirname "$sys"
    return 0
  fi
  local base="$CACHE/qemu-user"
  if [[ -x $base/current/qemu-aarch64 && -x $base/current/qemu-arm ]]; then
    printf '%s\n' "$base/current"
    return 0
  fi
  local codename uri host_arch
  # shellcheck source=/dev/null
  codename="$(. /etc/os-release && printf '%s' "${VERSION_CODENAME:-}")"
  # The archive the system already uses for its own release.
  # shellcheck disable=SC2016 # apt's own $(FIELD) placeholders, not shell
  uri="$(apt-get indextargets --format '$(REPO_URI) $(CODENAME)' 2>/dev/null |
    awk -v c="$codename" '$2 == c { print $1; exit }')"
  [[ -n $codename && -n $uri ]] || return 1
  host_arch="$(dpkg --print-architecture)"
  local apt_dir="$base/apt"
  mkdir -p "$apt_dir/lists/partial" "$apt_dir/cache/archives/partial"
  printf 'deb [arch=%s signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] %s %s-backports main\n' \
    "$host_arch" "$uri" "$codename" >"$apt_dir/sources.list"
  local apt_opts=(-o "Dir::Etc::SourceList=$apt_dir/sources.list" -o Dir::Etc::SourceParts=/nonexistent
    -o "Dir::State::Lists=$apt_dir/lists" -o "Dir::Cache=$apt_dir/cache" -o APT::Sandbox::User=root)
  log "fetching qemu-user from $codename-backports (static binaries, a 60 MB package, once)"
  apt-get "${apt_opts[@]}" update -qq || return 1
  local version
  version="$(apt-cache "${apt_opts[@]}" show qemu-user 2>/dev/null |
    awk '/^Version:/ { print $2; exit }')"
  [[ -n $version ]] || return 1
  local tmp
  tmp="$(mktemp -d)"
  if ! (cd "$tmp" && apt-get "${apt_opts[@]}" download -qq "qemu-user=$version" 2>/dev/null) ||
    ! dpkg-deb --fsys-tarfile "$tmp"/qemu-user_*.deb |
    tar -x -C "$tmp" ./usr/bin/qemu-aarch64 ./usr/bin/qemu-arm; then
    rm -rf "$tmp"
    return 1
  fi
  local dir="$base/${version//[:~+]/_}"
  mkdir -p "$dir"
  mv "$tmp/usr/bin/qemu-aarch64" "$tmp/usr/bin/qemu-arm" "$dir/"
  rm -rf "$tmp" "$apt_dir/cache"
  [[ $(qemu_major "$dir/qemu-aarch64") -ge 8 ]] || return 1
  ln -sfn "$(basename "$dir")" "$base/current"
  log "$("$dir/qemu-aarch64" --version | head -n 1)"
  printf '%s\n' "$base/current"
}

# ---------------------------------------------------------------- ONNX Runtime
# aarch64: the manylinux_2_28 wheel from the Python package index holds the library (it needs
# glibc >= 2.28 and libstdc++). There is no armv7 wheel: see cross/README.md.
ort_lib() {
  [[ $arch == aarch64 ]] || die "no ONNX Runtime build is published for $arch; build it from \
source for the device (cross/README.md, \"ONNX Runtime\") and set inference.onnxruntime_library"
  local dir="$CACHE/onnxruntime/$ORT_VERSION-aarch64"
  local so="$dir/libonnxruntime.so.$ORT_VERSION"
  if [[ ! -s $so ]]; then
    if ! python3 -m pip --version >/dev/null 2>&1; then install_debs python3 python3-pip; fi
    bash "$ROOT/scripts/fetch-ort.sh" aarch64 "$dir" "$so"
  fi
  printf '%s\n' "$so"
}

# ---------------------------------------------------------------- commands
cd "$ROOT"
target_dir="${CARGO_TARGET_DIR:-$ROOT/target}"

case "$cmd" in
  build)
    profile=debug
    args=()
    for a in "$@"; do
      case "$a" in
        --release) profile=release args+=(--release) ;;
        *) die "build: unknown option '$a'" ;;
      esac
    done
    lock
    toolchain
    unlock
    cross_env
    log "cargo build -p fovea --target $TRIPLE ${args[*]}"
    cargo build -p fovea --locked --target "$TRIPLE" "${FEATURES[@]}" "${args[@]}" >&2
    bin="$target_dir/$TRIPLE/$profile/fovea"
    log "$(stat -c %s "$bin") bytes: $bin"
    printf '%s\n' "$bin"
    ;;

  test)
    lock
    toolchain qemu
    cross_env
    # Unit tests only (--lib): those that need an MQTT or Kafka broker are integration tests in
    # tests/ and drive the native binary. Skipped here, and why: cross/README.md.
    skips=()
    models=1 # whether the model tests (inference::tests, the real ONNX Runtime) can run
    runner_env="CARGO_TARGET_${TRIPLE_ENV^^}_RUNNER"
    if qdir="$(qemu_dir)"; then
      export "$runner_env=$qdir/$QEMU -cpu $QEMU_CPU -L /usr/$GNU"
    else
      log "WARNING: no qemu-user >= 8 could be had; using $("$QEMU" --version | head -n 1)," \
        "which crashes loading ONNX Runtime: the model tests are skipped"
      models=0
    fi
    # No ONNX Runtime is published for armv7.
    [[ $arch == aarch64 ]] || models=0
    if [[ $models -eq 1 ]]; then
      ORT_DYLIB_PATH="$(ort_lib)"
      export ORT_DYLIB_PATH
    else
      skips+=(--skip inference::tests::)
    fi
    unlock
    # Each test binary spawns itself for the crash test; qemu-user cannot exec an ARM binary
    # without binfmt_misc, which containers and CI machines rarely have.
    skips+=(--skip spool::tests::crash_after_flush_loses_nothing)
    # Debug profile as the workspace sets it, but line tables instead of full debug info: less to
    # compile, link and store (about 20 % less CPU cold), and backtraces keep their lines.
    export CARGO_PROFILE_DEV_DEBUG="${CARGO_PROFILE_DEV_DEBUG:-line-tables-only}"
    log "cargo test --target $TRIPLE --workspace --lib, runner ${!runner_env:-$QEMU (.cargo/config.toml)} ${skips[*]} $*"
    cargo test --locked --target "$TRIPLE" --workspace --lib "${FEATURES[@]}" -- "${skips[@]}" "$@"
    ;;

  ort)
    [[ $# -eq 0 ]] || die "ort: no options expected"
    lock
    ort_lib
    ;;

  env)
    [[ $# -eq 0 ]] || die "env: no options expected"
    cross_env
    for v in CC CXX AR "CC_$TRIPLE_ENV" "CXX_$TRIPLE_ENV" "AR_$TRIPLE_ENV" \
      "CC_$HOST_ENV" "CXX_$HOST_ENV" "AR_$HOST_ENV"; do
      printf 'export %s=%q\n' "$v" "${!v}"
    done
    printf '# then: cargo build -p fovea --target %s %s\n' "$TRIPLE" "${FEATURES[*]}"
    ;;

  *) usage ;;
esac
