#!/usr/bin/env python3
"""Two bundles of one pair, side by side on the same prompts in one process: `ar` on the first
bundle, then `spec` on each, in turn on every prompt (the order reversed on every other
prompt; the suffix cache and the acceptance carried between requests cleared before each
request). For export options that change only the draft (`--draft-vocab`, a draft block
size), where two runs one after the other differ by more than the option does.

    python tools/bundle_ab.py --bundles models/qwen2.5-coder-0.5b-1.5b,models/qwen-v64k \
        --prompts tools/function_prompts.jsonl --limit 8 --json OUT.json

Prints per category the median decode tokens/s, the median per-prompt ratio to `ar`, the
drafted tokens' acceptance and the tokens a round, and each bundle's measured draft step.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edge_ssd.hugepages import reexec_with_hugepages


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundles", required=True, help="two bundle folders, comma-separated")
    ap.add_argument("--prompts", type=Path, required=True, help="JSONL: `prompt` or Spec-Bench `turns`, and `category`")
    ap.add_argument("--limit", type=int, default=2, help="prompts per category")
    ap.add_argument("--categories", default="", help="comma-separated (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from edge_ssd.api import Engine
    from edge_ssd.bench import prompts_by_category
    from edge_ssd.errors import EdgeSSDError
    from edge_ssd.machine import describe

    paths = [Path(p) for p in args.bundles.split(",")]
    if len(paths) != 2 or paths[0] == paths[1]:
        ap.error("--bundles takes two different folders")
    try:  # the prompts first: a bad file is one line before two pairs take 10 s to load
        cats, chosen = prompts_by_category(args.prompts, args.limit, args.categories)
        engines = [Engine.load(p) for p in paths]
    except EdgeSSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    variants = {"ar": (engines[0], "ar")} | {f"spec {p}": (e, "spec") for p, e in zip(paths, engines)}
    results = []
    for i, q in enumerate(chosen):
        rec = {"id": q["id"], "category": q["category"]}
        for name, (engine, mode) in list(variants.items())[:: 1 if i % 2 == 0 else -1]:
            engine.suffix_cache.clear()
            engine.learned.clear()
            r = engine.generate(messages=[{"role": "user", "content": q["prompt"]}],
                                max_new_tokens=args.max_new_tokens, mode=mode)
            rec[name] = {k: r.stats[k] for k in ("tokens_per_s", "new_tokens", "rounds", "drafted",
                                                 "accepted", "draft_s", "drafters")}
            rec[name]["text"] = r.text
        results.append(rec)
        print(f"[{i + 1}/{len(chosen)}] {q['category']} {q['id']}: "
              + "  ".join(f"{n} {rec[n]['tokens_per_s']:.1f}" for n in variants), flush=True)

    def table(recs: list) -> dict:
        out = {}
        for n in variants:
            drafted = sum(r[n]["drafted"] for r in recs)
            accepted = sum(r[n]["accepted"] for r in recs)
            out[n] = {"tok_s": statistics.median(r[n]["tokens_per_s"] for r in recs),
                      "x_ar": statistics.median(r[n]["tokens_per_s"] / r["ar"]["tokens_per_s"] for r in recs),
                      "acceptance": accepted / drafted if drafted else 0.0,
                      "tokens_per_round": sum(r[n]["new_tokens"] for r in recs) / max(1, sum(r[n]["rounds"] for r in recs))}
        return out

    summary = {c: table([r for r in results if r["category"] == c]) for c in cats}
    summary["ALL"] = table(results)
    print("| category | n | " + " | ".join(f"{n} tok/s (x ar, acc, tokens a round)" for n in variants) + " |")
    print("|---|---|" + "---|" * len(variants))
    for c, t in summary.items():
        n = len(results) if c == "ALL" else sum(r["category"] == c for r in results)
        print(f"| {c} | {n} | " + " | ".join(
            f"{t[v]['tok_s']:.1f} ({t[v]['x_ar']:.2f}, {t[v]['acceptance']:.2f}, {t[v]['tokens_per_round']:.2f})"
            for v in variants) + " |")
    costs = {str(p): e.costs.to_json() for p, e in zip(paths, engines)}
    print("draft step at the end: " + ", ".join(f"{n} {c['draft_step_s'] * 1e3:.1f} ms" for n, c in costs.items()))
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "costs": costs, "summary": summary,
                                         "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    reexec_with_hugepages()
    sys.exit(main())
