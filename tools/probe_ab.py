#!/usr/bin/env python3
"""What a rule for the draft's probes and catch-up is worth: `spec` as it is against `spec`
under an earlier rule (`--before`), beside `ar` and the model-free `spec/drafter=ngram`, run
in turn on each prompt in one process (the order reversed on every other prompt; the suffix
cache and the acceptance estimates carried between requests cleared before each request, so
no mode drafts an earlier mode's answer or starts from its acceptance). The earlier rules:

- `catchup` (before 2026-12-02): a probe after every back-off, the estimate blind to the
  catch-up, the draft always prefilled (now: policy.model_round_pays, policy.model_may_pay);
- `odds` (before 2026-12-03): a probe judged by its best case alone, as if every probe would
  find it (now: the best case times the odds from the probes before it, SpecPolicy.probes).

    python tools/probe_ab.py --bundle models/qwen2.5-coder-0.5b-1.5b --before odds \
        --prompts ../shared/bench/spec_bench_questions.jsonl --limit 2 --json OUT.json

Prints per category the median decode tokens/s and the median per-prompt ratio to `ar`; for
ALL, the median time to first token (prefill) and the median speed-up of the whole request
(prefill + decode: a draft that does not prefill moves its catch-up into the decode).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

from edge_ssd.hugepages import reexec_with_hugepages

VARIANTS = {  # name -> (generate() keywords, under the earlier rule)
    "ar": ({"mode": "ar"}, False),
    "ngram": ({"mode": "spec", "drafter": "ngram"}, False),
    "spec": ({"mode": "spec"}, False),
    "spec before": ({"mode": "spec"}, True),
}


def earlier_rules(policy, name: str) -> tuple:
    """(model_round_pays, model_may_pay) as they were before the rule `name` came in."""
    P = policy.SpecPolicy
    if name == "catchup":
        def round_before(self, room: int) -> bool:
            return self.model_pays_estimate() or (self._plain_streak >= self._probe_every and self.active == 1)
        return round_before, (lambda self, room, prompt_tokens: True)

    def round_at_any_odds(self, room: int) -> bool:
        if self._forced():
            return True
        owed = self.costs.catchup(self.behind)
        return self.saving(room) > owed or (self._plain_streak >= self._probe_every and self.active == 1
                                            and self.saving(room, policy.PROBE_RATE) > owed)
    return round_at_any_odds, P.model_may_pay


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--prompts", type=Path, required=True, help="JSONL: `prompt` or Spec-Bench `turns`, and `category`")
    ap.add_argument("--limit", type=int, default=2, help="prompts per category")
    ap.add_argument("--categories", default="", help="comma-separated (default: all)")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--before", choices=["catchup", "odds"], default="odds",
                    help="the earlier rule `spec before` runs under (see above)")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()

    from edge_ssd import policy
    from edge_ssd.api import Engine
    from edge_ssd.bench import prompts_by_category
    from edge_ssd.errors import EdgeSSDError
    from edge_ssd.machine import describe

    rules = policy.SpecPolicy.model_round_pays, policy.SpecPolicy.model_may_pay
    before = earlier_rules(policy, args.before)
    try:  # the prompts first: a bad file is one line before the pair takes seconds to load
        cats, chosen = prompts_by_category(args.prompts, args.limit, args.categories)
        engine = Engine.load(args.bundle)
    except EdgeSSDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    results = []
    for i, q in enumerate(chosen):
        rec = {"id": q["id"], "category": q["category"]}
        for name, (kw, every) in list(VARIANTS.items())[:: 1 if i % 2 == 0 else -1]:
            policy.SpecPolicy.model_round_pays, policy.SpecPolicy.model_may_pay = before if every else rules
            engine.suffix_cache.clear()
            engine.learned.clear()
            r = engine.generate(messages=[{"role": "user", "content": q["prompt"]}],
                                max_new_tokens=args.max_new_tokens, **kw)
            rec[name] = {k: r.stats[k] for k in ("tokens_per_s", "prefill_s", "total_s", "new_tokens", "draft_s", "drafters")}
        policy.SpecPolicy.model_round_pays, policy.SpecPolicy.model_may_pay = rules
        results.append(rec)
        print(f"[{i + 1}/{len(chosen)}] {q['category']} {q['id']}: "
              + "  ".join(f"{n} {rec[n]['tokens_per_s']:.1f}" for n in VARIANTS), flush=True)

    def table(recs: list) -> dict:
        return {n: {"tok_s": statistics.median(r[n]["tokens_per_s"] for r in recs),
                    "x_ar": statistics.median(r[n]["tokens_per_s"] / r["ar"]["tokens_per_s"] for r in recs),
                    "prefill_s": statistics.median(r[n]["prefill_s"] for r in recs),
                    "total_x_ar": statistics.median(r["ar"]["total_s"] / r[n]["total_s"] for r in recs)}
                for n in VARIANTS}

    summary = {c: table([r for r in results if r["category"] == c]) for c in cats}
    summary["ALL"] = table(results)
    print("| category | n | " + " | ".join(f"{n} tok/s (x ar)" for n in VARIANTS) + " |")
    print("|---|---|" + "---|" * len(VARIANTS))
    for c, t in summary.items():
        n = len(results) if c == "ALL" else sum(r["category"] == c for r in results)
        print(f"| {c} | {n} | " + " | ".join(f"{t[v]['tok_s']:.1f} ({t[v]['x_ar']:.2f})" for v in VARIANTS) + " |")
    print("time to first token, median s: " + ", ".join(f"{v} {summary['ALL'][v]['prefill_s']:.3f}" for v in VARIANTS))
    print("request time (prefill + decode), median speed-up over ar: "
          + ", ".join(f"{v} {summary['ALL'][v]['total_x_ar']:.2f}" for v in VARIANTS))
    print("step costs at the end:", json.dumps(engine.costs.to_json()))
    if args.json:
        args.json.write_text(json.dumps({"machine": describe(), "before": args.before, "costs": engine.costs.to_json(),
                                         "summary": summary, "results": results}, indent=1))
    return 0


if __name__ == "__main__":
    reexec_with_hugepages()
    sys.exit(main())
