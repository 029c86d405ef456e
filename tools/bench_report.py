#!/usr/bin/env python3
"""Render an `edge-ssd bench --json` file as a Markdown table per category (and as charts).

    python tools/bench_report.py bench.json [--baseline ar] [--chart OUT.png]

--chart writes OUT.png (tokens/s, speed-up, acceptance per category) and OUT-drafts.png
(acceptance by draft position, K per round); it needs the charts extra (matplotlib).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from edge_ssd.errors import EdgeSSDError


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("json", type=Path)
    ap.add_argument("--baseline", default="ar")
    ap.add_argument("--chart", type=Path, help="also write the charts: OUT.png and OUT-drafts.png")
    args = ap.parse_args()
    d = json.loads(args.json.read_text())
    if args.chart:
        from edge_ssd.charts import render

        try:
            for path in render(d, args.chart, args.baseline):
                print(f"wrote {path}", file=sys.stderr)
        except EdgeSSDError as e:
            raise SystemExit(f"error: {e}") from None
    modes, table = d["modes"], d["summary"]
    others = [m for m in modes if m != args.baseline]
    head = ["category", "n", f"{args.baseline} tok/s"] + [f"{m} tok/s (x, acc, len)" for m in others]
    print("| " + " | ".join(head) + " |")
    print("|" + "---|" * len(head))
    for cat in sorted(table, key=lambda c: (c == "ALL", c)):
        row = table[cat]
        cells = [f"**{cat}**" if cat == "ALL" else cat, str(row["prompts"]), f"{row[args.baseline]['tokens_per_s']:.1f}"]
        for m in others:
            r = row[m]
            extra = f", {r['acceptance_rate']:.2f}, {r['mean_accepted_len']:.2f}" if "acceptance_rate" in r else ""
            cells.append(f"{r['tokens_per_s']:.1f} ({r.get('speedup', 0):.2f}x{extra})")
        print("| " + " | ".join(cells) + " |")
    res = d["results"]
    for m in others:
        same = [r["identical"][m] for r in res if isinstance(r.get("identical"), dict) and m in r["identical"]]
        if not same:
            continue
        div = [r["divergence"][m] for r in res if m in r.get("divergence", {})]
        line = f"\n`{m}`: output identical to `{args.baseline}` on {sum(same)}/{len(same)} prompts."
        if div:
            pos = sorted(x["first"] for x in div)
            gaps = sorted(x["top2_margin"] for x in div)
            line += (f" Where they part: first differing token at {pos[0]}..{pos[-1]} (median {pos[len(pos) // 2]});"
                     f" the target's top-2 logit gap there {gaps[0]:.3f}..{gaps[-1]:.3f} (median {gaps[len(gaps) // 2]:.3f}).")
        print(line)
    print(f"\nPeak RSS of the benchmark process: {d['peak_rss_bytes'] / 2**30:.2f} GiB.")


if __name__ == "__main__":
    main()
