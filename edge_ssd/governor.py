"""The memory governor: keep the pair inside the memory this device really has.

At load it measures what each model's weights take once ONNX Runtime holds them (the RSS
growth while the session is created: arenas and prepacked weights included), then sizes the
static KV caches and the K ceiling to the budget:

    budget >= weights(target) + weights(draft)
              + slots x context x (kv/token target + kv/token draft)
              + slots x (K_max + 1) x vocab x 4 B x (3 + fan-out) (logits, probability rows, and
                the q rows of parallel mode's branches) + margin

With several slots (requests decoding together) it keeps the context and gives up slots
first, halving them until the cache fits; it refuses, with a suggestion, when even one slot
of the minimum context does not fit. Between rounds it
re-reads available memory: under pressure it lowers parallel mode's fan-out, then K, then
drops the draft (plain target decoding, for every running request; the draft's weights and
cache are freed), and as a
last resort ends the request with the text so far and an error, before the operating system
would kill the process.

Readings come from `psutil` through one function that tests replace, so every branch can be
driven without starving the machine.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

from .enums import GovernorAction
from .errors import MemoryBudgetError
from .memory import Reading, fmt_bytes, parse_size, read_memory

MiB = 1 << 20
MIN_CONTEXT = 256
DEFAULT_SHARE = 0.8         # default budget: this share of the memory available at load
MARGIN = 64 * MiB           # never plan to the last byte: allocator slack, Python, tokenizer
PREFILL_CHUNK_MAX = 512     # prompt tokens per forward: enough rows for efficient matmuls (llama.cpp's micro-batch)
PREFILL_CHUNK_MIN = 16      # below this a long prompt takes too many forwards; the budget is short anyway
ACTIVATION_WIDTH = 24       # fp32 activations per prompt token in one layer, in hidden sizes (q/k/v/o,
                            # the MLP's gate, up and down, norms): a deliberate overestimate


def _logits_bytes(vocab: int, k: int, fanout: int) -> int:
    """One request's logits and probability rows, plus parallel mode's branches (q rows when sampling)."""
    return (k + 1) * vocab * 4 * (3 + (fanout if k else 0))


def prefill_bytes_per_token(hidden_size: int, num_heads: int, context: int) -> int:
    """Working memory per prompt token of one forward at `context` tokens: its activations and
    its attention scores against the whole context (one fp32 row per head)."""
    return 4 * (ACTIVATION_WIDTH * hidden_size + num_heads * context)


@dataclass
class Plan:
    budget: int
    weights: dict          # role -> measured bytes
    max_context: int
    k_max: int
    use_draft: bool
    note: str = ""
    slots: int = 1         # requests that may decode together

    def to_json(self) -> dict:
        return {"budget_bytes": self.budget, "weights_bytes": self.weights, "max_context": self.max_context,
                "k_max": self.k_max, "use_draft": self.use_draft, "slots": self.slots, "note": self.note}


class Governor:
    def __init__(self, budget: "str | int | None" = None, reader: Callable[[], Reading] = read_memory,
                 margin: int = MARGIN):
        self.reader = reader
        first = reader()
        self.base_rss = first.rss
        self.budget = parse_size(budget, first.available) if budget is not None else \
            int(first.rss + DEFAULT_SHARE * first.available)
        self.margin = margin
        self.k_cap: Optional[int] = None      # lowered under pressure
        self.fanout_cap: Optional[int] = None  # parallel mode's branches per round, lowered under pressure
        self.draft_dropped = False            # once one request drops the draft, every request does
        self.events: list = []

    # -- load -------------------------------------------------------------------------------
    def plan(self, weights: dict, kv_per_token: dict, vocab: int, want_context: int, want_k: int,
             model_max_context: int, target_quant: str = "", fanout: int = 0, extra: int = 0,
             slots: int = 1) -> Plan:
        """Largest context (and K) that fit `slots` requests; fewer slots if the wanted context
        does not fit them all; drop the draft if only the target fits; else refuse.

        extra: bytes held beside the models whatever the context (the suffix cache's bound)."""
        want = min(want_context, model_max_context)
        n = slots
        while n > 1:  # every slot at the wanted context, or fewer slots
            plan = self._plan_slots(n, weights, kv_per_token, vocab, want, want_k, fanout, extra)
            if plan is not None and plan.max_context >= want:
                if n < slots:
                    plan.note = (f"{slots} slots of {want} tokens do not fit the memory budget: {n} slots"
                                 + (f"; {plan.note}" if plan.note else ""))
                return plan
            n //= 2
        plan = self._plan_slots(1, weights, kv_per_token, vocab, want, want_k, fanout, extra)
        if plan is not None:
            if slots > 1:
                plan.note = "only one request at a time fits the memory budget" + (f"; {plan.note}" if plan.note else "")
            return plan
        fixed = self.base_rss + self.margin + extra
        logits = _logits_bytes(vocab, 0, fanout)
        need = fixed + weights["target"] + logits + MIN_CONTEXT * kv_per_token["target"]
        raise MemoryBudgetError(
            f"the target alone needs about {fmt_bytes(need)} (weights {fmt_bytes(weights['target'])}, "
            f"a {MIN_CONTEXT}-token cache, margin) but the memory budget is {fmt_bytes(self.budget)}; "
            + ("try a smaller quantization (int4), " if target_quant not in ("int4", "") else "try ")
            + "a shorter --max-context, a larger --memory-budget, a smaller target model, "
            "or free memory on this device"
        )

    def _plan_slots(self, slots: int, weights: dict, kv_per_token: dict, vocab: int, want: int, want_k: int,
                    fanout: int, extra: int) -> Optional[Plan]:
        """The plan for `slots` requests at the longest context up to `want` that fits (with the
        draft if it fits), or None when not even the minimum context fits."""
        fixed = self.base_rss + self.margin + extra
        for use_draft in ((True, False) if "draft" in weights else (False,)):
            roles = ["target"] + (["draft"] if use_draft else [])
            w = sum(weights[r] for r in roles)
            per_tok = slots * sum(kv_per_token[r] for r in roles)
            k = want_k if use_draft else 0
            free = self.budget - fixed - w - slots * _logits_bytes(vocab, k, fanout)
            ctx = min(want, free // per_tok if free > 0 else 0)
            if ctx >= min(MIN_CONTEXT, want):
                note = "" if use_draft or "draft" not in weights else \
                    "the draft does not fit the budget: plain target decoding"
                return Plan(self.budget, {r: weights[r] for r in roles}, int(ctx), k, use_draft, note, slots)
        return None

    def prefill_chunk(self, bytes_per_token: int) -> int:
        """The longest prefill chunk whose working memory fits what the budget has left now."""
        r = self.reader()
        headroom = min(self.budget - r.rss, r.available) - self.margin
        chunk = PREFILL_CHUNK_MAX
        while chunk > PREFILL_CHUNK_MIN and chunk * bytes_per_token > headroom:
            chunk //= 2
        return chunk

    # -- between rounds -----------------------------------------------------------------------
    def check(self, k: int, have_draft: bool, fanout: int = 0) -> GovernorAction:
        """What to give up now, from a fresh reading (OK: nothing).

        Cheapest loss first: parallel mode's pre-drafted branches (each holds up to K rows of
        q when sampling), then K, then the draft model, then the request.
        """
        if have_draft and self.draft_dropped:  # another request dropped it: this one lets go too
            return GovernorAction.DROP_DRAFT
        r = self.reader()
        over = r.rss > self.budget
        low = r.available < 2 * self.margin
        critical = r.available < self.margin // 2
        if not (over or low):
            return GovernorAction.OK
        cap = fanout if self.fanout_cap is None else min(fanout, self.fanout_cap)
        if have_draft and not critical and cap > 0:
            self.fanout_cap = cap // 2
            return self._event(GovernorAction.LOWER_FANOUT, r)
        if have_draft and not critical and k > 1 and (self.k_cap is None or self.k_cap > 1):
            self.k_cap = max(1, k // 2)
            return self._event(GovernorAction.LOWER_K, r)
        if have_draft:
            self.draft_dropped = True
            return self._event(GovernorAction.DROP_DRAFT, r)
        return self._event(GovernorAction.ABORT, r) if (over or critical) else GovernorAction.OK

    def _event(self, what: GovernorAction, r: Reading) -> GovernorAction:
        self.events.append({"action": what, "available": r.available, "rss": r.rss, "k_cap": self.k_cap,
                            "fanout_cap": self.fanout_cap})
        return what

    def abort_message(self) -> str:
        r = self.reader()
        return (f"memory pressure: process RSS {fmt_bytes(r.rss)} against a budget of {fmt_bytes(self.budget)}, "
                f"{fmt_bytes(r.available)} available; stopped early with the text so far")
