#!/usr/bin/env bash
# A standalone `edge-ssd` runtime executable (PyInstaller, one file): no Python install needed
# on the device. `info`, `generate`, `bench` and `serve`; not `export` (that needs torch).
#
#   bash tools/build_exe.sh [--python python3] [--onedir] [--test BUNDLE] [--keep-venv]
#
# Builds in a fresh virtual environment (build/exe-venv-<os>-<machine>) holding only the runtime,
# the serve extra and PyInstaller, so nothing from a workstation's torch install can be frozen
# in, and writes dist/edge-ssd-<os>-<machine> (build/ and dist/ are git-ignored; --onedir: a
# folder of that name holding the executable and its libraries, which starts faster because
# a one-file build unpacks itself into $TMPDIR at every start). With --test
# BUNDLE it then checks the executable on that bundle: no torch/onnx/exporter module in its
# archive or among the modules it imports, `info`, `generate` with the model and the n-gram
# drafter (same token ids as the Python entry point), `serve` (/health and one chat
# completion), its size, and its start-up time to the first token against the Python entry
# point (`python -m edge_ssd.cli` in the same venv).
#
# Tested here on Linux x86-64 only (docs/devices.md has the numbers). PyInstaller does not
# cross-compile: build on the target OS and architecture. Not tested:
#
#   Linux arm64 (Raspberry Pi OS 64-bit, Jetson): this script as is, on the device or in an
#     arm64 root (tools/rootfs_check.sh). onnxruntime, tokenizers, numpy and PyInstaller all
#     ship aarch64 wheels. For Jetson's CUDA, install NVIDIA's onnxruntime-gpu
#     (deploy/Dockerfile.jetson) into the venv instead of onnxruntime; the CUDA libraries then
#     come from JetPack on the device, not from the executable.
#   Windows 10+ x64 with DirectML (PowerShell, Python 3.11 from python.org):
#     py -3.11 -m venv build\exe-venv
#     build\exe-venv\Scripts\pip install pyinstaller onnxruntime-directml "numpy>=1.24" "tokenizers>=0.19" `
#         "psutil>=5.9" "jinja2>=3.1" "starlette>=0.37" "uvicorn>=0.29"
#     build\exe-venv\Scripts\pip install --no-deps .
#     build\exe-venv\Scripts\pyinstaller --onefile --name edge-ssd --collect-binaries onnxruntime `
#         --collect-submodules onnxruntime.capi --collect-submodules uvicorn --collect-submodules edge_ssd `
#         --exclude-module torch --exclude-module edge_ssd_export --exclude-module onnx `
#         --exclude-module onnxruntime.transformers --exclude-module onnxruntime.quantization `
#         --exclude-module onnxruntime.tools tools\exe_entry.py
#     dist\edge-ssd.exe info          # lists dml when DirectML is usable
#   (onnxruntime-directml provides the same `onnxruntime` module with DmlExecutionProvider and
#   ships DirectML.dll; --no-deps keeps pip from adding the CPU onnxruntime beside it.)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PY=python3
BUNDLE=
KEEP_VENV=0
MODE=onefile
while [ $# -gt 0 ]; do
    case $1 in
        --python) PY=$2; shift 2 ;;
        --test) BUNDLE=$2; shift 2 ;;
        --keep-venv) KEEP_VENV=1; shift ;;
        --onedir) MODE=onedir; shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
T0=$(date +%s)
log() { printf '[build_exe %4ds] %s\n' $(( $(date +%s) - T0 )) "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }

PLAT=$(uname -s | tr '[:upper:]' '[:lower:]')-$(uname -m)
VENV=$REPO/build/exe-venv-$PLAT
WORK=$REPO/build/pyinstaller-$PLAT
OUTNAME=edge-ssd-$PLAT
EXE=$REPO/dist/$OUTNAME
[ "$MODE" = onedir ] && EXE=$REPO/dist/$OUTNAME/$OUTNAME
TMP=$(mktemp -d "${TMPDIR:-/tmp}/edge-ssd-exe.XXXXXX")
SERVER_PID=
cleanup() {
    local rc=$?
    set +e
    [ -n "$SERVER_PID" ] && kill "$SERVER_PID" 2>/dev/null && wait "$SERVER_PID" 2>/dev/null
    rm -rf "$TMP"
    [ "$KEEP_VENV" = 1 ] || rm -rf "$VENV"
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------------------------------------------------------------------------------------------
log "build venv $VENV (runtime + serve extra + PyInstaller; no torch)"
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
VPY=$VENV/bin/python
"$VPY" -m pip install -q --disable-pip-version-check --upgrade pip
"$VPY" -m pip install -q --disable-pip-version-check pyinstaller ".[serve]"
if "$VPY" -c 'import torch' 2>/dev/null; then die "torch is importable in the build venv"; fi
log "$("$VPY" -m PyInstaller --version | sed 's/^/PyInstaller /'), $("$VPY" -c 'import onnxruntime as o, sys; print("onnxruntime", o.__version__, "python", sys.version.split()[0])')"

log "pyinstaller --$MODE (a minute or two)"
rm -rf "$WORK" "${REPO:?}/dist/$OUTNAME"
# edge_ssd.cli imports the exporter and the server lazily: the server (and uvicorn's
# by-name imports) are collected explicitly, the exporter and its stack are excluded.
"$VPY" -m PyInstaller --noconfirm --clean --log-level WARN "--$MODE" --name "$OUTNAME" \
    --distpath "$REPO/dist" --workpath "$WORK" --specpath "$WORK" \
    --collect-binaries onnxruntime --collect-submodules onnxruntime.capi \
    --collect-submodules uvicorn --collect-submodules edge_ssd \
    --exclude-module torch --exclude-module edge_ssd_export --exclude-module onnx \
    --exclude-module transformers --exclude-module optimum --exclude-module tkinter \
    --exclude-module onnxruntime.transformers --exclude-module onnxruntime.quantization \
    --exclude-module onnxruntime.tools \
    "$REPO/tools/exe_entry.py" > "$WORK.log" 2>&1 || { tail -30 "$WORK.log" >&2; die "pyinstaller (log: $WORK.log)"; }
SIZE=$(du -sb "$REPO/dist/$OUTNAME" | cut -f1)
log "built $EXE ($MODE): $(( SIZE / 1048576 )) MiB"

# no torch, onnx or exporter module in the archive (the executable can import nothing else:
# its sys.path is the archive)
"$VENV/bin/pyi-archive_viewer" -l -r "$EXE" > "$TMP/toc.txt" 2>&1 || die "pyi-archive_viewer"
BANNED="'(torch|onnx|transformers|edge_ssd_export)[./']|libtorch"     # entry names are quoted
[ "$MODE" = onedir ] && find "$REPO/dist/$OUTNAME" -printf "'%P'\n" >> "$TMP/toc.txt"   # the folder's files too
if grep -Eq "$BANNED" "$TMP/toc.txt"; then
    grep -E "$BANNED" "$TMP/toc.txt" | head -20 >&2 || true; die "the archive holds torch/onnx/exporter modules"
fi
log "archive: $(wc -l < "$TMP/toc.txt") entries, no torch, onnx or edge_ssd_export"

if [ -z "$BUNDLE" ]; then log "done (no --test BUNDLE: not run)"; exit 0; fi

# ---------------------------------------------------------------------------------------------
[ -f "$BUNDLE/pair.json" ] || die "--test: no pair.json in $BUNDLE"
export EDGE_SSD_CACHE=$TMP/cache             # a fresh checksum/calibration cache, removed at exit
export EDGE_SSD_EXE_MODULES=$TMP/modules.txt
RUN=(env -i PATH=/usr/bin:/bin HOME="$TMP" LANG=C.UTF-8 EDGE_SSD_CACHE="$EDGE_SSD_CACHE" EDGE_SSD_EXE_MODULES="$EDGE_SSD_EXE_MODULES")
PROMPT='def fibonacci(n):'

log "info"
"${RUN[@]}" "$EXE" info --bundle "$BUNDLE" > "$TMP/info.json" || die "info"
grep -Eq '^(torch|onnx|edge_ssd_export|transformers)(\.|$)' "$TMP/modules.txt" && die "info imported torch/onnx/exporter"
log "  providers: $("$VPY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["providers"])' "$TMP/info.json"); $(wc -l < "$TMP/modules.txt") modules imported, none of torch/onnx/exporter"

for drafter in model ngram; do
    "${RUN[@]}" "$EXE" generate --bundle "$BUNDLE" --prompt "$PROMPT" --raw --drafter "$drafter" \
        --max-new-tokens 48 --json > "$TMP/exe-$drafter.json" || die "generate --drafter $drafter"
    grep -Eq '^(torch|onnx|edge_ssd_export|transformers)(\.|$)' "$TMP/modules.txt" && die "generate imported torch/onnx/exporter"
    "$VPY" -m edge_ssd.cli generate --bundle "$BUNDLE" --prompt "$PROMPT" --raw --drafter "$drafter" \
        --max-new-tokens 48 --json > "$TMP/py-$drafter.json" || die "python generate --drafter $drafter"
    "$VPY" - "$drafter" "$TMP/exe-$drafter.json" "$TMP/py-$drafter.json" <<'EOF' >&2 || die "executable and Python entry point differ"
import json, sys
d, a, b = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
s = a["stats"]
print(f"  generate --drafter {d}: {s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, acceptance "
      f"{s['acceptance_rate']:.2f}, drafters {sorted(s.get('drafters', {}))}, same ids as python: {a['token_ids'] == b['token_ids']}")
sys.exit(a["token_ids"] != b["token_ids"])
EOF
done

log "serve"
PORT=$("$VPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"${RUN[@]}" "$EXE" serve --bundle "$BUNDLE" --port "$PORT" > "$TMP/serve.log" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 90); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null 2>&1 && break
    kill -0 "$SERVER_PID" 2>/dev/null || { cat "$TMP/serve.log" >&2; die "serve exited"; }
    sleep 1
done
curl -sf "http://127.0.0.1:$PORT/health" >/dev/null || die "serve: /health"
curl -sf "http://127.0.0.1:$PORT/v1/chat/completions" -H 'content-type: application/json' \
    -d '{"model": "edge-ssd", "messages": [{"role": "user", "content": "Write hello world in C."}], "max_tokens": 16}' \
    > "$TMP/chat.json" || die "serve: chat completion"
if grep -Eiq 'torch|/onnx/' "/proc/$SERVER_PID/maps"; then die "serve mapped a torch library"; fi
kill "$SERVER_PID"; wait "$SERVER_PID" 2>/dev/null || true; SERVER_PID=
grep -Eq '^(torch|onnx|edge_ssd_export|transformers)(\.|$)' "$TMP/modules.txt" && die "serve imported torch/onnx/exporter"
log "  /health ok, chat completion usage $("$VPY" -c 'import json,sys; print(json.load(open(sys.argv[1]))["usage"])' "$TMP/chat.json")"

# start-up to the first token: the whole process for one new token, warm bundle cache, median of 5
log "start-up to the first token (median of 5, process start to exit, --max-new-tokens 1)"
first_token() {
    local ts=()
    for _ in 1 2 3 4 5; do
        local t=$(date +%s%N)
        "$@" generate --bundle "$BUNDLE" --prompt "$PROMPT" --raw --max-new-tokens 1 --json > /dev/null || return 1
        ts+=($(( ($(date +%s%N) - t) / 1000000 )))
    done
    printf '%s\n' "${ts[@]}" | sort -n | sed -n 3p
}
EXE_MS=$(first_token "${RUN[@]}" "$EXE") || die "timing the executable"
PY_MS=$(first_token "${RUN[@]}" "$VPY" -m edge_ssd.cli) || die "timing the Python entry point"
log "  executable ${EXE_MS} ms, python -m edge_ssd.cli ${PY_MS} ms"
printf '{"exe": "%s", "mode": "'"$MODE"'", "size_bytes": %d, "first_token_ms": {"exe": %d, "python": %d}, "bundle": "%s"}\n' \
    "$EXE" "$SIZE" "$EXE_MS" "$PY_MS" "$BUNDLE"
log "all checks passed"
