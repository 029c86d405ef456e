#!/usr/bin/env python3
"""Where one decode step of a bundle's model goes, op by op (ONNX Runtime's own profiler).

    python tools/op_profile.py --bundle models/qwen2.5-coder-0.5b-1.5b [--role draft] \\
        [--rows 1] [--context 200] [--steps 40] [--threads 2] [--stat median|min] [--json OUT]

Times single-token steps at a fixed context (as tools/step_costs.py does), first without the
profiler (the reference step), then with `SessionOptions.enable_profiling`, and splits each
profiled run into op groups: the int4 matmuls of the layers (q/k/v, o, gate/up, down), the LM
head, attention (GroupQueryAttention), norms, the rest, and what lies between the kernels
(ONNX Runtime's own per-node overhead). For each matmul group it prints the weight bytes it
streams per step and the rate that implies, which says whether a group is bandwidth-bound or
slower than the memory allows.
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import onnx

import edge_ssd.model as model_mod
from edge_ssd.bench import cpu_clock, others_cpu_share
from edge_ssd.bundle import ModelEntry, load_bundle
from edge_ssd.hugepages import reexec_with_hugepages
from edge_ssd.model import OnnxLM

STATS = {"median": np.median, "min": np.min}   # min over runs: the uncontended cost on a shared machine
ONNX_BYTES = {1: 4, 2: 1, 3: 1, 5: 2, 6: 4, 7: 8, 10: 2, 11: 8, 16: 2, 21: 1, 22: 1}  # TensorProto type -> bytes


@contextmanager
def profiled_sessions(prefix: str):
    """Sessions created inside get ONNX Runtime's profiler (the runtime has no switch for it:
    a profile is a diagnosis, not a mode)."""
    original = model_mod.session_options

    def with_profiling(threads: int):
        so = original(threads)
        so.enable_profiling = True
        so.profile_file_prefix = prefix
        return so

    model_mod.session_options = with_profiling
    try:
        yield
    finally:
        model_mod.session_options = original


def group_of(node: str, op: str) -> str:
    """The op group a (possibly fused) node belongs to, from the exporter's node names."""
    if op in ("ReduceSum", "MatMul", "Sub") and ("offsets" in node or op != "MatMul"):
        return "kept Q4_K: block sums, offsets MatMul, Sub"
    if op == "MatMulNBits":
        if node.startswith("lm_head"):
            return "LM head (MatMulNBits)"
        for part, label in (("qkv_proj", "q/k/v"), ("o_proj", "o"), ("gate_up_proj", "gate/up"), ("down_proj", "down")):
            if part in node:
                return f"layers: {label} (MatMulNBits)"
        return "other MatMulNBits"
    if op == "GroupQueryAttention":
        return "attention (GroupQueryAttention)"
    if "LayerNormalization" in op:
        return "norms"
    if op == "Gather":
        return "embedding (Gather)"
    return "rest (elementwise, split, slice)"


def streamed_bytes(graph_path: Path) -> dict:
    """Weight bytes a node reads per step: its initializers (matmul weights, scales, norms).
    Gather reads one row and attention its cos/sin rows, so those count nothing here."""
    g = onnx.load(str(graph_path), load_external_data=False).graph
    size = {t.name: int(np.prod(t.dims, dtype=np.int64)) * ONNX_BYTES.get(t.data_type, 4) for t in g.initializer}
    out = {}
    for n in g.node:
        if n.op_type not in ("Gather", "GroupQueryAttention"):
            out[n.name] = sum(size.get(i, 0) for i in set(n.input))
    return out


def step(lm: OnnxLM, ctx: int, token: int, rows: int = 1) -> float:
    """One forward of `rows` tokens (1: a decode step; K+1: a verification) at `ctx` tokens of context."""
    lm.truncate(ctx)
    t0 = time.perf_counter()
    lm.forward([token + i for i in range(rows)], keep=rows)
    return time.perf_counter() - t0


def reference_ms(entry: ModelEntry, threads: int, ctx: int, steps: int, stat: str, rows: int) -> float:
    lm = OnnxLM(entry, threads=threads, max_context=ctx + 32)
    lm.forward((np.arange(ctx) % 5000 + 100).tolist())
    ts = [step(lm, ctx, 1000 + i, rows) for i in range(steps + 3)]
    return 1000 * float(STATS[stat](ts[3:]))


def profile_runs(entry: ModelEntry, threads: int, ctx: int, steps: int, folder: Path, rows: int) -> tuple:
    """(per-run kernel events, per-run model_run durations) for `steps` runs of `rows` tokens."""
    with profiled_sessions(str(folder / entry.role)):
        lm = OnnxLM(entry, threads=threads, max_context=ctx + 32)
    lm.forward((np.arange(ctx) % 5000 + 100).tolist())
    for i in range(steps + 3):
        step(lm, ctx, 1000 + i, rows)
    trace = json.loads(Path(lm.session.end_profiling()).read_text())
    runs = sorted((e for e in trace if e.get("name") == "model_run"), key=lambda e: e["ts"])[-steps:]
    kernels = [e for e in trace if e.get("cat") == "Node" and e.get("name", "").endswith("_kernel_time")]
    per_run = []
    for r in runs:
        lo, hi = r["ts"], r["ts"] + r["dur"]
        per_run.append([e for e in kernels if lo <= e["ts"] <= hi])
    return per_run, [r["dur"] / 1000 for r in runs]


def summarize_profile(per_run: list, run_ms: list, nbytes: dict, stat: str = "median") -> dict:
    """Per op group: ms per step (per node, the median or min over the runs, summed), share of
    the step, weight bytes and the rate they stream at; the gap between kernels is the step
    (same statistic) less the kernels."""
    per_node = defaultdict(lambda: defaultdict(float))   # node -> run -> µs
    op_of = {}
    for i, events in enumerate(per_run):
        for e in events:
            node = e["name"][: -len("_kernel_time")]
            per_node[node][i] += e["dur"]
            op_of[node] = e["args"].get("op_name", "?")
    f = STATS[stat]
    groups = defaultdict(lambda: {"ms": 0.0, "bytes": 0, "nodes": 0})
    for node, runs in per_node.items():
        g = groups[group_of(node, op_of[node])]
        g["ms"] += float(f(list(runs.values()))) / 1000
        g["bytes"] += nbytes.get(node, 0)
        g["nodes"] += 1
    run = float(f(run_ms))
    kernels = sum(g["ms"] for g in groups.values())
    out = {name: {"ms": g["ms"], "share": g["ms"] / run, "nodes": g["nodes"], "weight_bytes": g["bytes"],
                  "gb_per_s": g["bytes"] / g["ms"] / 1e6 if g["bytes"] > 1e6 and g["ms"] else None}
           for name, g in sorted(groups.items(), key=lambda kv: -kv[1]["ms"])}
    out["between kernels (ORT)"] = {"ms": run - kernels, "share": (run - kernels) / run, "nodes": 0,
                                    "weight_bytes": 0, "gb_per_s": None}
    return {"model_run_ms": run, "stat": stat, "groups": out}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--role", choices=["draft", "target"], default="draft")
    ap.add_argument("--context", type=int, default=200)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rows", type=int, default=1, help="tokens per run: 1 = decode step, K+1 = verify(K+1)")
    ap.add_argument("--stat", choices=sorted(STATS), default="median",
                    help="per node over the runs; min (with many steps) when others share the machine")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    entry = getattr(load_bundle(args.bundle), args.role)
    clock = cpu_clock()
    ref = reference_ms(entry, args.threads, args.context, args.steps, args.stat, args.rows)
    with tempfile.TemporaryDirectory() as tmp:
        per_run, run_ms = profile_runs(entry, args.threads, args.context, args.steps, Path(tmp), args.rows)
    res = summarize_profile(per_run, run_ms, streamed_bytes(entry.graph), args.stat)
    res.update(others_cpu_share=others_cpu_share(clock, cpu_clock()), role=args.role, rows=args.rows,
               context=args.context, steps=args.steps, threads=args.threads, step_ms=ref)
    total_bytes = sum(g["weight_bytes"] for g in res["groups"].values())
    print(f"{args.role} step of {args.rows} row(s) @{args.context}: {ref:.2f} ms unprofiled, "
          f"{res['model_run_ms']:.2f} ms per profiled run; {total_bytes / 1e6:.0f} MB of weights streamed per step "
          f"({total_bytes / ref / 1e6:.1f} GB/s over the whole step)")
    print(f"other processes took {res['others_cpu_share']:.0%} of the CPUs meanwhile (above a few %: noise)")
    print(f"{'group':<34}{'ms':>7}{'share':>7}{'nodes':>6}{'MB':>8}{'GB/s':>7}")
    for name, g in res["groups"].items():
        rate = f"{g['gb_per_s']:.1f}" if g["gb_per_s"] else ""
        print(f"{name:<34}{g['ms']:>7.2f}{g['share']:>7.1%}{g['nodes']:>6}{g['weight_bytes'] / 1e6:>8.1f}{rate:>7}")
    if args.json:
        args.json.write_text(json.dumps(res, indent=1))


if __name__ == "__main__":
    reexec_with_hugepages()  # measure what the edge-ssd command runs (edge_ssd/hugepages.py)
    main()
