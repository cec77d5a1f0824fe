#!/usr/bin/env bash
# `make arm64-check`: install edge-agent into an arm64 Debian 12 root (Raspberry Pi OS's userland) run
# under qemu-user, with every dependency as an aarch64 wheel from PyPI, then run the agent there on a real
# photo (tflite and onnx) against a broker on this machine and check the face it publishes.
#
#   sudo bash scripts/arm64_check.sh          # the check (reuses a finished root in .arm64-root/)
#   sudo bash scripts/arm64_check.sh clean    # unmount and remove .arm64-root/ (`make arm64-clean`)
#
# Needs root (debootstrap, chroot, mount), Debian's mirror, PyPI, and the dev venv (`make test` makes it:
# it draws the photo with scikit-image). Environment: ARM64_MIRROR (default: this host's Debian mirror),
# ARM64_CPU (the CPU qemu emulates, default cortex-a72 as in a Pi 4), ARM64_TIMEOUT (seconds to wait for
# the agent's predictions, default 300). See docs/platform.md.
set -Eeuo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
BASE="$REPO/.arm64-root"        # everything this check keeps: the root, debootstrap's debs, the logs
ROOT="$BASE/rootfs"             # the arm64 Debian root
STAMP="$BASE/rootfs.done"       # written once debootstrap finished: a root without it is made again
LOGS="$BASE/logs"
SUITE=bookworm
VENV="${VENV:-.venv}"
export QEMU_CPU="${ARM64_CPU:-cortex-a72}"   # read by every qemu-aarch64 that binfmt starts
TIMEOUT="${ARM64_TIMEOUT:-300}"
DEVICE=arm64-check
CHECK=/srv/edge-agent-check     # inside the root: configs, the photo, agent logs, state
BINFMT=/proc/sys/fs/binfmt_misc
QEMU=/usr/bin/qemu-aarch64-static
# qemu-aarch64's ELF magic and mask, as qemu-user-static's binfmt entry has them
MAGIC='\x7f\x45\x4c\x46\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
MASK='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'

say() { printf 'arm64 check: %s\n' "$*"; }
die() { printf 'arm64 check: FAILED: %s\n' "$*" >&2; exit 1; }
STEP="" STEP_T=$SECONDS
step() { end_step; STEP=$1; STEP_T=$SECONDS; say "$1: $2"; }  # step NAME WHAT
end_step() { if [ -n "$STEP" ]; then say "  $STEP done in $((SECONDS - STEP_T)) s"; fi; STEP=""; }
# An unexpected failure still ends on one line that says where.
# shellcheck disable=SC2154  # rc is set inside the trap
trap 'rc=$?; [ "$BASHPID" = "$$" ] && die "${STEP:-setup}: \"$BASH_COMMAND\" exited with $rc (line $LINENO)"' ERR

logged() {  # logged NAME CMD...: the command's output to $LOGS/NAME.log; its tail and the path on failure
  local log="$LOGS/$1.log"; shift
  if ! "$@" >"$log" 2>&1; then
    tail -n 25 "$log" >&2
    die "${STEP:-$1} failed; the whole output is in $log"
  fi
}

# ---------------------------------------------------------------- mounts: /proc and /dev/shm, never /sys
# An x86 CPU topology under /sys makes XNNPACK's cpuinfo crash in an aarch64 process: the root has no /sys.
MOUNTED=()
mounted_under() { findmnt -rn -o TARGET | awk -v r="$1" 'index($0, r "/") == 1 || $0 == r' | sort -r; }
unmount_all() {  # everything mounted under the root, deepest first
  local m
  [ -d "$ROOT" ] || return 0
  while read -r m; do
    [ -n "$m" ] && { umount "$m" 2>/dev/null || umount -l "$m"; }
  done < <(mounted_under "$ROOT")
}
mount_in() {  # mount_in DIR MOUNT-ARGS...
  local dir="$ROOT/$1"; shift
  mkdir -p "$dir"
  mountpoint -q "$dir" || mount "$@" "$dir"
  MOUNTED+=("$dir")
}

PIDS=()
cleanup() {
  local pid i
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
  for ((i = ${#MOUNTED[@]} - 1; i >= 0; i--)); do
    umount "${MOUNTED[i]}" 2>/dev/null || umount -l "${MOUNTED[i]}" 2>/dev/null || true
  done
  [ -n "${WORK:-}" ] && rm -rf "$WORK"
  return 0
}
trap cleanup EXIT

[ "$(id -u)" = 0 ] || die "needs root (debootstrap, chroot, mount): run it as root or with sudo"

if [ "${1:-}" = clean ]; then
  unmount_all
  [ -z "$(mounted_under "$ROOT")" ] || die "still mounted under $ROOT: $(mounted_under "$ROOT" | tr '\n' ' ')"
  rm -rf --one-file-system "$BASE"
  say "removed $BASE"
  exit 0
fi
[ $# -eq 0 ] || die "unknown argument: $1 (usage: $0 [clean])"

host_mirror() {  # the host's Debian mirror: sources.list, else a deb822 stanza for a bookworm suite
  local m="" f
  if [ -f /etc/apt/sources.list ]; then
    m=$(awk '$1 == "deb" && / bookworm( |$)/ { for (i = 2; i <= NF; i++) if ($i ~ /^(https?|ftp):\/\//) { print $i; exit } }' \
        /etc/apt/sources.list)
  fi
  for f in /etc/apt/sources.list.d/*.sources; do
    if [ -n "$m" ] || [ ! -f "$f" ]; then continue; fi
    m=$(awk -v RS= '/Suites:[^\n]*[ \t]bookworm([ \t\n]|$)/ && match($0, /URIs:[ \t]*[^ \t\n]+/) {
                      s = substr($0, RSTART, RLENGTH); sub(/URIs:[ \t]*/, "", s); print s; exit }' "$f")
  done
  echo "${m:-http://deb.debian.org/debian}"
}

# An aarch64 command in the root, with a clean environment (the host's PIP_* and OPENBLAS_* are not for it).
IN_ROOT=(chroot "$ROOT" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb QEMU_CPU="$QEMU_CPU" PYTHONUNBUFFERED=1
         PATH=/opt/edge-agent/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin
         PIP_CACHE_DIR=/var/cache/edge-agent-check/pip PIP_CERT=/etc/ssl/certs/ca-certificates.crt
         PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_PROGRESS_BAR=off)
for v in http_proxy https_proxy no_proxy HTTP_PROXY HTTPS_PROXY NO_PROXY PIP_INDEX_URL PIP_DEFAULT_TIMEOUT; do
  if [ -n "${!v:-}" ]; then IN_ROOT+=("$v=${!v}"); fi
done
in_root() { "${IN_ROOT[@]}" "$@"; }

T0=$SECONDS
mkdir -p "$BASE"
# ---------------------------------------------------------------- 1. host tools
step host-tools "debootstrap, qemu-user-static, binfmt-support"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
[ -x "$QEMU" ] || need+=(qemu-user-static)
command -v update-binfmts >/dev/null || need+=(binfmt-support)
command -v mosquitto >/dev/null || [ -x /usr/sbin/mosquitto ] || need+=(mosquitto)
command -v mosquitto_sub >/dev/null || need+=(mosquitto-clients)
if [ ${#need[@]} -gt 0 ]; then
  say "  apt-get install ${need[*]}"
  mkdir -p "$LOGS"
  export DEBIAN_FRONTEND=noninteractive
  logged apt-update apt-get update -q
  logged apt-install apt-get install -y -q --no-install-recommends "${need[@]}"
fi
if ! "$VENV/bin/python" -c 'import skimage, cv2' 2>/dev/null; then
  say "  the dev venv ($VENV) draws the photo: make $VENV/.test-deps"
  make -s "$VENV/.test-deps"
fi
mkdir -p "$LOGS"

# ---------------------------------------------------------------- 2. binfmt: aarch64 ELF runs through qemu
step binfmt "qemu-aarch64 registered with the F flag"
[ -e "$BINFMT/register" ] || mount -t binfmt_misc binfmt_misc "$BINFMT"
entry="$BINFMT/qemu-aarch64"
registered() { [ -e "$entry" ] && grep -qx enabled "$entry" && grep -q '^flags:.*F' "$entry"; }
if ! registered; then update-binfmts --enable qemu-aarch64 >/dev/null 2>&1 || true; fi
if ! registered; then  # registered otherwise (no F: the chroot has no qemu to open): register it ourselves
  [ -e "$entry" ] && echo -1 >"$entry"
  printf '%s' ":qemu-aarch64:M::$MAGIC:$MASK:$QEMU:FP" >"$BINFMT/register"
fi
registered || die "could not register qemu-aarch64 with binfmt_misc (see $entry)"
say "  $(grep -E '^(interpreter|flags)' "$entry" | tr '\n' ' ')"

# ---------------------------------------------------------------- 3. the arm64 Debian 12 root
if [ -f "$STAMP" ] && [ -x "$ROOT/usr/bin/python3" ]; then
  step root "reusing $ROOT ($(cat "$STAMP"))"
else
  MIRROR="${ARM64_MIRROR:-$(host_mirror)}"
  step root "debootstrap from $MIRROR into $ROOT (a few minutes)"
  unmount_all
  [ -z "$(mounted_under "$ROOT")" ] || die "cannot unmount what is mounted under $ROOT"
  rm -rf --one-file-system "$ROOT" "$STAMP"
  mkdir -p "$BASE/debs"   # the downloaded debs: an interrupted run downloads only what is missing
  logged debootstrap debootstrap --arch=arm64 --variant=minbase --cache-dir="$BASE/debs" \
    --include=python3,python3-venv,python3-pip,ca-certificates "$SUITE" "$ROOT" "$MIRROR"
  echo "$SUITE from $MIRROR, $(date -u +%Y-%m-%dT%H:%MZ)" >"$STAMP"
fi
arch=$(chroot "$ROOT" /usr/bin/uname -m)
[ "$arch" = aarch64 ] || die "uname -m in the root says '$arch', not aarch64: binfmt does not hand it to qemu"
say "  uname -m in the root: $arch (qemu cpu $QEMU_CPU); $(chroot "$ROOT" /usr/bin/python3 --version)"

# ---------------------------------------------------------------- 4. inside: mounts, DNS, trust store
step mounts "/proc and /dev/shm mounted (no /sys: a CPU list only), resolv.conf and the host's local CAs copied in"
mountpoint -q "$ROOT/sys" && die "$ROOT/sys is mounted: XNNPACK's cpuinfo would read an x86 topology there"
# cpuinfo (XNNPACK's, onnxruntime's) still wants the list of CPUs from /sys: without it XNNPACK is quietly
# not applied. Plain files with that list alone give it that, and nothing of the host's x86 topology.
mkdir -p "$ROOT/sys/devices/system/cpu"
for f in possible present online; do echo "0-$(($(nproc) - 1))" >"$ROOT/sys/devices/system/cpu/$f"; done
mount_in proc -t proc proc
mount_in dev/shm -t tmpfs -o mode=1777,size=256m tmpfs
for n in null zero random urandom tty; do  # what debootstrap made; a container host may not allow mknod
  [ -c "$ROOT/dev/$n" ] || die "$ROOT/dev/$n is missing: debootstrap could not make the device nodes"
done
cp -L /etc/resolv.conf "$ROOT/etc/resolv.conf"
# A proxy on the way to PyPI may sign with a CA of this host's own: trust it inside as well.
# (update-ca-certificates takes a minute under qemu: only when a certificate is new or changed)
new_ca=0
mkdir -p "$ROOT/usr/local/share/ca-certificates"
for crt in /usr/local/share/ca-certificates/*.crt; do
  [ -f "$crt" ] || continue
  if ! cmp -s "$crt" "$ROOT/usr/local/share/ca-certificates/${crt##*/}"; then
    cp "$crt" "$ROOT/usr/local/share/ca-certificates/" && new_ca=1
  fi
done
if [ "$new_ca" = 1 ]; then logged ca-certificates in_root update-ca-certificates; fi

# ---------------------------------------------------------------- 5. install: packaging/install.sh, as on a Pi
step install "packaging/install.sh in the root (venv /opt/edge-agent/venv, [tflite] from PyPI)"
src="$ROOT/usr/src/edge-agent"
rm -rf "$src" && mkdir -p "$src"
# the working tree as git sees it (tracked and new files, nothing ignored: no .venv, no state), never the
# root itself, whether or not .gitignore names it
git ls-files -z -co --exclude-standard | while IFS= read -r -d '' f; do
  case "$f" in .arm64-root/*) ;; *) if [ -e "$f" ]; then printf '%s\0' "$f"; fi ;; esac
done | tar --null -T - -cf - | tar -xf - -C "$src"
# systemd-python is built from source (a compiler and libsystemd-dev); the Pi's wheels are the point here
logged install in_root env EDGE_AGENT_EXTRAS=tflite bash /usr/src/edge-agent/packaging/install.sh \
  --source /usr/src/edge-agent --no-enable
grep -E '^ *(Building wheel for|Successfully installed)' "$LOGS/install.log" | sed 's/^ */  /' || true
# every module of the checkout made it into the installed package (a folder without __init__.py does not,
# under setup.cfg's `packages = find:`; an editable install hides that, a Pi's install does not)
site="$ROOT$(in_root /opt/edge-agent/venv/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')"
missing=$(cd "$src" && find agent -name '*.py' -not -path '*/__pycache__/*' | sort | while read -r f; do
  [ -e "$site/$f" ] || echo "$f"; done)
if [ -n "$missing" ]; then
  die "the installed edge-agent lacks $(echo "$missing" | wc -l) modules of the checkout, in $(echo "$missing" \
    | xargs -n1 dirname | sort -u | tr '\n' ' ')(a package folder without __init__.py is left out of the wheel)"
fi
# each compiled dependency's wheel tag: aarch64 wheels, as PyPI serves them to a Pi
in_root /opt/edge-agent/venv/bin/python - <<'PY' | sed 's/^/  /'
import importlib.metadata as md
for name in ("numpy", "opencv-python-headless", "onnxruntime", "ai-edge-litert", "pydantic-core", "cryptography",
             "psutil", "PyYAML"):
    try:
        dist = md.distribution(name)
    except md.PackageNotFoundError:
        print(f"{name}: not installed")
        continue
    tags = [line.split(": ", 1)[1] for line in (dist.read_text("WHEEL") or "").splitlines() if line.startswith("Tag:")]
    print(f"{name} {dist.version}: {', '.join(tags) or 'no wheel tag'}")
PY

# ---------------------------------------------------------------- 6. the probe, as aarch64
step probe "agent-ctl probe in the root"
logged probe in_root agent-ctl probe
sed 's/^/  /' "$LOGS/probe.log"
logged probe-json in_root agent-ctl probe --json
sed -n '/^{/,$p' "$LOGS/probe-json.log" >"$LOGS/probe.json"

# ---------------------------------------------------------------- 7. the photo and the broker
step photo "the astronaut in a 640x480 frame (as tests/test_e2e.py), mosquitto on 127.0.0.1"
rm -rf "$ROOT$CHECK" && mkdir -p "$ROOT$CHECK/frames"
# the frame and the face's box are the e2e tests' own (tests/conftest.py: face_frames)
EXPECTED=$("$VENV/bin/python" - "$ROOT$CHECK/frames/0001.png" <<'PY'
import sys

import cv2
import numpy as np

sys.path.insert(0, "tests")
from conftest import ASTRONAUT_FACE, astronaut

canvas = np.full((480, 640, 3), 90, np.uint8)
canvas[0:480, 100:612] = astronaut()[0:480]
assert cv2.imwrite(sys.argv[1], canvas)
x1, y1, x2, y2 = ASTRONAUT_FACE
print(f"{(x1 + 100) / 640:.4f},{y1 / 480:.4f},{(x2 + 100) / 640:.4f},{y2 / 480:.4f}")
PY
)
say "  $CHECK/frames/0001.png; the face is at [$EXPECTED]"
WORK=$(mktemp -d)
PORT=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\nuser root\n' "$PORT" >"$WORK/mosquitto.conf"
"$(command -v mosquitto || echo /usr/sbin/mosquitto)" -c "$WORK/mosquitto.conf" >"$LOGS/mosquitto.log" 2>&1 &
PIDS+=($!)
for _ in $(seq 50); do
  python3 -c "import socket, sys; sys.exit(socket.socket().connect_ex(('127.0.0.1', $PORT)))" && break
  sleep 0.1
done
say "  mosquitto on 127.0.0.1:$PORT (the root shares this machine's network)"

# ---------------------------------------------------------------- 8. the agent on the photo, per runtime
run_agent() {  # run_agent FORMAT: the daemon in the root on the photo; checks 3 predictions and the status
  local fmt=$1 cfg="$CHECK/agent-$1.yaml" out="$LOGS/predictions-$1.jsonl" agent sub t
  step "agent-$fmt" "edge-agent in the root on the photo, 3 predictions read on the host"
  cat >"$ROOT$cfg" <<YAML
device_id: $DEVICE-$fmt
mqtt: {url: "mqtt://127.0.0.1:$PORT"}
camera: {source: "images:$CHECK/frames", fps: 5}
model: {path: /opt/edge-agent/share/models/face/blazeface.$fmt}
health: {interval_s: 2}
state_dir: $CHECK/state-$fmt
YAML
  t=$SECONDS
  mosquitto_sub -h 127.0.0.1 -p "$PORT" -t "edge/$DEVICE-$fmt/predictions" -C 3 -W "$TIMEOUT" >"$out" &
  sub=$!
  sleep 0.5
  "${IN_ROOT[@]}" edge-agent --config "$cfg" >"$LOGS/agent-$fmt.log" 2>&1 &
  agent=$!  # chroot, then env, then python exec in turn: this pid is the agent's
  PIDS+=("$agent")
  if ! wait "$sub"; then
    kill "$agent" 2>/dev/null || true
    tail -n 25 "$LOGS/agent-$fmt.log" >&2
    die "agent ($fmt): no 3 predictions within $TIMEOUT s; its log: $LOGS/agent-$fmt.log"
  fi
  say "  first 3 predictions after $((SECONDS - t)) s (the agent's start under qemu included)"
  mosquitto_sub -h 127.0.0.1 -p "$PORT" -t "edge/$DEVICE-$fmt/status" -C 1 -W 10 >"$LOGS/status-$fmt.json" \
    || die "agent ($fmt): no retained status on edge/$DEVICE-$fmt/status"
  kill -TERM "$agent"
  wait "$agent" || die "agent ($fmt): exited with $? on SIGTERM; its log: $LOGS/agent-$fmt.log"
  RESULT=$(python3 - "$fmt" "$EXPECTED" "$out" "$LOGS/status-$fmt.json" "$LOGS/probe.json" \
            "$LOGS/agent-$fmt.log" <<'PY'
import json
import sys

fmt, expected, preds_file, status_file, probe_file, agent_log = sys.argv[1:]
want = [float(v) for v in expected.split(",")]
preds = [json.loads(line) for line in open(preds_file) if line.strip()]
status = json.load(open(status_file))
probe = json.load(open(probe_file))


def iou(a, b):
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    area = lambda r: (r[2] - r[0]) * (r[3] - r[1])  # noqa: E731
    return w * h / (area(a) + area(b) - w * h)


def fail(why):
    print(f"agent ({fmt}): {why}")
    sys.exit(1)


arch = status.get("platform", {}).get("arch")
if arch != "aarch64":
    fail(f"status says platform.arch {arch!r}, not aarch64")
if status.get("model", {}).get("format") != fmt:
    fail(f"status says model format {status.get('model', {}).get('format')!r}, not {fmt}")
for p in preds:
    faces = [r for r in p["results"] if r["label"] == "face"]
    if len(faces) != 1:
        fail(f"prediction #{p['seq']} has {len(faces)} faces, not 1: {p['results']}")
    face = faces[0]
    if face["score"] <= 0.5:
        fail(f"prediction #{p['seq']}: face score {face['score']:.2f}, not above 0.5")
    if iou(face["box"], want) <= 0.7:
        fail(f"prediction #{p['seq']}: face at {face['box']}, IoU {iou(face['box'], want):.2f} with {want} (need > 0.7)")
if status["accelerator"] == "xnnpack" and "Created TensorFlow Lite XNNPACK delegate" not in open(agent_log).read():
    fail(f"status says xnnpack, but TFLite did not say it created the XNNPACK delegate (see {agent_log})")
module = status["runtime"]["module"].split()[0]  # onnxruntime's carries its version
version = probe["runtimes"].get(module, {}).get("version") or "?"
face = [r for r in preds[-1]["results"] if r["label"] == "face"][0]
box = ", ".join(f"{v:.2f}" for v in face["box"])
print(f"{fmt}: {module} {version} {status['accelerator']}, face score {face['score']:.2f} at [{box}]")
PY
  ) || die "$RESULT"
  say "  $RESULT"
}
run_agent tflite
TFLITE=$RESULT
run_agent onnx
ONNX=$RESULT
end_step

say "all steps: $((SECONDS - T0)) s; logs in $LOGS"
say "ok ($arch, $TFLITE; $ONNX)"
