"""The decoding loop: plain (`ar`) and speculative (`spec`), one sequence at a time.

One round of `spec`: the drafter proposes K tokens after the committed sequence; the target
scores the last committed token plus the K proposals in one forward pass (K+1 rows); the
longest acceptable prefix is kept plus one token of the target's own; both KV caches are cut
back to what was kept. With K = 0 a round is a plain target step, so `ar` is the same loop.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Optional

import numpy as np

from .drafters import Drafter
from .errors import RequestError
from .model import OnnxLM
from .sampling import SamplingParams, accept_greedy, accept_sampled, pick
from .stats import Stats


@dataclass(frozen=True)
class DecodeConfig:
    max_new_tokens: int = 128
    k: int = 4
    sampling: SamplingParams = SamplingParams()
    eos_ids: frozenset = frozenset()

    def __post_init__(self) -> None:
        if isinstance(self.max_new_tokens, bool) or not isinstance(self.max_new_tokens, int) \
                or not 1 <= self.max_new_tokens <= 1_000_000:
            raise RequestError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        if isinstance(self.k, bool) or not isinstance(self.k, int) or not 0 <= self.k <= 16:
            raise RequestError(f"k must be an integer in [0, 16], got {self.k!r}")


def _clip(new: list, eos: frozenset, budget: int) -> tuple:
    """Cut a round's tokens at the first EOS (dropped) or at the token budget."""
    for i, t in enumerate(new[:budget]):
        if t in eos:
            return new[:i], "stop"
    if len(new) >= budget:
        return new[:budget], "length"
    return new, ""


def decode(target: OnnxLM, drafter: Optional[Drafter], prompt: list, cfg: DecodeConfig,
           stats: Stats) -> Iterator[list]:
    """Yield each round's committed new tokens; fill `stats` as it goes.

    drafter None (or cfg.k 0) is plain target decoding: the `ar` baseline.
    """
    if not prompt:
        raise RequestError("the prompt is empty")
    if len(prompt) + 1 > target.max_context:
        raise RequestError(
            f"the prompt has {len(prompt)} tokens; the context limit is {target.max_context}"
        )
    sp = cfg.sampling
    rng = np.random.default_rng(sp.seed)
    t_start = time.perf_counter()
    stats.prompt_tokens = len(prompt)
    target.reset()
    if drafter is not None:
        drafter.start(prompt)
    logits = target.forward(prompt, keep=1)
    new = [pick(logits[0], sp, rng)]
    t_first = time.perf_counter()
    stats.prefill_s = t_first - t_start
    seq = list(prompt)
    produced = 0
    try:
        while True:
            new, reason = _clip(new, cfg.eos_ids, cfg.max_new_tokens - produced)
            seq += new
            produced += len(new)
            if new:
                yield new
            if reason:
                stats.finish_reason = reason
                return
            # The cache holds seq[:-1]; a round feeds seq[-1] and k drafts (at least min_rows rows).
            room = target.max_context - len(seq) - max(0, target.min_rows - 1)
            if room < 0:
                stats.finish_reason = "context"
                return
            k = min(cfg.k, room, cfg.max_new_tokens - produced - 1) if drafter is not None else 0
            if k <= 0:
                t0 = time.perf_counter()
                new = [pick(target.forward([seq[-1]])[0], sp, rng)]
                stats.verify_s += time.perf_counter() - t0
                stats.record_round(0, 0)
                continue
            t0 = time.perf_counter()
            prop = drafter.propose(seq, k, sp, rng)
            t1 = time.perf_counter()
            logits = target.forward([seq[-1]] + prop.tokens, keep=k + 1)
            if sp.greedy:
                n, bonus = accept_greedy(logits, prop.tokens)
            else:
                n, bonus = accept_sampled(logits, prop.tokens, prop.q, sp, rng)
            stats.draft_s += t1 - t0
            stats.verify_s += time.perf_counter() - t1
            target.truncate(len(seq) + n)
            drafter.commit(len(seq) + n)
            stats.record_round(k, n)
            new = prop.tokens[:n] + [bonus]
    finally:
        stats.new_tokens = produced
        t_end = time.perf_counter()
        stats.decode_s = t_end - t_first
        stats.total_s = t_end - t_start
