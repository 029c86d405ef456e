"""`edge-ssd bench`: decoding modes side by side, in one process, on the same prompts.

For each prompt the modes run one after the other (alternating, so that drift in machine load
hits every mode alike). Prints a table per prompt category and writes every result as JSON.
With --concurrency N each mode instead runs its prompts N at a time on an engine of N slots
(batched), and the aggregate tokens per second of each mode is printed beside the table.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

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
        row = {"id": obj.get("question_id", obj.get("id", n)), "category": cat, "prompt": prompt}
        if isinstance(obj.get("prediction"), str):  # an edit task's expected output (mode option prediction=given)
            row["prediction"] = obj["prediction"]
        rows.append(row)
    return rows


def prompts_by_category(path: Path, limit: Optional[int], categories: str = "") -> tuple:
    """(categories, their prompts grouped in that order) for the A/B tools, which run every
    variant on one prompt before the next: `categories` comma-separated, or every one, sorted."""
    wanted = [c for c in categories.split(",") if c]
    rows = read_prompts(path, limit, set(wanted) or None)
    cats = wanted or sorted({r["category"] for r in rows})
    return cats, [q for c in cats for q in rows if q["category"] == c]


def _decode_tokens(s: dict) -> int:
    """Tokens that a run's decode time paid for. edge-ssd's first new token comes out of prefill,
    so it is not counted; a record from another engine says its own count (`decode_tokens`)."""
    return int(s["decode_tokens"]) if "decode_tokens" in s else max(0, s["new_tokens"] - 1)


def _rate(s: dict) -> float:
    return _decode_tokens(s) / s["decode_s"] if s["decode_s"] else 0.0


def _spec_rounds(s: dict) -> int:
    """Rounds that drafted: from the K per round, or a peer's own count (`spec_rounds`)."""
    return int(s["spec_rounds"]) if "spec_rounds" in s else sum(1 for k in s["k_chosen"] if k > 0)


def median(xs: Sequence[float]) -> float:
    return float(statistics.median(xs)) if xs else 0.0


def _mode_cell(st: list, per_prompt: bool) -> dict:
    """One mode over one category's runs: rate, acceptance, mean accepted length, peak RSS."""
    if per_prompt:
        cell = {"tokens_per_s": median([_rate(s) for s in st])}
    else:
        secs = sum(s["decode_s"] for s in st)
        cell = {"tokens_per_s": sum(_decode_tokens(s) for s in st) / secs if secs else 0.0}
    drafted = sum(s.get("drafted", 0) for s in st)
    if drafted:
        cell["acceptance_rate"] = sum(s["accepted"] for s in st) / drafted
        cell["mean_accepted_len"] = sum(s["accepted"] for s in st) / max(1, sum(_spec_rounds(s) for s in st))
    rss = [s["peak_rss_bytes"] for s in st if s.get("peak_rss_bytes")]
    if rss:
        cell["peak_rss_bytes"] = max(rss)
    return cell


def _ratios(rs: list, mode: str, over) -> list:
    """Per prompt: the mode's rate over `over(record)` (a rate), where that is not zero."""
    out = []
    for r in rs:
        base = over(r)
        if base:
            out.append(_rate(r["modes"][mode]) / base)
    return out


def summarize(results: list, modes: list, per_prompt: bool = False, best_of: Sequence[str] = (),
              groups: Optional[dict] = None) -> dict:
    """Per category, per extra group and overall ("ALL"), per mode: tokens/s, speedup over
    modes[0], acceptance, mean accepted length, peak RSS, share of outputs identical to modes[0].

    Default: a category's rate is total tokens / total decode time, and its speedup the ratio
    of those rates (what a user of the whole workload sees). per_prompt=True: medians of the
    per-prompt rates and of the per-prompt ratios, which one odd prompt cannot move; for runs
    in separate processes (tools/peer_bench.py). best_of: modes whose best rate on each prompt
    every mode is also compared with (`vs_best`, median of per-prompt ratios). groups: extra
    rows, name -> set of categories (e.g. {"code": {"coding"}}).
    """
    by_cat = defaultdict(list)
    for r in results:
        by_cat[r["category"]].append(r)
        by_cat["ALL"].append(r)
        for name, cats in (groups or {}).items():
            if r["category"] in cats:
                by_cat[name].append(r)
    table = {}
    for cat, rs in by_cat.items():
        row = {"prompts": len(rs)}
        for m in modes:
            row[m] = _mode_cell([r["modes"][m] for r in rs], per_prompt)
        for m in modes[1:]:
            if per_prompt:
                row[m]["speedup"] = median(_ratios(rs, m, lambda r: _rate(r["modes"][modes[0]])))
            else:
                base = row[modes[0]]["tokens_per_s"]
                row[m]["speedup"] = row[m]["tokens_per_s"] / base if base else 0.0
            same = [r["identical"][m] for r in rs if m in r.get("identical", {})]
            if same:
                row[m]["identical_share"] = sum(same) / len(same)
        if best_of:
            for m in modes:
                row[m]["vs_best"] = median(_ratios(rs, m, lambda r: max(_rate(r["modes"][b]) for b in best_of)))
        table[cat] = row
    return table


def _table_order(table: dict) -> list:
    """Categories alphabetically, then extra groups, then ALL."""
    return sorted(table, key=lambda c: (c == "ALL", c))


def print_table(table: dict, modes: list, out=sys.stdout) -> None:
    """One row per category, modes side by side (the `edge-ssd bench` view)."""
    width = {m: max(13, len(m) + 7) for m in modes}
    head = f"{'category':<16}{'n':>4}" + "".join(f"{m + ' tok/s':>{width[m]}}" for m in modes)
    head += "".join(f"{m + ' x':>{max(9, len(m) + 3)}}{'acc':>6}{'len':>6}{'same':>6}" for m in modes[1:])
    print(head, file=out)
    for cat in _table_order(table):
        row = table[cat]
        line = f"{cat:<16}{row['prompts']:>4}" + "".join(f"{row[m]['tokens_per_s']:>{width[m]}.2f}" for m in modes)
        for m in modes[1:]:
            r = row[m]
            line += f"{r['speedup']:>{max(9, len(m) + 3)}.2f}{r.get('acceptance_rate', 0):>6.2f}"
            line += f"{r.get('mean_accepted_len', 0):>6.2f}"
            line += f"{r['identical_share']:>6.2f}" if "identical_share" in r else f"{'':>6}"
        print(line, file=out)


def _cells(cell: dict, first: bool, best_label: Optional[str]) -> list:
    """One mode's row in a category table; "–" where the mode has no such figure."""
    def fmt(key: str, spec: str) -> str:
        return format(cell[key], spec) if key in cell else "–"

    cells = [fmt("tokens_per_s", ".1f"), "1.00" if first else fmt("speedup", ".2f")]
    if best_label:
        cells.append(fmt("vs_best", ".2f"))
    cells += [fmt("acceptance_rate", ".2f"), fmt("mean_accepted_len", ".2f")]
    cells.append(fmt_bytes(cell["peak_rss_bytes"]) if "peak_rss_bytes" in cell else "–")
    return cells


def print_category_tables(table: dict, modes: list, out=sys.stdout, markdown: bool = False,
                          best_label: Optional[str] = None) -> None:
    """One table per category (rows: modes), for comparisons with many modes that would not fit
    side by side; as plain text or Markdown. best_label names the `vs_best` column."""
    head = ["mode", "tok/s", f"x {modes[0]}"] + ([f"x {best_label}"] if best_label else [])
    head += ["acc", "len", "peak RSS"]
    width = max(len(m) for m in modes + ["mode"]) + 2
    for cat in _table_order(table):
        row = table[cat]
        rows = [[m] + _cells(row[m], i == 0, best_label) for i, m in enumerate(modes)]
        if markdown:
            print(f"\n**{cat}** ({row['prompts']} prompts)\n", file=out)
            print("| " + " | ".join(head) + " |\n|" + "---|" * len(head), file=out)
            for r in rows:
                print("| " + " | ".join(r) + " |", file=out)
        else:
            print(f"\n{cat} ({row['prompts']} prompts)", file=out)
            for r in [head] + rows:
                print(f"{r[0]:<{width}}" + "".join(f"{c:>{max(10, len(head[i + 1]) + 2)}}"
                                                  for i, c in enumerate(r[1:])), file=out)


def cpu_clock() -> tuple:
    """(wall s, CPU-busy s of the whole machine, CPU s of this process and its waited-for children)."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        busy = (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")   # all but idle, iowait
    except (OSError, ValueError, IndexError):
        busy = float("nan")
    t = os.times()
    return time.time(), busy, t.user + t.system + t.children_user + t.children_system


def others_cpu_share(start: tuple, end: tuple) -> float:
    """Share of the machine's CPU time that other processes took during the run: the noise flag
    (a benchmark beside compiles or tests measures the contention, not the engines)."""
    wall = (end[0] - start[0]) * (os.cpu_count() or 1)
    return max(0.0, ((end[1] - start[1]) - (end[2] - start[2])) / wall) if wall > 0 else 0.0


MODE_OPTIONS = ("k", "drafter", "k_min", "k_max", "fanout", "prediction")
GIVEN = "given"  # prediction=given: the prompt line's own `prediction` (edit tasks)


def fresh_generate(engine, prompt: str, **kw):
    """A request measured as if it came first: the suffix cache forgets earlier outputs, or a
    mode would draft the very answer the mode before it just gave on the same prompt."""
    engine.suffix_cache.clear()
    return engine.generate(prompt, **kw)


def parse_mode(spec: str) -> dict:
    """'spec/k=4/drafter=ngram' -> generate() keyword arguments, checked as a Request's."""
    name, *opts = spec.split("/")
    kw: dict = {"mode": name}
    for o in opts:
        key, sep, val = o.partition("=")
        if not sep or key not in MODE_OPTIONS:
            raise EdgeSSDError(f"bad mode option {o!r} in {spec!r} (use {', '.join(k + '=' for k in MODE_OPTIONS)})")
        if key == "prediction" and val != GIVEN:
            raise EdgeSSDError(f"bad mode option {o!r} in {spec!r}: prediction takes only {GIVEN!r}")
        try:
            kw[key] = val if key in ("drafter", "prediction") or val == "auto" else int(val)
        except ValueError:
            raise EdgeSSDError(f"bad mode option {o!r} in {spec!r}: {key} takes an integer") from None
    try:
        DEFAULTS.with_fields(kw)
    except EdgeSSDError as e:
        raise EdgeSSDError(f"bad mode {spec!r}: {e}") from None
    return kw


def mode_request(kw: dict, prompt: dict) -> dict:
    """A mode's keyword arguments for one prompt line: prediction=given becomes its prediction."""
    if kw.get("prediction") != GIVEN:
        return kw
    if "prediction" not in prompt:
        raise EdgeSSDError(f"mode option prediction=given, but prompt {prompt['id']!r} has no `prediction`")
    return {**kw, "prediction": prompt["prediction"]}


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


def _run_modes(engine, prompts: list, modes: list, mode_kw: dict, args, bar: Bar) -> tuple:
    """Each prompt's Result per mode, and with --concurrency > 1 each mode's aggregate rate.

    One at a time, the modes alternate per prompt. N at a time, each mode runs all its prompts
    through N threads on the engine's N slots; the suffix cache is cleared once per mode (not
    per request: the others are running)."""
    runs: list = [{} for _ in prompts]
    if args.concurrency == 1:
        for i, p in enumerate(prompts):
            for m in modes:
                runs[i][m] = fresh_generate(engine, p["prompt"], max_new_tokens=args.max_new_tokens,
                                            **mode_request(mode_kw[m], p))
                bar.update(1)
        return runs, {}
    aggregate = {}
    for m in modes:
        engine.suffix_cache.clear()

        def one(i: int, mode: str = m):
            res = engine.generate(prompts[i]["prompt"], max_new_tokens=args.max_new_tokens,
                                  **mode_request(mode_kw[mode], prompts[i]))
            bar.update(1)
            return res
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency, thread_name_prefix="edge-ssd-bench") as pool:
            for i, res in enumerate(pool.map(one, range(len(prompts)))):
                runs[i][m] = res
        wall = time.perf_counter() - t0
        tokens = sum(r[m].stats["new_tokens"] for r in runs)
        aggregate[m] = {"aggregate_tok_s": tokens / wall, "wall_s": wall, "tokens": tokens}
    return runs, aggregate


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
    engine = engine_from_args(args, slots=args.concurrency)
    results = []
    bar = Bar("bench", len(prompts) * len(modes), "runs")
    runs, aggregate = _run_modes(engine, prompts, modes, mode_kw, args, bar)
    for p, run in zip(prompts, runs):
        rec = {"id": p["id"], "category": p["category"], "modes": {m: res.stats for m, res in run.items()}}
        ids = {m: res.token_ids for m, res in run.items()}
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
    if aggregate:
        print(f"{args.concurrency} requests at a time: aggregate tokens/s "
              + ", ".join(f"{m} {a['aggregate_tok_s']:.1f}" for m, a in aggregate.items()))
    print(f"peak RSS {fmt_bytes(peak_rss_bytes())}; providers {engine.providers()}")
    out = {"bundle": str(engine.bundle.path), "modes": modes, "costs": engine.costs.to_json(),
           "concurrency": args.concurrency, "aggregate": aggregate,
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
