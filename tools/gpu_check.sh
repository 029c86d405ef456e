#!/usr/bin/env bash
# The GPU check, prepared: on a machine with an NVIDIA GPU, in under 10 minutes, `ar`, `spec` and
# `parallel` with the target on CUDA and the draft on the CPU, then on CUDA: tokens/s,
# acceptance, the step costs, greedy identity with `ar` (tools/gpu_check.py prints them).
#
#   bash tools/gpu_check.sh --bundle DIR          # an fp16 pair bundle copied to the machine
#   bash tools/gpu_check.sh --export              # export the default pair as fp16 here first
#                                                 #   (needs torch and PyPI; ~5 min on 2 cores)
#   bash tools/gpu_check.sh --tiny                # a tiny random fp16 bundle (needs torch): plumbing only
#   bash tools/gpu_check.sh --dry-run             # here, no GPU: --tiny on the CPU provider, no install
#   options: --wheels DIR (offline: install onnxruntime-gpu from a wheelhouse made with
#            `pip download "onnxruntime-gpu[cuda,cudnn]" -d DIR`), --max-new-tokens N (128),
#            --time-budget S (420, the measurements' share of the 10 minutes), --json OUT, --exact
#
# onnxruntime-gpu: if the python3 here already has CUDAExecutionProvider it is used as is;
# otherwise a venv (build/gpu-venv) gets `onnxruntime-gpu[cuda,cudnn]` (the CUDA and cuDNN
# libraries as pip wheels: 1.31.1, the newest on PyPI in December 2026, asks for CUDA 13 and
# cuDNN 9, so the NVIDIA driver must support CUDA 13), and LD_LIBRARY_PATH points at those
# wheels' libraries. Use an fp16 bundle: onnxruntime's CUDA GroupQueryAttention is, as far as
# we know (not verified), fp16/bf16 only, so an fp32 or int4 bundle's attention would fall
# back to the CPU.
#
# Checked on a CPU only (the dry run, tests/test_device_tools.py). The CUDA path has not run on
# a GPU: see docs/devices.md.
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
PROVIDER=cuda
BUNDLE=
EXPORT=0
TINY=0
DRY=0
WHEELS=
MAX_NEW=128
BUDGET=420
JSON=
EXTRA=()
while [ $# -gt 0 ]; do
    case $1 in
        --bundle) BUNDLE=$2; shift 2 ;;
        --export) EXPORT=1; shift ;;
        --tiny) TINY=1; shift ;;
        --dry-run) DRY=1; TINY=1; PROVIDER=cpu; shift ;;
        --wheels) WHEELS=$2; shift 2 ;;
        --max-new-tokens) MAX_NEW=$2; shift 2 ;;
        --time-budget) BUDGET=$2; shift 2 ;;
        --json) JSON=$2; shift 2 ;;
        --exact) EXTRA+=(--exact); shift ;;
        -h|--help) awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"; exit 0 ;;
        *) echo "unknown argument: $1" >&2; exit 2 ;;
    esac
done
T0=$(date +%s)
log() { printf '[gpu_check %4ds] %s\n' $(( $(date +%s) - T0 )) "$*" >&2; }
die() { log "FAILED: $*"; exit 1; }
TMP=$(mktemp -d "${TMPDIR:-/tmp}/edge-ssd-gpu.XXXXXX")
trap 'rm -rf "$TMP"' EXIT
export EDGE_SSD_CACHE=${EDGE_SSD_CACHE:-$TMP/cache}
[ -n "$BUNDLE" ] || [ "$EXPORT" = 1 ] || [ "$TINY" = 1 ] || die "give --bundle DIR, --export, --tiny or --dry-run"

# ---------------------------------------------------------------------------------------------
PY=python3
if [ "$DRY" = 1 ]; then
    log "dry run: CPU provider, no install"
else
    command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | sed 's/^/GPU: /' >&2 \
        || log "nvidia-smi not found (continuing: onnxruntime will say whether CUDA loads)"
    if python3 -c 'import sys, onnxruntime as o; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null; then
        log "python3's onnxruntime already has CUDA: using it"
    else
        VENV=$REPO/build/gpu-venv
        log "installing onnxruntime-gpu into $VENV"
        [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
        PY=$VENV/bin/python
        src=(); [ -n "$WHEELS" ] && src=(--no-index --find-links "$WHEELS")
        "$PY" -m pip install -q --disable-pip-version-check "${src[@]}" "onnxruntime-gpu[cuda,cudnn]" \
            "numpy>=1.24" "tokenizers>=0.19" "psutil>=5.9" "jinja2>=3.1"
        # the CUDA/cuDNN wheels' libraries, for onnxruntime's provider library to find
        LIBS=$("$PY" - <<'EOF'
import glob, os, site
dirs = {d for s in site.getsitepackages() for d in glob.glob(os.path.join(s, "nvidia", "**", "lib"), recursive=True)}
print(":".join(sorted(dirs)))
EOF
)
        export LD_LIBRARY_PATH=${LIBS}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
    fi
    "$PY" -c 'import sys, onnxruntime as o; p = o.get_available_providers(); print("onnxruntime", o.__version__, p, file=sys.stderr); sys.exit("CUDAExecutionProvider" not in p)' \
        || die "onnxruntime has no CUDAExecutionProvider"
fi

# ---------------------------------------------------------------------------------------------
if [ "$TINY" = 1 ]; then
    BUNDLE=$TMP/tiny-fp16
    log "exporting a tiny random fp16 bundle"
    PYTHONPATH=$REPO python3 tools/tiny_bundle.py "$BUNDLE" --quant fp16 > /dev/null 2> "$TMP/export.log" \
        || { cat "$TMP/export.log" >&2; die "tiny export"; }
elif [ "$EXPORT" = 1 ]; then
    BUNDLE=${BUNDLE:-$REPO/models/qwen2.5-coder-0.5b-1.5b-fp16}
    if [ -f "$BUNDLE/pair.json" ]; then
        log "reusing $BUNDLE"
    else
        log "exporting the default pair as fp16 to $BUNDLE (fetch + export: several minutes)"
        PYTHONPATH=$REPO python3 -m edge_ssd.cli export --pair qwen2.5-coder-0.5b-1.5b --quant fp16 --out "$BUNDLE" \
            || die "export (needs: pip install torch==2.13.0 '.[export]')"
    fi
fi
[ -f "$BUNDLE/pair.json" ] || die "no pair.json in $BUNDLE"
q=$("$PY" -c 'import json,sys; m=json.load(open(sys.argv[1]+"/pair.json"))["models"]; print(m["target"]["quant"]["weights"], (m.get("draft") or {}).get("quant", {}).get("weights"))' "$BUNDLE")
log "bundle $BUNDLE: target/draft weights $q"
case $q in fp16*) ;; *) log "warning: not an fp16 bundle: on CUDA its attention would run on the CPU" ;; esac

# ---------------------------------------------------------------------------------------------
log "measuring (time budget ${BUDGET}s)"
json=${JSON:-$TMP/gpu_check.json}
PYTHONPATH=$REPO timeout $(( ${BUDGET%.*} + 120 )) "$PY" tools/gpu_check.py --bundle "$BUNDLE" --provider "$PROVIDER" \
    --max-new-tokens "$MAX_NEW" --time-budget "$BUDGET" --json "$json" "${EXTRA[@]}"
log "done in $(( $(date +%s) - T0 ))s${JSON:+; results in $JSON}"
