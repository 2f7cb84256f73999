#!/usr/bin/env bash
# Fetches ONNX Runtime's shared library from its PyPI wheel, for install-deps.sh (the host's
# architecture) and cross.sh (aarch64).
#   scripts/fetch-ort.sh ARCH WHEEL_DIR DEST_SO
# ARCH is the manylinux platform suffix (x86_64, aarch64); the wheel is downloaded into WHEEL_DIR
# unless one is there already, and onnxruntime/capi/<basename of DEST_SO> is extracted to DEST_SO.
# The version is the one in DEST_SO's name (libonnxruntime.so.1.31.1). Needs python3 with pip.
set -euo pipefail

[[ $# -eq 3 ]] || { sed -n '2,7p' "${BASH_SOURCE[0]}" >&2; exit 2; }
arch="$1" wheel_dir="$2" dest="$3"
version="${dest##*/libonnxruntime.so.}"
[[ $version != "$dest" ]] || { echo "[fetch-ort] $dest is not libonnxruntime.so.VERSION" >&2; exit 2; }

mkdir -p "$wheel_dir" "$(dirname "$dest")"
shopt -s nullglob
wheels=("$wheel_dir"/onnxruntime-"$version"-*manylinux*"$arch".whl)
if [[ ${#wheels[@]} -eq 0 ]]; then
  echo "[fetch-ort] downloading the onnxruntime $version wheel for $arch" >&2
  tmp="$(mktemp -d)"
  # Fixed interpreter tag and platform: any local python's pip then fetches the same wheel
  # (only cp311 manylinux_2_28 is needed; we use the .so, not the Python module).
  python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
    --python-version 3.11 --platform "manylinux_2_28_$arch" "onnxruntime==$version" -d "$tmp"
  mv "$tmp"/onnxruntime-*.whl "$wheel_dir/"
  rm -rf "$tmp"
  wheels=("$wheel_dir"/onnxruntime-"$version"-*manylinux*"$arch".whl)
fi
shopt -u nullglob
[[ ${#wheels[@]} -gt 0 ]] || { echo "[fetch-ort] no onnxruntime $version wheel for $arch in $wheel_dir" >&2; exit 1; }

# Extract next to the target, then rename: a half-written .so never looks installed.
python3 - "${wheels[0]}" "$dest" <<'PY'
import os, shutil, sys, zipfile
wheel, dest = sys.argv[1], sys.argv[2]
member = "onnxruntime/capi/" + os.path.basename(dest)
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(dest + ".tmp", "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(dest + ".tmp", 0o755)
os.replace(dest + ".tmp", dest)
PY
