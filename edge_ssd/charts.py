"""Charts of an `edge-ssd bench --json` result, as PNG files.

Two figures, so that each stays readable at the width of a documentation page:

* `OUT.png`, speed: tokens/s per category for every mode side by side, the speed-up of
  each mode over the baseline (the first mode, as in the bench tables), and acceptance.
* `OUT-drafts.png`, drafting: acceptance by draft position and the distribution of the K
  chosen per round (K = 0 is a plain step), over all prompts.

A peer engine's runs (llama.cpp, measured by tools/peer_bench.py or by a bench that ran it)
are modes like any other in `modes` / `summary`, named in the JSON's `peer_modes` list: they
are drawn hatched, in their own colours, and have no drafting chart (a peer reports no K per
round). matplotlib is the `charts` extra, imported only here: the runtime never needs it.
"""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from .errors import EdgeSSDError

SPEED_SIZE_IN = (12.0, 10.0)   # inches; at DPI, the PNG's size in pixels is fixed (tests read it)
DRAFTS_SIZE_IN = (12.0, 4.5)
DPI = 100
SIZE_PX = tuple((round(w * DPI), round(h * DPI)) for w, h in (SPEED_SIZE_IN, DRAFTS_SIZE_IN))  # chart_paths' order
MIN_PROPOSED = 20             # fewer proposals at a draft position: not drawn
OWN_COLOURS = ("#4c72b0", "#dd8452", "#55a868", "#c44e52", "#8172b3", "#937860", "#da8bc3", "#8c8c8c")
PEER_COLOURS = ("#a6a6a6", "#6e6e6e", "#cfcfcf", "#4d4d4d")


def chart_paths(out: Path) -> tuple:
    """The two files `render(…, out)` writes: the speed chart and the drafting chart beside it."""
    out = Path(out)
    return out, out.with_name(f"{out.stem}-drafts{out.suffix or '.png'}")


def require_matplotlib():
    """The Figure class and the Agg canvas (no pyplot: no global state, no display needed), or a
    one-line EdgeSSDError naming the extra. Call it before a long benchmark, not after."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as e:
        raise EdgeSSDError(f"charts need matplotlib (pip install 'edge-ssd[charts]'): {e}") from None
    return Figure, FigureCanvasAgg


def _check(bench: dict) -> tuple:
    """The modes and the summary table, or a clear error for a file that is not a bench result."""
    modes, summary = bench.get("modes"), bench.get("summary")
    if not isinstance(modes, list) or not modes or not isinstance(summary, dict) or not summary:
        raise EdgeSSDError("not an `edge-ssd bench --json` result: it needs `modes` and `summary`")
    missing = [m for m in modes if not any(m in row for row in summary.values())]
    if missing:   # a category without a mode (a peer that skipped it) is only a missing bar
        raise EdgeSSDError(f"the summary has no figures for mode(s) {', '.join(missing)}")
    return modes, summary


def _categories(summary: dict) -> list:
    """Categories alphabetically, ALL last: the bench tables' order."""
    return sorted(summary, key=lambda c: (c == "ALL", c))


def _colours(modes: list, peers: set) -> dict:
    own = [m for m in modes if m not in peers]
    out = {m: OWN_COLOURS[i % len(OWN_COLOURS)] for i, m in enumerate(own)}
    out.update({m: PEER_COLOURS[i % len(PEER_COLOURS)] for i, m in enumerate(m for m in modes if m in peers)})
    return out


def _grouped_bars(ax, cats: list, series: dict, colours: dict, peers: set, label_fmt: Optional[str] = None,
                  rotation: int = 30) -> None:
    """One group of bars per category, one bar per series (mode -> value per category, None = no
    bar); ALL, the overall figure, is set apart by a line."""
    width = 0.8 / max(1, len(series))
    for i, (mode, values) in enumerate(series.items()):
        xs = [c + (i - (len(series) - 1) / 2) * width for c in range(len(cats))]
        pts = [(x, v) for x, v in zip(xs, values) if v is not None]
        if not pts:
            continue
        bars = ax.bar([x for x, _ in pts], [v for _, v in pts], width, label=mode, color=colours[mode],
                      hatch="//" if mode in peers else None, edgecolor="white", linewidth=0.5)
        if label_fmt:
            ax.bar_label(bars, [format(v, label_fmt) for _, v in pts], fontsize=6, rotation=90, padding=2)
    ax.set_xticks(range(len(cats)))
    ax.set_xticklabels(cats, rotation=rotation, ha="right" if rotation else "center", fontsize=8)
    if len(cats) > 1 and cats[-1] == "ALL":
        ax.axvline(len(cats) - 1.5, color="grey", linewidth=0.8, linestyle=":")
    ax.grid(axis="y", alpha=0.3)
    ax.set_axisbelow(True)


def _speed_figure(Figure, bench: dict, base: str):
    modes, summary = _check(bench)
    peers = set(bench.get("peer_modes") or ())
    cats = _categories(summary)
    colours = _colours(modes, peers)

    def column(mode: str, key: str) -> list:
        return [summary[c].get(mode, {}).get(key) for c in cats]

    def speedup(mode: str) -> list:
        rates = zip(column(mode, "tokens_per_s"), column(base, "tokens_per_s"))
        return [r / b if r is not None and b else None for r, b in rates]

    fig = Figure(figsize=SPEED_SIZE_IN, dpi=DPI, layout="constrained")
    top, mid, low = fig.subplots(3, 1, sharex=True, height_ratios=(3, 2, 2))
    _grouped_bars(top, cats, {m: column(m, "tokens_per_s") for m in modes}, colours, peers, ".0f")
    top.set_ylabel("tokens/s (decode)")
    top.margins(y=0.15)
    top.legend(fontsize=8, ncols=min(5, len(modes)), loc="lower left", bbox_to_anchor=(0, 1), frameon=False)
    others = [m for m in modes if m != base]
    _grouped_bars(mid, cats, {m: speedup(m) for m in others}, colours, peers, ".2f")
    mid.axhline(1.0, color="black", linewidth=0.8)
    mid.set_ylabel(f"speed-up over {base}")
    mid.margins(y=0.2)
    drafting = [m for m in others if any(v is not None for v in column(m, "acceptance_rate"))]
    _grouped_bars(low, cats, {m: column(m, "acceptance_rate") for m in drafting}, colours, peers)
    low.set_ylim(0, 1)
    low.set_ylabel("acceptance (accepted / drafted)")
    fig.suptitle(_title(bench), fontsize=10)
    return fig


def _title(bench: dict) -> str:
    name = Path(str(bench.get("bundle") or "")).name or "bundle"
    n = bench["summary"].get("ALL", {}).get("prompts")
    parts = [name, f"{n} prompts" if n else None,
             f"{bench['max_new_tokens']} new tokens" if bench.get("max_new_tokens") else None,
             "--exact" if bench.get("exact") else None]
    return ", ".join(p for p in parts if p)


def position_acceptance(runs: list, min_proposed: int = 1) -> list:
    """Acceptance at each draft position over many runs, weighted by how often it was drafted;
    None where a position was proposed fewer than `min_proposed` times (a rate of 2 samples
    would read as a finding).

    A run stores the rate per position, not the counts; position i was proposed once in every
    round with K > i, so the counts come back from the run's `k_chosen`."""
    proposed, accepted = [], []
    for s in runs:
        for i, rate in enumerate(s.get("per_position_acceptance") or ()):
            n = sum(1 for k in s.get("k_chosen") or () if k > i)
            while len(proposed) <= i:
                proposed.append(0)
                accepted.append(0.0)
            proposed[i] += n
            accepted[i] += rate * n
    return [a / p if p >= max(1, min_proposed) else None for a, p in zip(accepted, proposed)]


def k_shares(runs: list) -> dict:
    """Share of rounds that chose each K (0: a plain target step), over many runs."""
    counts: dict = {}
    for s in runs:
        for k in s.get("k_chosen") or ():
            counts[k] = counts.get(k, 0) + 1
    total = sum(counts.values())
    return {k: counts[k] / total for k in sorted(counts)} if total else {}


def _drafts_figure(Figure, bench: dict):
    modes, _ = _check(bench)
    peers = set(bench.get("peer_modes") or ())
    colours = _colours(modes, peers)
    results = bench.get("results") or []
    runs = {m: [r["modes"][m] for r in results if m in r.get("modes", {})] for m in modes if m not in peers}
    drafting = {m: rs for m, rs in runs.items() if any(s.get("drafted") for s in rs)}
    fig = Figure(figsize=DRAFTS_SIZE_IN, dpi=DPI, layout="constrained")
    left, right = fig.subplots(1, 2)
    for m, rs in drafting.items():
        acc = position_acceptance(rs, MIN_PROPOSED)
        left.plot(range(1, len(acc) + 1), acc, marker="o", markersize=3, label=m, color=colours[m])
    left.set_xlabel(f"draft position (where drafted at least {MIN_PROPOSED} times)")
    left.set_ylabel("acceptance at that position")
    left.set_ylim(0, 1.02)
    left.grid(alpha=0.3)
    shares = {m: k_shares(rs) for m, rs in drafting.items()}
    ks = sorted({k for s in shares.values() for k in s})
    _grouped_bars(right, [str(k) for k in ks], {m: [s.get(k) for k in ks] for m, s in shares.items()}, colours, peers,
                  rotation=0)
    right.set_xlabel("K chosen for the round (0 = plain target step)")
    right.set_ylabel("share of rounds")
    if drafting:
        left.legend(fontsize=8)
    else:
        left.text(0.5, 0.5, "no mode drafted", ha="center", transform=left.transAxes)
    fig.suptitle(f"Drafting: {_title(bench)}", fontsize=10)
    return fig


def render(bench: dict, out: Path, baseline: Optional[str] = None) -> list:
    """Write the speed chart to `out` and the drafting chart beside it (see chart_paths).
    Speed-ups are over `baseline`, by default the first mode (the one the bench tables use).

    Returns the paths written. Raises EdgeSSDError when matplotlib is missing or the data is
    not a bench result, before anything is written."""
    Figure, Canvas = require_matplotlib()
    modes, _ = _check(bench)
    base = baseline or modes[0]
    if base not in modes:
        raise EdgeSSDError(f"baseline {base!r} is not one of the benchmark's modes ({', '.join(modes)})")
    figures = (_speed_figure(Figure, bench, base), _drafts_figure(Figure, bench))
    paths = chart_paths(out)
    for fig, path in zip(figures, paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        Canvas(fig).print_png(str(path), metadata={"Software": None})
    return list(paths)

