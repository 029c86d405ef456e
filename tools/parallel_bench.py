#!/usr/bin/env python3
"""Parallel speculation, measured: `parallel` against `spec` against `ar`, and the speculation
cache's hit rate, on real prompts.

Three parts, one command each:

  timing  Side by side on this device, per prompt, alternating: `ar` and `spec` on an engine
          with every core for each model (their best placement), `parallel` on a second engine
          with a thread split (--split T+D: target T threads, draft D threads, running at once).
          Tokens/s, speedup over `ar`, acceptance, hit rate, time hidden, peak RSS.

  hits    The cache's hit rate with no timing in it: every round's fan-out is drafted to the
          end before the lookup (ParallelDrafter wait_all). From the rank of the hit branch
          per round, the hit rate for every fan-out 1..F. With the measured draft step d and
          a verify time v per round, a trace-driven cost model then predicts `parallel` over
          `spec` for a target elsewhere (a GPU) and the draft on this CPU (see predict()).
          A prediction, not a measurement: labelled so wherever it is quoted.

  contention  What running both at once costs each: verify(K+1) and a draft step alone, and
          each while the other model runs in a second thread (--split placement).

    python tools/parallel_bench.py timing --bundle models/qwen2.5-coder-0.5b-1.5b \\
        --prompts ../shared/bench/spec_bench_questions.jsonl --limit 1 --split 1+1 --json OUT
    python tools/parallel_bench.py hits --bundle models/qwen2.5-coder-0.5b-1.5b \\
        --prompts ../shared/bench/spec_bench_questions.jsonl --limit 2 --fanout 8 --json OUT
    python tools/parallel_bench.py contention --bundle models/qwen2.5-coder-0.5b-1.5b --split 1+1 \
        --json OUT
"""
from __future__ import annotations

import argparse
import json
import os
from collections import defaultdict
from pathlib import Path

from edge_ssd.api import Engine
from edge_ssd.bench import fresh_generate, print_table, read_prompts, summarize
from edge_ssd.decode import DecodeConfig, decode
from edge_ssd.drafters import ModelDrafter
from edge_ssd.hugepages import reexec_with_hugepages
from edge_ssd.memory import peak_rss_bytes
from edge_ssd.parallel import ParallelDrafter
from edge_ssd.progress import Bar
from edge_ssd.stats import Stats
from edge_ssd.text import build_prompt

VERIFY_MS = (5.0, 10.0, 20.0, 40.0, 80.0)   # assumed verify times per round elsewhere (flat in K)


def timing(args) -> dict:
    cores = os.cpu_count() or 1
    t, d = (int(x) for x in args.split.split("+"))
    seq_engine = Engine.load(args.bundle, provider="cpu", threads=cores, draft_threads=cores)
    par_engine = Engine.load(args.bundle, provider="cpu", threads=t, draft_threads=d)
    if not par_engine.parallel_pays():
        raise SystemExit(f"with --split {args.split} parallel would run as spec here (cores or step costs: "
                         "see Engine.parallel_pays)")
    prompts = read_prompts(args.prompts, args.limit)
    par = f"parallel {args.split}"
    runs = [("ar", seq_engine, dict(mode="ar")), ("spec", seq_engine, dict(mode="spec")),
            (par, par_engine, dict(mode="parallel", fanout=args.fanout)),
            (f"spec {args.split}", par_engine, dict(mode="spec"))]
    results, bar = [], Bar("timing", len(prompts) * len(runs), "runs")
    for p in prompts:
        rec = {"category": p["category"], "modes": {}, "identical": {}}
        ids = {}
        for name, engine, kw in runs:
            r = fresh_generate(engine, p["prompt"], max_new_tokens=args.max_new_tokens, **kw)
            rec["modes"][name], ids[name] = r.stats, r.token_ids
            bar.update(1)
        rec["identical"] = {name: v == ids["ar"] for name, v in ids.items() if name != "ar"}
        results.append(rec)
    bar.close()
    names = [name for name, _, _ in runs]
    table = summarize(results, names)  # tokens/s, speedup over ar, acceptance, identical share
    for cat, row in table.items():     # and the speculation cache's hit rate
        st = [r["modes"][par]["parallel"] for r in results if cat in ("ALL", r["category"])]
        row[par]["hit_rate"] = sum(x["hits"] for x in st) / max(1, sum(x["rounds"] for x in st))
        row[par]["hidden_s"] = sum(x["hidden_s"] for x in st)
    print_table(table, names)
    return {"split": args.split, "fanout": args.fanout, "threads": {"sequential": seq_engine.threads(),
            "parallel": par_engine.threads()}, "costs": seq_engine.costs.to_json(), "summary": table,
            "results": results, "peak_rss_bytes": peak_rss_bytes()}


def predict(trace: list, k_rounds: list, fanout: int, d: float, v: float) -> float:
    """Predicted speedup of `parallel` over `spec` for one request's trace, mirroring what the
    drafter does when verification (v seconds) ends: a finished branch is used at once; the
    branch being drafted is waited for; a branch not started yet is a miss (wait for the
    worker's current step, d/2 on average, then draft the round as `spec` does)."""
    spec = sum(v + k * d for k in k_rounds)
    par = spec
    for _k_prev, rank, ready, k_next, _j, own in trace:
        par -= k_next * d
        if 0 <= rank < fanout and (ready - own) * d < v:
            par += max(0.0, ready * d - v)
        else:
            par += 0.5 * d + k_next * d
    return spec / par if par > 0 else 0.0


def hits(args) -> dict:
    engine = Engine.load(args.bundle, provider="cpu")
    prompts = read_prompts(args.prompts, args.limit)
    d = engine.costs.draft_step
    per_cat = defaultdict(lambda: {"traces": [], "k": []})
    bar = Bar("hits", len(prompts), "prompts")
    for p in prompts:
        par = ParallelDrafter(ModelDrafter(engine.draft, engine.target.entry.vocab_size), engine._pool,
                              args.fanout, wait_all=True)
        ids = build_prompt(engine.tokenizer, p["prompt"], None, raw=False)
        st = Stats("parallel")
        cfg = DecodeConfig(max_new_tokens=args.max_new_tokens, k=args.k, eos_ids=engine.tokenizer.eos_ids)
        for _ in decode(engine.target, par, ids, cfg, st, engine.costs, learned=engine.learned):
            pass
        for key in (p["category"], "ALL"):
            per_cat[key]["traces"].append(par.trace)
            per_cat[key]["k"].append(st.k_chosen)
        bar.update(1)
    bar.close()
    table = {}
    for cat, data in per_cat.items():
        entries = [e for tr in data["traces"] for e in tr]
        n = max(1, len(entries))
        row = {"lookups": len(entries),
               "hit_rate": {f: sum(0 <= e[1] < f for e in entries) / n for f in range(1, args.fanout + 1)},
               "rejection_hit_share": sum(0 <= e[4] < e[0] for e in entries) / n,
               "predicted_speedup_over_spec": {}}
        for v_ms in VERIFY_MS:
            best = {}
            for f in range(1, args.fanout + 1):
                ratios = [predict(tr, ks, f, d, v_ms / 1000) for tr, ks in zip(data["traces"], data["k"])]
                best[f] = sum(ratios) / len(ratios)
            row["predicted_speedup_over_spec"][f"v={v_ms:g}ms"] = best
        table[cat] = row
    print(f"draft step d = {d * 1000:.1f} ms (this CPU). Hit rate by fan-out; predicted parallel/spec "
          f"(a cost model, not a measurement) for a verify of v ms on another device:")
    for cat in sorted(table, key=lambda c: (c == "ALL", c)):
        r = table[cat]
        hr = " ".join(f"{r['hit_rate'][f]:.2f}" for f in (1, 2, 4, args.fanout))
        pred = " ".join(f"{v}:{max(x.values()):.2f}" for v, x in r["predicted_speedup_over_spec"].items())
        print(f"{cat:<16} lookups {r['lookups']:>4}  hits@1,2,4,{args.fanout} {hr}  {pred}")
    return {"fanout": args.fanout, "draft_step_s": d, "verify_ms_assumed": VERIFY_MS, "summary": table,
            "costs": engine.costs.to_json(), "peak_rss_bytes": peak_rss_bytes()}


def contention(args) -> dict:
    """What running both models at once costs each: verify(K+1) and a draft step, alone and
    while the other model runs in a second thread, at the --split placement."""
    import threading
    import time

    import numpy as np

    from edge_ssd.bundle import load_bundle
    from edge_ssd.model import OnnxLM

    t, d = (int(x) for x in args.split.split("+"))
    bundle = load_bundle(args.bundle)
    target, draft = OnnxLM(bundle.target, "cpu", t, max_context=1024), OnnxLM(bundle.draft, "cpu", d, max_context=1024)
    ids = (np.arange(300) % 1000 + 100).tolist()
    target.forward(ids)
    draft.forward(ids)

    def step(lm: OnnxLM, rows: int) -> float:
        lm.truncate(300)
        t0 = time.perf_counter()
        lm.forward(ids[:rows], keep=rows)
        return time.perf_counter() - t0

    def alone(lm: OnnxLM, rows: int, n: int = 30) -> float:
        step(lm, rows)
        return float(np.median([step(lm, rows) for _ in range(n)]))

    def beside(lm: OnnxLM, rows: int, other: OnnxLM, other_rows: int, n: int = 30) -> float:
        stop = threading.Event()

        def spin() -> None:
            while not stop.is_set():
                step(other, other_rows)

        th = threading.Thread(target=spin)
        th.start()
        try:
            time.sleep(0.05)
            return float(np.median([step(lm, rows) for _ in range(n)]))
        finally:
            stop.set()
            th.join()

    k = args.k or 3
    k1 = k + 1
    out = {"split": args.split, "k": k,
           "verify_alone_ms": 1000 * alone(target, k1), "draft_alone_ms": 1000 * alone(draft, 1),
           "verify_beside_draft_ms": 1000 * beside(target, k1, draft, 1),
           "draft_beside_verify_ms": 1000 * beside(draft, 1, target, k1)}
    print(f"split {args.split}: verify({k1}) {out['verify_alone_ms']:.1f} ms alone, "
          f"{out['verify_beside_draft_ms']:.1f} ms with the draft running; draft step "
          f"{out['draft_alone_ms']:.1f} ms alone, {out['draft_beside_verify_ms']:.1f} ms beside verification")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("part", choices=["timing", "hits", "contention"])
    ap.add_argument("--bundle", required=True)
    ap.add_argument("--prompts", type=Path, default=None, help="timing, hits: JSONL prompts (Spec-Bench)")
    ap.add_argument("--limit", type=int, default=1, help="prompts per category")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--split", default="1+1", help="timing: target+draft threads for parallel")
    ap.add_argument("--fanout", type=int, default=4)
    ap.add_argument("--k", type=int, default=None,
                    help="contention: proposals per verify (default 3); hits: a fixed K (default: auto, as "
                         "the runtime chooses it, which on a loaded machine may decline the model)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    if args.part != "contention" and args.prompts is None:
        ap.error(f"{args.part} needs --prompts")
    out = {"timing": timing, "hits": hits, "contention": contention}[args.part](args)
    if args.json:
        args.json.write_text(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    reexec_with_hugepages()  # measure what the edge-ssd command runs (edge_ssd/hugepages.py)
    raise SystemExit(main())
