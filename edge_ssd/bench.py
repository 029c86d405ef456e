"""`edge-ssd bench`: decoding modes side by side, in one process, on the same prompts.

For each prompt the modes run one after the other (alternating, so that drift in machine load
hits every mode alike). Prints a table per prompt category and writes every result as JSON.
"""
from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path
from typing import Optional

from .cli_args import engine_from_args
from .errors import EdgeSSDError
from .memory import fmt_bytes, peak_rss_bytes
from .outputs import check_output, replace_when_done
from .progress import Bar
from .request import DEFAULTS


def read_prompts(path: Path, limit: Optional[int] = None, categories: Optional[set] = None) -> list:
    """Plain JSONL with `prompt` (and optional `category`), or Spec-Bench (first of `turns`)."""
    rows, per_cat = [], defaultdict(int)
    try:
        lines = path.read_bytes().splitlines()
    except OSError as e:
        raise EdgeSSDError(f"cannot read prompts from {path}: {e}") from e
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line.decode("utf-8"))
        except (ValueError, RecursionError) as e:  # UnicodeDecodeError is a ValueError
            raise EdgeSSDError(f"{path}:{n}: not a JSON line: {e}") from None
        turns = obj.get("turns") if isinstance(obj, dict) else None
        prompt = obj.get("prompt") if isinstance(obj, dict) else None
        prompt = prompt or (turns[0] if isinstance(turns, list) and turns else None)
        if not isinstance(prompt, str):
            raise EdgeSSDError(f"{path}:{n}: an object with a string `prompt` (or `turns`) is needed")
        cat = obj.get("category", "all")
        if categories and cat not in categories:
            continue
        if limit is not None and per_cat[cat] >= limit:
            continue
        per_cat[cat] += 1
        rows.append({"id": obj.get("question_id", n), "category": cat, "prompt": prompt})
    return rows


def summarize(results: list, modes: list) -> dict:
    """Per category and overall: tokens/s per mode (total tokens / total decode time), speedups."""
    by_cat = defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r)
        by_cat["ALL"].append(r)
    table = {}
    for cat, rs in by_cat.items():
        row = {"prompts": len(rs)}
        for m in modes:
            st = [r["modes"][m] for r in rs]
            toks = sum(max(0, s["new_tokens"] - 1) for s in st)
            secs = sum(s["decode_s"] for s in st)
            row[m] = {"tokens_per_s": toks / secs if secs else 0.0}
            drafted = sum(s["drafted"] for s in st)
            if drafted:
                spec_rounds = sum(sum(1 for k in s["k_chosen"] if k > 0) for s in st)
                row[m]["acceptance_rate"] = sum(s["accepted"] for s in st) / drafted
                row[m]["mean_accepted_len"] = sum(s["accepted"] for s in st) / max(1, spec_rounds)
        base = row[modes[0]]["tokens_per_s"]
        for m in modes[1:]:
            row[m]["speedup"] = row[m]["tokens_per_s"] / base if base else 0.0
        for m in modes[1:]:
            same = [r["identical"][m] for r in rs if m in r.get("identical", {})]
            if same:
                row[m]["identical_share"] = sum(same) / len(same)
        table[cat] = row
    return table


def print_table(table: dict, modes: list, out=sys.stdout) -> None:
    head = f"{'category':<16}{'n':>4}" + "".join(f"{m + ' tok/s':>13}" for m in modes)
    head += "".join(f"{m + ' x':>9}{'acc':>6}{'len':>6}{'same':>6}" for m in modes[1:])
    print(head, file=out)
    for cat in sorted(table, key=lambda c: (c == "ALL", c)):
        row = table[cat]
        line = f"{cat:<16}{row['prompts']:>4}" + "".join(f"{row[m]['tokens_per_s']:>13.2f}" for m in modes)
        for m in modes[1:]:
            r = row[m]
            line += f"{r['speedup']:>9.2f}{r.get('acceptance_rate', 0):>6.2f}{r.get('mean_accepted_len', 0):>6.2f}"
            line += f"{r['identical_share']:>6.2f}" if "identical_share" in r else f"{'':>6}"
        print(line, file=out)


MODE_OPTIONS = ("k", "drafter", "k_min", "k_max", "fanout")


def parse_mode(spec: str) -> dict:
    """'spec/k=4/drafter=ngram' -> generate() keyword arguments, checked as a Request's."""
    name, *opts = spec.split("/")
    kw: dict = {"mode": name}
    for o in opts:
        key, sep, val = o.partition("=")
        if not sep or key not in MODE_OPTIONS:
            raise EdgeSSDError(f"bad mode option {o!r} in {spec!r} (use {', '.join(k + '=' for k in MODE_OPTIONS)})")
        try:
            kw[key] = val if key == "drafter" or val == "auto" else int(val)
        except ValueError:
            raise EdgeSSDError(f"bad mode option {o!r} in {spec!r}: {key} takes an integer") from None
    try:
        DEFAULTS.with_fields(kw)
    except EdgeSSDError as e:
        raise EdgeSSDError(f"bad mode {spec!r}: {e}") from None
    return kw


def _top2_margin(engine, prompt: str, prefix: list) -> float:
    """The target's logit gap between its best two tokens where the outputs parted: a near-tie
    (a small gap) is where one-row and several-row kernels can disagree."""
    import numpy as np

    from .text import build_prompt

    ids = build_prompt(engine.tokenizer, prompt, None, raw=False) + prefix
    engine.target.reset()
    logits = engine.target.forward(ids, keep=1)[0]
    engine.target.reset()
    top = np.partition(logits, -2)[-2:]
    return float(top[1] - top[0])


def run_bench(args) -> int:
    """Everything that can be wrong with the flags is found before the bundle loads."""
    modes = [m.strip() for m in args.modes.split(",") if m.strip()]
    if not modes:
        raise EdgeSSDError("--modes names no mode")
    mode_kw = {m: parse_mode(m) for m in modes}
    if args.json:
        check_output(args.json, [args.prompts], "--json")
    if args.chart:
        from .charts import chart_paths, require_matplotlib

        require_matplotlib()
        for path in chart_paths(args.chart):
            check_output(path, [args.prompts], "--chart")
    cats = set(args.categories.split(",")) if args.categories else None
    prompts = read_prompts(args.prompts, args.limit, cats)
    if not prompts:
        raise EdgeSSDError("no prompts to run")
    engine = engine_from_args(args)
    results = []
    bar = Bar("bench", len(prompts) * len(modes), "runs")
    for p in prompts:
        rec = {"id": p["id"], "category": p["category"], "modes": {}}
        ids = {}
        for m in modes:
            res = engine.generate(p["prompt"], max_new_tokens=args.max_new_tokens, **mode_kw[m])
            rec["modes"][m] = res.stats
            ids[m] = res.token_ids
            bar.update(1)
        if "ar" in ids and len(ids) > 1:
            rec["identical"] = {m: v == ids["ar"] for m, v in ids.items() if m != "ar"}
            rec["divergence"] = {}
            for m, v in ids.items():
                if m != "ar" and v != ids["ar"]:
                    pos = next((i for i, (a, b) in enumerate(zip(ids["ar"], v)) if a != b),
                               min(len(ids["ar"]), len(v)))
                    rec["divergence"][m] = {"first": pos,
                                            "top2_margin": _top2_margin(engine, p["prompt"], ids["ar"][:pos])}
        results.append(rec)
    bar.close()
    table = summarize(results, modes)
    print_table(table, modes)
    print(f"peak RSS {fmt_bytes(peak_rss_bytes())}; providers {engine.providers()}")
    out = {"bundle": str(engine.bundle.path), "modes": modes, "costs": engine.costs.to_json(),
           "max_new_tokens": args.max_new_tokens, "exact": engine.options.exact,
           "threads": engine.options.threads, "summary": table, "results": results,
           "peak_rss_bytes": peak_rss_bytes()}
    if args.json:
        with replace_when_done(args.json) as f:
            f.write(json.dumps(out, indent=1))
    if args.chart:
        from .charts import render

        for path in render(out, args.chart):
            print(f"chart {path}")
    return 0
