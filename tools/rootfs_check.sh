#!/usr/bin/env bash
# The runtime on a Debian root of another architecture (arm64 under QEMU user emulation by
# default), from scratch, with the install steps of deploy/Dockerfile.rpi:
#
#   1. host tools: debootstrap (+ qemu-user-static and a binfmt_misc entry for a foreign arch)
#   2. a minimal Debian root (bookworm: Python 3.11, as python:3.11-slim) made by debootstrap
#   3. a wheelhouse for that root's platform, downloaded on the host (pip download --platform)
#   4. Dockerfile.rpi's steps inside it: venv, `pip install ".[serve]"` (offline, from the
#      wheelhouse), no torch, user 10001, /models, /var/cache/edge-ssd
#   5. tiny bundles exported on this host (fp32, int4) copied in; the real pair bind-mounted
#      read-only when it is there: `edge-ssd info` (checksums) and `generate` (ar, spec with the
#      model and the n-gram drafter, parallel) inside, token ids compared with the host's
#   6. the runtime's tests inside (those that need an export skip: no torch in the root)
#   7. `edge-ssd serve` as user 10001 inside, the image's HEALTHCHECK, one chat completion
#
#   sudo bash tools/rootfs_check.sh [--arch arm64|amd64] [--suite bookworm] [--root DIR]
#        [--cache DIR] [--pair DIR] [--max-new-tokens N] [--keep] [--json OUT]
#
# --arch amd64 runs the same steps natively (the x86-64 "image"). The root is removed at the end
# unless --keep (a kept root is reused by the next run); downloads stay in --cache. Emulated
# speed is not device speed: this checks correctness only. Needs root, network for apt and PyPI.
set -euo pipefail

ARCH=arm64
SUITE=bookworm
MIRROR=http://deb.debian.org/debian
ROOT=
CACHE=${XDG_CACHE_HOME:-$HOME/.cache}/edge-ssd-rootfs
PAIR=/work/models/qwen2.5-coder-0.5b-1.5b
MAX_NEW=24
KEEP=0
JSON=
PORT=18431

while [ $# -gt 0 ]; do
    case $1 in
        --arch) ARCH=$2; shift 2 ;;
        --suite) SUITE=$2; shift 2 ;;
        --mirror) MIRROR=$2; shift 2 ;;
        --root) ROOT=$2; shift 2 ;;
        --cache) CACHE=$2; shift 2 ;;
        --pair) PAIR=$2; shift 2 ;;
        --max-new-tokens) MAX_NEW=$2; shift 2 ;;
        --keep) KEEP=1; shift ;;
        --json) JSON=$2; shift 2 ;;
        --port) PORT=$2; shift 2 ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done

REPO=$(cd "$(dirname "$0")/.." && pwd)
ROOT=${ROOT:-/var/tmp/edge-ssd-rootfs-$ARCH}
HOST_ARCH=$(dpkg --print-architecture)
case $ARCH in
    arm64) QEMU_NAME=aarch64; PLAT=aarch64 ;;
    amd64) QEMU_NAME=x86_64; PLAT=x86_64 ;;
    *) echo "--arch: arm64 or amd64" >&2; exit 2 ;;
esac
FOREIGN=0; [ "$ARCH" != "$HOST_ARCH" ] && FOREIGN=1
WHEELS=$CACHE/wheels-$ARCH
HOST_OUT=$CACHE/run-$ARCH          # host-side results of this run (bundles, JSON)
T0=$(date +%s)
declare -a TIMES=()
MOUNTED=()                         # mount points under $ROOT, in mount order
OWNER=.edge-ssd-rootfs            # marks a root this script made: the only kind it deletes
BINFMT_MOUNTED=0
BINFMT_ADDED=0
SERVER_PID=

log() { printf '[rootfs %s %4ds] %s\n' "$ARCH" $(( $(date +%s) - T0 )) "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
step() { STEP_NAME=$1; STEP_T=$(date +%s); log "== $1"; }
done_step() { local s=$(( $(date +%s) - STEP_T )); TIMES+=("$STEP_NAME=$s"); log "   $STEP_NAME: ${s}s"; }
in_root() { chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/opt/venv/bin:/usr/sbin:/usr/bin:/sbin:/bin \
                LANG=C.UTF-8 EDGE_SSD_CACHE=/var/cache/edge-ssd "$@"; }

cleanup() {
    local rc=$?
    set +e
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    for (( i=${#MOUNTED[@]}-1; i>=0; i-- )); do umount -R "${MOUNTED[$i]}" 2>/dev/null || umount -R -l "${MOUNTED[$i]}"; done
    if [ "$BINFMT_ADDED" = 1 ]; then echo -1 > "/proc/sys/fs/binfmt_misc/qemu-$QEMU_NAME"; log "binfmt entry removed"; fi
    if [ "$BINFMT_MOUNTED" = 1 ]; then umount /proc/sys/fs/binfmt_misc; fi
    if [ "$KEEP" = 0 ] && [ -f "$ROOT/$OWNER" ]; then
        if grep -q " $ROOT[/ ]" /proc/mounts; then
            log "not removing $ROOT: something is still mounted under it"
        else
            rm -rf --one-file-system "$ROOT"; log "removed $ROOT (use --keep to keep it)"
        fi
    fi
    log "exit $rc after $(( $(date +%s) - T0 ))s"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

[ "$(id -u)" = 0 ] || die "run as root (debootstrap, chroot, mount)"
mkdir -p "$CACHE/debs" "$WHEELS" "$HOST_OUT"

# ---------------------------------------------------------------------------------------------
step "host tools"
need=()
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ "$FOREIGN" = 1 ] && [ ! -e "/usr/libexec/qemu-binfmt/$QEMU_NAME-binfmt-P" ]; then need+=(qemu-user-static); fi
if [ ${#need[@]} -gt 0 ]; then
    log "apt-get install ${need[*]}"
    apt-get update -q >/dev/null && DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${need[@]}" >/dev/null
fi
if [ "$FOREIGN" = 1 ]; then
    # binfmt_misc lets the kernel hand every $ARCH ELF (the chroot's shell, dpkg, python and the
    # subprocesses the tests start) to qemu. The F flag keeps the interpreter open, so it works
    # inside the chroot without a copy of qemu there.
    if [ ! -e /proc/sys/fs/binfmt_misc/register ]; then
        mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc \
            || die "binfmt_misc cannot be mounted here: run qemu-$QEMU_NAME-static by hand (see docs/devices.md)"
        BINFMT_MOUNTED=1
    fi
    if [ ! -e "/proc/sys/fs/binfmt_misc/qemu-$QEMU_NAME" ]; then
        grep -v '^#' "/usr/lib/binfmt.d/qemu-$QEMU_NAME.conf" > /proc/sys/fs/binfmt_misc/register
        BINFMT_ADDED=1
    fi
    grep -q '^flags: .*F' "/proc/sys/fs/binfmt_misc/qemu-$QEMU_NAME" || die "binfmt entry qemu-$QEMU_NAME lacks the F flag"
    log "$(qemu-$QEMU_NAME-static --version | head -1); binfmt qemu-$QEMU_NAME enabled"
fi
done_step

# ---------------------------------------------------------------------------------------------
step "debootstrap $SUITE $ARCH"
if [ -f "$ROOT/.edge-ssd-debootstrap-done" ]; then
    log "reusing $ROOT"
else
    if [ -e "$ROOT" ] && [ ! -f "$ROOT/$OWNER" ] && [ -n "$(ls -A "$ROOT")" ]; then
        die "$ROOT exists and was not made by this script: choose another --root"
    fi
    rm -rf --one-file-system "$ROOT"; mkdir -p "$ROOT"; touch "$ROOT/$OWNER"
    log "debootstrap --variant=minbase (a few minutes; longer emulated)"
    debootstrap --arch="$ARCH" --variant=minbase --cache-dir="$CACHE/debs" \
        --include=python3,python3-venv,ca-certificates "$SUITE" "$ROOT" "$MIRROR" > "$HOST_OUT/debootstrap.log" 2>&1 \
        || { tail -20 "$HOST_OUT/debootstrap.log" >&2; die "debootstrap (log: $HOST_OUT/debootstrap.log)"; }
    touch "$ROOT/.edge-ssd-debootstrap-done"
fi
for m in proc sys dev; do
    mkdir -p "$ROOT/$m"
    case $m in proc) mount -t proc proc "$ROOT/proc" ;; sys) mount -t sysfs sys "$ROOT/sys" ;; dev) mount --rbind /dev "$ROOT/dev"; mount --make-rslave "$ROOT/dev" ;; esac
    MOUNTED+=("$ROOT/$m")
done
if [ "$FOREIGN" = 1 ]; then
    # Under qemu-user, /proc/cpuinfo is the host's (x86) while /sys lists the host's CPUs: the
    # cpuinfo library in onnxruntime then crashes `import onnxruntime` (SIGSEGV). Hiding
    # /sys/devices/system/cpu makes it fall back (a warning). An emulation artifact: on a board
    # both describe the same arm64 CPU.
    mount -t tmpfs -o size=64k,mode=0555 none "$ROOT/sys/devices/system/cpu"; MOUNTED+=("$ROOT/sys/devices/system/cpu")
fi
read -r PYV UNAME GLIBC < <(in_root /usr/bin/python3 -c 'import sys, platform; print("%d.%d" % sys.version_info[:2], platform.machine(), platform.libc_ver()[1])')
log "root: $(in_root /usr/bin/python3 --version) on $UNAME, glibc $GLIBC, $(du -sh --exclude=proc --exclude=sys --exclude=dev "$ROOT" | cut -f1)"
[ "$UNAME" = "$PLAT" ] || die "the root's python reports $UNAME, not $PLAT"
done_step

# ---------------------------------------------------------------------------------------------
step "wheelhouse ($PLAT, cp${PYV/./})"
# The runtime's dependencies, the serve extra and the test extra, as pyproject.toml lists them.
mapfile -t REQS < <(python3 - "$REPO/pyproject.toml" <<'EOF'
import sys, tomllib
p = tomllib.load(open(sys.argv[1], "rb"))["project"]
for r in p["dependencies"] + p["optional-dependencies"]["serve"] + p["optional-dependencies"]["test"]:
    print(r)
EOF
)
GLIBC_MINOR=${GLIBC#2.}
PLATS=()
for (( v=GLIBC_MINOR; v>=17; v-- )); do PLATS+=(--platform "manylinux_2_${v}_$PLAT"); done
PLATS+=(--platform "manylinux2014_$PLAT" --platform any)
python3 -m pip download -q --disable-pip-version-check --only-binary=:all: --python-version "$PYV" \
    --implementation cp --abi "cp${PYV/./}" --abi abi3 --abi none "${PLATS[@]}" -d "$WHEELS" \
    "setuptools>=68" "${REQS[@]}" 2> "$HOST_OUT/pip-download.log" || { cat "$HOST_OUT/pip-download.log" >&2; die "pip download"; }
log "$(ls "$WHEELS" | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1): $(ls "$WHEELS" | grep -E '^(onnxruntime|numpy|tokenizers|psutil)-' | tr '\n' ' ')"
done_step

# ---------------------------------------------------------------------------------------------
step "Dockerfile.rpi install steps"
rm -rf "$ROOT/src" "$ROOT/wheels"
mkdir -p "$ROOT/src" "$ROOT/wheels"
cp -a "$REPO/pyproject.toml" "$REPO/README.md" "$REPO/edge_ssd" "$REPO/export" "$ROOT/src/"
find "$ROOT/src" -name __pycache__ -prune -exec rm -rf {} +
mount --bind -o ro "$WHEELS" "$ROOT/wheels"; MOUNTED+=("$ROOT/wheels")
if [ ! -x "$ROOT/opt/venv/bin/python" ]; then in_root /usr/bin/python3 -m venv /opt/venv; fi
# pip install ".[serve]" as the Dockerfile does, offline from the wheelhouse (its build
# dependency, setuptools, comes from there too)
in_root /bin/sh -c 'cd /src && PIP_NO_CACHE_DIR=1 pip install -q --disable-pip-version-check --no-index --find-links /wheels ".[serve]"'
in_root /bin/sh -c 'pip list --format=freeze' > "$HOST_OUT/pip-freeze-serve.txt"
if grep -qiE '^(torch|transformers|onnx|optimum)==' "$HOST_OUT/pip-freeze-serve.txt"; then die "the serve install pulled in an export dependency"; fi
log "serve install: $(wc -l < "$HOST_OUT/pip-freeze-serve.txt") packages, no torch; $(grep -E '^(onnxruntime|numpy|tokenizers)==' "$HOST_OUT/pip-freeze-serve.txt" | tr '\n' ' ')"
rm -rf "$ROOT/src"
in_root /bin/sh -c 'getent group edge-ssd >/dev/null || groupadd --system --gid 10001 edge-ssd
    getent passwd edge-ssd >/dev/null || useradd --system --uid 10001 --gid 10001 --no-create-home --shell /usr/sbin/nologin edge-ssd
    mkdir -p /models /var/cache/edge-ssd && chown edge-ssd:edge-ssd /var/cache/edge-ssd'
# the tests' extra, for step 6 only (not part of the image)
in_root /bin/sh -c 'pip install -q --disable-pip-version-check --no-index --find-links /wheels pytest openai httpx'
in_root python -c 'import onnxruntime as o, numpy, tokenizers, sys; print("onnxruntime", o.__version__, o.get_available_providers(), "numpy", numpy.__version__, "tokenizers", tokenizers.__version__, file=sys.stderr)'
done_step

# ---------------------------------------------------------------------------------------------
step "bundles: exported on the host, run inside"
for q in fp32 int4; do
    if [ ! -f "$HOST_OUT/tiny-$q/pair.json" ]; then
        PYTHONPATH=$REPO python3 "$REPO/tools/tiny_bundle.py" "$HOST_OUT/tiny-$q" --quant "$q" >/dev/null 2>"$HOST_OUT/tiny-$q.log" \
            || { cat "$HOST_OUT/tiny-$q.log" >&2; die "tiny $q export"; }
    fi
    rm -rf "$ROOT/models/tiny-$q"; cp -a "$HOST_OUT/tiny-$q" "$ROOT/models/tiny-$q"
done
BUNDLES=(tiny-fp32 tiny-int4)
if [ -f "$PAIR/pair.json" ]; then
    mkdir -p "$ROOT/models/real"
    mount --bind -o ro "$PAIR" "$ROOT/models/real"; MOUNTED+=("$ROOT/models/real")
    BUNDLES+=(real)
    log "real pair: $PAIR (read-only bind mount)"
else
    log "real pair not found at $PAIR: tiny bundles only"
fi
PROMPT='def fibonacci(n):'
: > "$HOST_OUT/generate.jsonl"
for b in "${BUNDLES[@]}"; do
    hb=$HOST_OUT/$b; [ "$b" = real ] && hb=$PAIR
    in_root edge-ssd info --bundle "/models/$b" > "$HOST_OUT/info-$b.json" || die "edge-ssd info on $b"
    log "info $b: providers $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1]))["providers"])' "$HOST_OUT/info-$b.json") (checksums verified)"
    modes=("ar auto" "spec model" "spec ngram" "parallel model")
    [ "$b" = real ] && modes=("ar auto" "spec model" "spec ngram")
    for m in "${modes[@]}"; do
        read -r mode drafter <<<"$m"
        args=(generate --bundle "/models/$b" --prompt "$PROMPT" --raw --mode "$mode" --drafter "$drafter" --max-new-tokens "$MAX_NEW" --json)
        log "generate $b $m"
        t=$(date +%s.%N)
        in_root edge-ssd "${args[@]}" > "$HOST_OUT/gen.json" || die "generate $b $m"
        dt=$(python3 -c "import time; print(round(time.time() - $t, 1))")
        args[2]=$hb
        (cd "$REPO" && PYTHONPATH=$REPO python3 -m edge_ssd.cli "${args[@]}") > "$HOST_OUT/gen-host.json" 2>/dev/null || die "host generate $b $m"
        python3 - "$b" "$m" "$dt" "$HOST_OUT/gen.json" "$HOST_OUT/gen-host.json" "$HOST_OUT/generate.jsonl" <<'EOF' >&2
import json, sys
b, m, dt, inside, host, out = sys.argv[1:]
a, h = json.load(open(inside)), json.load(open(host))
ar = [r for r in map(json.loads, open(out)) if r["bundle"] == b and r["mode"].startswith("ar")]
ar_ids, ar_host = (ar[0]["token_ids"], ar[0]["host_ids"]) if ar else (a["token_ids"], h["token_ids"])
first = next((i for i, (p, q) in enumerate(zip(a["token_ids"], h["token_ids"])) if p != q), None)
rec = {"bundle": b, "mode": m, "wall_s": float(dt), "new_tokens": a["stats"]["new_tokens"],
       "tokens_per_s_emulated": a["stats"]["tokens_per_s"], "acceptance": a["stats"].get("acceptance_rate"),
       "same_ids_as_host": a["token_ids"] == h["token_ids"], "first_diff_vs_host": first,
       "same_as_ar_inside": a["token_ids"] == ar_ids, "same_as_ar_on_host": h["token_ids"] == ar_host,
       "token_ids": a["token_ids"], "host_ids": h["token_ids"], "text": a["text"][:100], "host_text": h["text"][:100]}
open(out, "a").write(json.dumps(rec) + "\n")
print(f"   {rec['new_tokens']} tokens in {dt}s wall; same ids as the host: {rec['same_ids_as_host']} (first "
      f"difference at {first}); same as ar inside: {rec['same_as_ar_inside']}, on the host: {rec['same_as_ar_on_host']}")
EOF
    done
done
rm -f "$HOST_OUT/gen.json" "$HOST_OUT/gen-host.json"
done_step

# ---------------------------------------------------------------------------------------------
step "runtime tests inside"
# tests/ and tools/ (tests import tools), against the installed package (no source tree there)
rm -rf "$ROOT/check"; mkdir -p "$ROOT/check"; cp -a "$REPO/tests" "$REPO/tools" "$ROOT/check/"
find "$ROOT/check" -name __pycache__ -prune -exec rm -rf {} +
set +e
in_root /bin/sh -c 'cd /check && python -m pytest -q -p no:cacheprovider -rs tests' > "$HOST_OUT/pytest.log" 2>&1
PYTEST_RC=$?
set -e
rm -rf "$ROOT/check"
PYTEST_SUMMARY=$(grep -E '[0-9]+ (passed|failed)' "$HOST_OUT/pytest.log" | tail -1)
log "pytest: rc $PYTEST_RC: $PYTEST_SUMMARY (log: $HOST_OUT/pytest.log)"
[ "$PYTEST_RC" = 0 ] || die "tests failed inside the root"
done_step

# ---------------------------------------------------------------------------------------------
step "serve as user 10001, HEALTHCHECK, one request"
chroot --userspec=10001:10001 "$ROOT" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin LANG=C.UTF-8 \
    EDGE_SSD_CACHE=/var/cache/edge-ssd edge-ssd serve --bundle /models/tiny-fp32 --host 127.0.0.1 --port "$PORT" \
    > "$HOST_OUT/serve.log" 2>&1 &
SERVER_PID=$!
ok=0
for _ in $(seq 1 120); do
    # the image's HEALTHCHECK command, run inside the root
    if in_root python -c "import sys, urllib.request; sys.exit(urllib.request.urlopen('http://127.0.0.1:$PORT/health', timeout=4).status != 200)" 2>/dev/null; then ok=1; break; fi
    kill -0 "$SERVER_PID" 2>/dev/null || break
    sleep 2
done
[ "$ok" = 1 ] || { tail -20 "$HOST_OUT/serve.log" >&2; die "server did not become healthy"; }
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "edge-ssd", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 8}' > "$HOST_OUT/chat.json" \
    || die "chat completion"
log "health ok; chat completion: $(python3 -c 'import json,sys; r=json.load(open(sys.argv[1])); print(r["usage"])' "$HOST_OUT/chat.json")"
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
done_step

# ---------------------------------------------------------------------------------------------
TOTAL=$(( $(date +%s) - T0 ))
log "all steps passed in ${TOTAL}s: ${TIMES[*]}"
python3 - "$ARCH" "$SUITE" "$PYV" "$GLIBC" "$TOTAL" "$PYTEST_SUMMARY" "$HOST_OUT" "${TIMES[@]}" <<'EOF' > "$HOST_OUT/summary.json"
import json, sys
arch, suite, pyv, glibc, total, pytest, out, *times = sys.argv[1:]
gen = [json.loads(l) for l in open(f"{out}/generate.jsonl")]
print(json.dumps({"arch": arch, "suite": suite, "python": pyv, "glibc": glibc, "total_s": int(total),
                  "steps_s": {k: int(v) for k, v in (t.split("=") for t in times)}, "pytest": pytest,
                  "generate": [{k: v for k, v in g.items() if not k.endswith("ids")} for g in gen],
                  "same_as_host": f'{sum(g["same_ids_as_host"] for g in gen)}/{len(gen)}',
                  "same_as_ar_inside": f'{sum(g["same_as_ar_inside"] for g in gen)}/{len(gen)}'}, indent=1))
EOF
[ -n "$JSON" ] && cp "$HOST_OUT/summary.json" "$JSON"
cat "$HOST_OUT/summary.json"
