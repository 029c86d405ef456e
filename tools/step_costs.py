#!/usr/bin/env python3
"""The three numbers that decide whether speculation pays, for one bundle on this device:
draft step, verify(K+1) and decode(1), at 200 and 1,000 tokens of context; plus how far a
lone row's logits drift from the same row computed among several (the --exact question).

    python tools/step_costs.py --bundle models/qwen2.5-coder-0.5b-1.5b [--threads 2] [--rows 1-9] [--reps 7]
        [--stat median|min] [--json OUT]

rows = K+1: `--rows 1-9` prices verify(K+1) for every K = 1..8. `--batch 2,4,8` also times
one-row steps of that many sequences together (each with its own 200-token past: what
continuous batching runs, batching.py) beside the same number of rows of one sequence.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from edge_ssd.bench import cpu_clock, others_cpu_share
from edge_ssd.bundle import ModelEntry, load_bundle
from edge_ssd.hugepages import reexec_with_hugepages
from edge_ssd.model import OnnxLM

ROWS = (1, 2, 3, 5, 9)


STATS = {"median": np.median, "min": np.min}   # min of many reps: the uncontended cost on a shared machine


def timed(lm: OnnxLM, ctx: int, rows: int, reps: int, rng: np.random.Generator, stat: str = "median") -> float:
    lm.reset()
    lm.forward(rng.integers(100, 20000, ctx).tolist())
    ts = []
    for _ in range(reps + 1):
        lm.truncate(ctx)
        ids = rng.integers(100, 20000, rows).tolist()
        t0 = time.perf_counter()
        lm.forward(ids, keep=rows)
        ts.append(time.perf_counter() - t0)
    return float(STATS[stat](ts[1:]))


def timed_batch(entry: ModelEntry, threads: int, ctx: int, sizes: tuple, reps: int, rng: np.random.Generator,
                stat: str) -> dict:
    """ms of one batched step of n sequences (one row each, `ctx` tokens of past each), per n."""
    lm = OnnxLM(entry, threads=threads, max_context=ctx + 32, slots=max(sizes))
    for s in range(max(sizes)):
        lm.forward(rng.integers(100, 20000, ctx).tolist(), slot=s)
    out = {}
    for n in sizes:
        ts = []
        for _ in range(reps + 1):
            t0 = time.perf_counter()
            lm.step(list(range(n)), rng.integers(100, 20000, n).tolist())
            ts.append(time.perf_counter() - t0)
            for s in range(n):
                lm.truncate(ctx, s)
        out[n] = 1000 * float(STATS[stat](ts[1:]))
    return out


def row_drift(lm: OnnxLM, rng: np.random.Generator, past: int = 100, n: int = 8) -> float:
    """Max |logit| difference between one-at-a-time and all-at-once evaluation of n tokens."""
    ids = rng.integers(100, 20000, past + n).tolist()
    lm.reset()
    lm.forward(ids[:past])
    together = lm.forward(ids[past:], keep=n).copy()
    lm.truncate(past)
    alone = np.stack([lm.forward([t])[0].copy() for t in ids[past:]])
    return float(np.abs(together - alone).max())


def parse_rows(spec: str) -> tuple:
    """'1,2,3,5,9' or '1-9' -> row counts."""
    lo, dash, hi = spec.partition("-")
    return tuple(range(int(lo), int(hi) + 1)) if dash else tuple(int(x) for x in spec.split(","))


def measure(entry: ModelEntry, threads: int, reps: int = 7, contexts=(200, 1000), rows=ROWS,
            stat: str = "median") -> dict:
    lm = OnnxLM(entry, threads=threads, max_context=max(contexts) + 32)
    rng = np.random.default_rng(0)
    out = {"rows_ms": {}, "decode_ms": {}}
    for ctx in contexts:
        out["decode_ms"][ctx] = 1000 * timed(lm, ctx, 1, reps, rng, stat)
    for r in rows:
        out["rows_ms"][r] = 1000 * timed(lm, contexts[0], r, reps, rng, stat)
    out["row_drift"] = row_drift(lm, rng)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--stat", choices=sorted(STATS), default="median",
                    help="of the reps; min (with many reps) when others share the machine")
    ap.add_argument("--rows", type=parse_rows, default=ROWS, help="row counts to time, e.g. 1,2,3,5,9 or 1-9")
    ap.add_argument("--batch", type=parse_rows, default=(), help="sequences per batched one-row step, e.g. 2,4,8")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = tuple(sorted(set(args.rows) | {1, 5}))   # the summary line needs decode(1) and verify(5)
    b = load_bundle(args.bundle)
    clock = cpu_clock()
    res = {m.role: measure(m, args.threads, args.reps, rows=rows, stat=args.stat)
           for m in (b.target, b.draft) if m is not None}
    if args.batch:
        res["target"]["batch_ms"] = timed_batch(b.target, args.threads, 200, args.batch, args.reps,
                                                np.random.default_rng(1), args.stat)
    others = others_cpu_share(clock, cpu_clock())
    t = res["target"]
    print(f"{'model':<8}{'decode@200':>12}{'decode@1000':>13}" + "".join(f"{'rows=' + str(r):>9}" for r in rows)
          + f"{'row drift':>11}")
    for role, m in res.items():
        print(f"{role:<8}{m['decode_ms'][200]:>10.1f}ms{m['decode_ms'][1000]:>11.1f}ms"
              + "".join(f"{m['rows_ms'][r]:>7.1f}ms" for r in rows) + f"{m['row_drift']:>11.3g}")
    print(f"verify(5)/decode(1) = {t['rows_ms'][5] / t['rows_ms'][1]:.2f}x; "
          f"decode@1000/decode@200 = {t['decode_ms'][1000] / t['decode_ms'][200]:.2f}x", end="")
    top = max(rows)
    if top > 1:
        print(f"; each verify row past the first: {(t['rows_ms'][top] - t['rows_ms'][1]) / (top - 1):.1f} ms", end="")
    if "draft" in res:
        print(f"; draft step/target step = {res['draft']['rows_ms'][1] / t['rows_ms'][1]:.2f}x")
    else:
        print()
    for n, ms in t.get("batch_ms", {}).items():
        one = t["rows_ms"].get(n)
        print(f"target: {n} sequences x 1 row together {ms:.1f} ms" + (f" (1 sequence x {n} rows: {one:.1f} ms)" if one else "")
              + f"; {n / ms * 1000:.1f} tokens/s against {1000 / t['rows_ms'][1]:.1f} alone")
    print(f"other processes took {others:.0%} of the CPUs meanwhile (above a few %, these figures are noise)")
    if args.json:
        args.json.write_text(json.dumps({"bundle": str(b.path), "threads": args.threads, "stat": args.stat,
                                         "reps": args.reps, "others_cpu_share": others,
                                         **res}, indent=1))


if __name__ == "__main__":
    reexec_with_hugepages()  # measure what the edge-ssd command runs (edge_ssd/hugepages.py)
    main()
