#!/usr/bin/env python3
"""Is `--exact` valid on this device? Re-measure, with this machine's kernels, what the exporter
recorded on its own machine (`validation.<role>.rows_invariant` in pair.json): whether a row's
logits are bit-identical whatever the number (>= 2) of rows computed with it.

    python tools/rows_invariant.py --bundle DIR [--role target|draft|both] [--threads N]

Needs only the runtime (it uses the exporter's own check, edge_ssd_export/validate.py, which
imports no torch). An int4 kernel for another CPU (NEON on arm64, AVX2/AVX-512 on x86-64) may
answer differently from the machine that exported the bundle.
"""
from __future__ import annotations

import argparse
import json
import sys
import time


from edge_ssd.bundle import load_bundle
from edge_ssd.model import OnnxLM, rows_invariant_here


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--role", default="both", choices=["target", "draft", "both"])
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    out = {}
    for role in (["target", "draft"] if args.role == "both" else [args.role]):
        entry = getattr(bundle, role)
        if entry is None:
            continue
        t0 = time.perf_counter()
        lm = OnnxLM(entry, threads=args.threads or 1, max_context=96)
        here = rows_invariant_here(lm)
        recorded = bundle.manifest.get("validation", {}).get(role, {}).get("rows_invariant")
        out[role] = {"quant": entry.quant, "rows_invariant_here": here, "recorded_at_export": recorded,
                     "seconds": round(time.perf_counter() - t0, 1)}
        print(f"{role}: rows invariant here: {here}; recorded at export: {recorded} "
              f"({entry.quant.get('weights')} block {entry.quant.get('block_size')})", file=sys.stderr)
    print(json.dumps(out))
    return 0 if all(v["rows_invariant_here"] == v["recorded_at_export"] for v in out.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
