#!/usr/bin/env bash
# CI step (scripts/test.sh runs it after `cargo test`): the committed repository runs on its own.
#
# 1. `git clone` of HEAD into an empty temporary folder, so nothing sits beside it; in the clone,
#    no tracked file refers to the parent's `shared` folder (where the photos used to come from),
#    and every photo file name that tests/, node/ and scripts/ use exists in models/samples.
# 2. The clone's scripts/demo.sh runs under `timeout -s INT N` (timeout sends SIGINT to the
#    demo's whole process group, as Ctrl-C in a terminal does), with ports and a run folder of
#    its own (scripts/env.sh: FOVEA_MQTT_PORT, FOVEA_EDGE_KAFKA_PORT, FOVEA_RUN_DIR), so it clashes
#    with nothing, not even demo services already running here. Then: at least one OK result
#    for each photo in models/samples (`fovea tail` prints the result's metadata, where
#    `fovea camera --envelope` put the photo's file name), no dead letter, the demo's cleanup ran
#    and the node drained and exited 0, no node is left running, and the services are still
#    running (they run in sessions of their own) as the demo reported. The services are then
#    stopped and the temporary folder removed, whatever happened.
#
# Build time: a build from nothing in a fresh clone costs minutes on CI's 2 cores. The clone's
# demo therefore builds with CARGO_TARGET_DIR set to this checkout's target/ and the dev profile
# (FOVEA_DEMO_PROFILE=dev), because that is what `cargo test` has just built there: every
# dependency is reused and only fovea's own two crates recompile (100-115 s measured, on 2 cores
# shared with other builds). (The tests build no release binary: tests/packaging.rs packages
# the debug one with `scripts/package.sh --profile dev`.)
# The clone's build overwrites the checkout's target/debug/fovea with HEAD's; the next cargo
# command in the checkout rebuilds it if the working tree differs.
#
# Output: one line per check, "standalone check ok: ..." or "standalone check FAILED: ...",
# which test.sh's closing summary counts; exit 1 if any failed.
# Environment: FOVEA_CHECK_DEMO_SECONDS (default 25) is N above, from the demo's start (the build
# is done before, and timed on its own). Warm, the first result comes about 2 s after the start
# and all four photos within 6 s; the rest is room for a loaded machine.
set -euo pipefail

checkout="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
demo_seconds="${FOVEA_CHECK_DEMO_SECONDS:-25}"
started=$SECONDS
passed=0
failed=0
ok() {
  echo "standalone check ok: $*"
  passed=$((passed + 1))
}
fail() {
  echo "standalone check FAILED: $*"
  failed=$((failed + 1))
}

tmp="$(mktemp -d)"
clone="$tmp/fovea"
export FOVEA_RUN_DIR="$tmp/run"

# A loopback port nothing listens on, below Linux's ephemeral range (32768+), so that a
# client's outgoing connection cannot take it before the service binds it. Not one of $used.
used=" "
pick_port() {
  local p
  while :; do
    p=$((20000 + RANDOM % 12000))
    [[ $used == *" $p "* ]] && continue
    (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null && continue
    echo "$p"
    return
  done
}
FOVEA_MQTT_PORT="$(pick_port)"
used+="$FOVEA_MQTT_PORT "
FOVEA_EDGE_KAFKA_PORT="$(pick_port)"
used+="$FOVEA_EDGE_KAFKA_PORT "
FOVEA_CLOUD_KAFKA_PORT="$(pick_port)"
export FOVEA_MQTT_PORT FOVEA_EDGE_KAFKA_PORT FOVEA_CLOUD_KAFKA_PORT

# Processes started from the clone's run folder (the node's config and mosquitto's are there).
leftovers() { pgrep -f -- "$tmp/" || true; }

finish() {
  local rc=$?
  trap - EXIT INT TERM
  if [[ -x $clone/scripts/services.sh ]]; then
    "$clone/scripts/services.sh" stop mqtt edge 2>&1 | sed 's/^/  /' || true
  fi
  local left
  left="$(leftovers)"
  if [[ -n $left ]]; then
    echo "  still running from $tmp, killed:"
    ps -o pid=,args= -p "${left//$'\n'/,}" | sed 's/^/    /' || true
    # shellcheck disable=SC2086 # one pid a word
    kill -KILL $left 2>/dev/null || true
  fi
  rm -rf "$tmp"
  echo "check-standalone: $passed passed, $failed failed, $((SECONDS - started)) s"
  if ((failed)); then exit 1; fi
  exit "$rc"
}
trap finish EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------- 1. the clone on its own
echo "== git clone of HEAD ($(git -C "$checkout" rev-parse --short HEAD)) into $clone"
git clone --quiet "$checkout" "$clone"
git -C "$clone" checkout --quiet --detach "$(git -C "$checkout" rev-parse HEAD)"
if [[ -n $(git -C "$checkout" status --porcelain --untracked-files=no) ]]; then
  echo "(the checkout has uncommitted changes: they are not in the clone and not checked)"
fi

# Written `\.\.` and `image[s]` so that this file does not match itself.
if refs="$(git -C "$clone" grep -nE '\.\./shared|shared/image[s]' -- .)"; then
  fail "files refer to the shared folder outside the repository:"
  printf '  %s\n' "$refs"
else
  ok "no file refers to the shared folder outside the repository"
fi

samples="$clone/models/samples"
photos=()
for f in "$samples"/*; do
  case "${f,,}" in *.png | *.jpg | *.jpeg) photos+=("$(basename "$f")") ;; esac
done
if ((${#photos[@]})); then
  ok "models/samples holds ${#photos[@]} photos: ${photos[*]}"
else
  fail "models/samples holds no .png/.jpg/.jpeg photo"
fi
# Every quoted image file name in the code (arguments of sample_image, include_bytes! paths,
# lists of photos), by its last path component. A line that names an image file that is no
# sample (a file an export writes, say) says so with the words "not a sample photo". The fuzz
# seed generator (node/src/fuzzing/) is left out: the image names there are those of the seed
# files it writes under fuzz/corpus/, which its own test checks.
missing=()
named=0
while read -r name; do
  named=$((named + 1))
  [[ -f $samples/$name ]] || missing+=("$name")
done < <(git -C "$clone" grep -hE '"[A-Za-z0-9_./-]*\.(png|jpe?g|PNG|JPE?G)"' -- tests node scripts proto ':!node/src/fuzzing' \
  | grep -v 'not a sample photo' \
  | grep -oE '"[A-Za-z0-9_./-]*\.(png|jpe?g|PNG|JPE?G)"' \
  | tr -d '"' | xargs -rn1 basename | sort -u)
if ((${#missing[@]})); then
  fail "photos named in tests/, node/, scripts/ but missing from models/samples: ${missing[*]}"
else
  ok "all $named photo names used in tests/, node/, scripts/ exist in models/samples"
fi

# ---------------------------------------------------------------- 2. the demo, from the clone
export CARGO_TARGET_DIR="$checkout/target" FOVEA_DEMO_PROFILE=dev
echo "== building the clone's fovea (dev profile, CARGO_TARGET_DIR=$CARGO_TARGET_DIR)"
t=$SECONDS
if (cd "$clone" && timeout 1200 cargo build --profile dev -p fovea); then
  ok "the clone builds ($((SECONDS - t)) s, reusing the checkout's target/)"
else
  fail "the clone does not build"
  exit 1
fi

echo "== the clone's scripts/demo.sh under timeout -s INT $demo_seconds" \
  "(mqtt $FOVEA_MQTT_PORT, edge $FOVEA_EDGE_KAFKA_PORT, run folder $FOVEA_RUN_DIR)"
out="$tmp/demo.out"
t=$SECONDS
# In the background only to note when the first result appears; timeout still signals the
# demo's own process group, not this script.
timeout -s INT "$demo_seconds" "$clone/scripts/demo.sh" </dev/null >"$out" 2>&1 &
demo_pid=$!
first=""
while kill -0 "$demo_pid" 2>/dev/null; do
  if [[ -z $first ]] && grep -q '^fovea.results ' "$out"; then first=$((SECONDS - t)); fi
  sleep 0.5
done
demo_rc=0
wait "$demo_pid" || demo_rc=$?
echo "demo ran $((SECONDS - t)) s, first result after ${first:-(none)} s; its output:"
awk '/^fovea\.results / && ++n > 4 { if (n == 5) print "  | ... (the other results are counted below, not shown)"; next }
     { print "  | " $0 }' "$out"

if ((demo_rc == 124)); then
  ok "the demo ran until SIGINT (timeout's exit status 124)"
else
  fail "the demo exited with status $demo_rc before the SIGINT at $demo_seconds s"
fi
for photo in "${photos[@]}"; do
  n="$(grep -c "^fovea.results .* OK .* | metadata: file=$photo\$" "$out" || true)"
  if ((n > 0)); then
    ok "$n OK results for $photo"
  else
    fail "no OK result for $photo"
  fi
done
if grep -q '^fovea.deadletter ' "$out"; then
  fail "the demo printed dead letters"
else
  ok "no dead letters"
fi
if grep -q '^== stopping the node' "$out" && grep -q '^== node exited with status 0: stopped after ' "$out"; then
  ok "the demo's cleanup ran; the node drained and exited 0 ($(grep -o 'stopped after [0-9.]* s' "$out" | tail -n 1))"
else
  fail "no clean stop reported by the demo (expected '== node exited with status 0: stopped after ...')"
fi
if [[ -n $(pgrep -f -- "$FOVEA_RUN_DIR/demo/" || true) ]]; then
  fail "a fovea process from the demo is still running"
else
  ok "no fovea process from the demo left running"
fi
# The demo's own report against what is really running now; both must say running.
for svc in mqtt edge; do
  reported="$(sed -n '/^demo services:/,$p' "$out" | awk -v s="$svc" '$1 == s { print $2; exit }')"
  actual="$("$clone/scripts/services.sh" status "$svc" | awk '{ print $2 }' || true)"
  if [[ $reported == running && $actual == running ]]; then
    ok "$svc still running after the demo, as it reported"
  else
    fail "$svc: the demo reported '${reported:-nothing}', services.sh status says '${actual:-nothing}' (expected running)"
  fi
done
