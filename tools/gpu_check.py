#!/usr/bin/env python3
"""The GPU check's measurements (run by tools/gpu_check.sh): `ar`, `spec` and `parallel`, with
the target on the GPU and the draft on the CPU, then on the GPU; tokens/s, acceptance, the
calibrated step costs, and whether greedy output is token-for-token `ar`'s.

    python tools/gpu_check.py --bundle models/qwen2.5-coder-0.5b-1.5b-fp16 [--provider cuda]
        [--max-new-tokens 128] [--time-budget 420] [--json OUT]

--provider cpu runs the same script on the CPU (the dry run: both placements are then
cpu/cpu). Every provider is strict: a silent CPU fallback is an error, not a result.
Greedy identity with `ar` is reported, not asserted: without --exact, a verify step and a
one-token step may round differently (near-ties), on a GPU as on a CPU.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnxruntime as ort

from edge_ssd.api import Engine

PROMPTS = [   # short, mixed: code (drafts well), prose (drafts less), a repetitive one (n-gram hits)
    ("code", "Write a Python function that returns the n-th Fibonacci number, with a docstring."),
    ("code", "def quicksort(xs):"),
    ("chat", "Explain in three sentences what a KV cache is."),
    ("repeat", "List the numbers from 1 to 30, one per line, each followed by its square."),
]
MODES = ("ar", "spec", "parallel")


def placements(provider: str) -> list:
    return [(f"target {provider} / draft cpu", dict(provider=provider, draft_provider="cpu")),
            (f"target {provider} / draft {provider}", dict(provider=provider, draft_provider=provider))]


def run_placement(bundle: str, name: str, kw: dict, args, deadline: float) -> dict:
    t0 = time.perf_counter()
    engine = Engine.load(bundle, strict_provider=True, exact=args.exact, **kw)
    load_s = time.perf_counter() - t0
    out = {"placement": name, "providers": engine.providers(), "threads": engine.threads(), "load_s": round(load_s, 2),
           "step_costs_ms": {"draft_step": round(1000 * engine.costs.draft_step, 3),
                             **{f"verify_{r}": round(1000 * s, 3) for r, s in sorted(engine.costs.verify.items())}},
           "parallel_pays": engine.parallel_pays(), "prompts": []}
    print(f"\n## {name}: providers {engine.providers()}, loaded in {load_s:.1f} s", flush=True)
    c = out["step_costs_ms"]
    print("   step costs (ms, 128-token past): draft step {draft_step:.2f}, verify(1) {verify_1:.2f}, "
          "verify(5) {verify_5:.2f}, verify(9) {verify_9:.2f}".format(**c), flush=True)
    print(f"   parallel pays here: {out['parallel_pays']} (otherwise --mode parallel runs as spec)", flush=True)
    for mode in MODES:   # warm-up: first CUDA runs allocate and tune
        engine.generate(PROMPTS[0][1], mode=mode, max_new_tokens=8)
    for cat, prompt in PROMPTS:
        if time.perf_counter() > deadline:
            print(f"   time budget reached: {len(out['prompts'])} of {len(PROMPTS)} prompts", flush=True)
            out["truncated"] = True
            break
        rec = {"category": cat, "modes": {}}
        ids = {}
        for mode in MODES:
            r = engine.generate(prompt, mode=mode, max_new_tokens=args.max_new_tokens)
            s = r.stats
            ids[mode] = r.token_ids
            par = s.get("parallel") or {}
            rec["modes"][mode] = {"tokens_per_s": s["tokens_per_s"], "new_tokens": s["new_tokens"],
                                  "acceptance_rate": s.get("acceptance_rate"), "mean_k": s.get("mean_k"),
                                  "mean_accepted_len": s.get("mean_accepted_len"),
                                  "ran_as": "parallel" if par else ("spec" if mode != "ar" else "ar"),
                                  "hit_rate": par.get("hit_rate"), "identical_to_ar": r.token_ids == ids["ar"]}
        out["prompts"].append(rec)
    out["summary"] = summarize(out["prompts"])
    for mode, row in out["summary"].items():
        print(f"   {mode:9s} {row['tokens_per_s']:8.1f} tok/s  {row['speedup']:5.2f}x ar  acceptance "
              f"{row['acceptance']:.2f}  mean K {row['mean_k']:.2f}  identical to ar {row['identical']}  ran as {row['ran_as']}", flush=True)
    del engine
    return out


def summarize(prompts: list) -> dict:
    out = {}
    for mode in MODES:
        rows = [p["modes"][mode] for p in prompts]
        if not rows:
            continue
        tps = sum(r["tokens_per_s"] for r in rows) / len(rows)
        ar = sum(p["modes"]["ar"]["tokens_per_s"] for p in prompts) / len(prompts)
        acc = [r["acceptance_rate"] for r in rows if r["acceptance_rate"] is not None]
        out[mode] = {"tokens_per_s": tps, "speedup": tps / ar if ar else 0.0,
                     "acceptance": sum(acc) / len(acc) if acc else 0.0,
                     "mean_k": sum(r["mean_k"] or 0.0 for r in rows) / len(rows),
                     "identical": f"{sum(r['identical_to_ar'] for r in rows)}/{len(rows)}",
                     "ran_as": ",".join(sorted({r["ran_as"] for r in rows}))}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--provider", default="cuda", choices=["cuda", "dml", "cpu"])
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--time-budget", type=float, default=420.0, help="seconds for all placements")
    ap.add_argument("--exact", action="store_true", help="--exact decoding (needs a row-invariant target)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    t0 = time.perf_counter()
    print(f"onnxruntime {ort.__version__}, providers {ort.get_available_providers()}", flush=True)
    res = {"bundle": args.bundle, "onnxruntime": ort.__version__, "provider": args.provider,
           "max_new_tokens": args.max_new_tokens, "exact": args.exact, "placements": []}
    places = placements(args.provider)
    for i, (name, kw) in enumerate(places):
        # each placement gets an equal share of what is left
        deadline = time.perf_counter() + (args.time_budget - (time.perf_counter() - t0)) / (len(places) - i)
        res["placements"].append(run_placement(args.bundle, name, kw, args, deadline))
    res["total_s"] = round(time.perf_counter() - t0, 1)
    print(f"\ntotal {res['total_s']} s", flush=True)
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
