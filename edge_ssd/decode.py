"""The decoding loop: plain (`ar`) and speculative (`spec`), one sequence at a time.

One round of `spec`: the drafter proposes up to K tokens after the committed sequence (the
policy decides K, and may stop drafting early); the target scores the last committed token
plus the proposals in one forward pass (K+1 rows); the longest acceptable prefix is kept plus
one token of the target's own; both KV caches are cut back to what was kept. A round with no
proposal is a plain target step, so `ar` is this same loop without a drafter.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from .costs import StepCosts
from .drafters import Drafter, DraftRound, Proposal
from .enums import DraftSource, FinishReason, GovernorAction
from .errors import MemoryBudgetError, RequestError
from .governor import Governor, prefill_bytes_per_token
from .model import SHARED_PREFILL_CHUNK, OnnxLM, prefill
from .policy import SpecPolicy
from .sampling import SamplingParams, accept_greedy, accept_sampled, pick
from .stats import Stats


@dataclass(frozen=True)
class DecodeConfig:
    """The loop's settings, taken from a checked `Request` (request.py validates them).

    k None means auto: chosen per round from measured costs and acceptance, in [k_min, k_max]."""

    max_new_tokens: int = 128
    k: Optional[int] = 4
    k_min: int = 0
    k_max: int = 8
    sampling: SamplingParams = SamplingParams()
    eos_ids: frozenset = frozenset()


def _clip(new: list, eos: frozenset, budget: int) -> tuple:
    """Cut a round's tokens at the first EOS (dropped) or at the token budget."""
    for i, t in enumerate(new[:budget]):
        if t in eos:
            return new[:i], FinishReason.STOP
    if len(new) >= budget:
        return new[:budget], FinishReason.LENGTH
    return new, None


def _draft_round(policy: SpecPolicy, drafter: Drafter, room: int, governor: Optional[Governor],
                 sp: SamplingParams, rng: np.random.Generator, active: int) -> DraftRound:
    """This round's limits and estimates, as the drafter may see them; `active` requests share
    the target's batched steps (1: this one alone)."""
    policy.draft_share = drafter.draft_share
    policy.active = active
    cap = governor.k_cap if governor is not None else None
    return DraftRound(room=room, k_limit=min(policy.k_limit, cap or policy.k_limit), sampling=sp, rng=rng,
                      model_pays=policy.model_round_pays(room), keep_drafting=policy.keep_drafting,
                      verify_cost=policy.cost if policy.costs is not None else None,
                      accept_prob=policy.acceptance.prob, token_rate=policy.rate.value,
                      fanout_cap=governor.fanout_cap if governor is not None else None)


def _prefill(target: OnnxLM, drafter: Optional[Drafter], prompt: list, governor: Optional[Governor],
             lazy: bool, costs: Optional[StepCosts]):
    """Feed the prompt to both models in chunks the memory budget allows (shorter ones while
    other requests decode beside it); between chunks check memory and yield [] (the consumer
    may stop a long prompt there). The draft model takes the prompt too, unless `lazy` (the
    policy does not expect it to pay); the time it takes is a catch-up `costs` learns from
    (measured: 1.5-2.5 ms a token on Spec-Bench prompts, where the calibration's 64 tokens
    took 1.0). Returns the last logits."""
    chunk = len(prompt)
    if governor is not None:
        e = target.entry
        chunk = governor.prefill_chunk(prefill_bytes_per_token(e.hidden_size, e.num_heads, len(prompt)))
    if target.active > 1:
        chunk = min(chunk, SHARED_PREFILL_CHUNK)
    fed = drafter.start(prompt, chunk, lazy) if drafter is not None else None
    if fed is not None and costs is not None:
        costs.observe_catchup(*fed)
    for i, logits in enumerate(prefill(target, prompt, chunk)):
        if (i + 1) * chunk < len(prompt):
            if governor is not None and governor.check(0, False) == GovernorAction.ABORT:
                raise MemoryBudgetError(governor.abort_message())
            yield []
    return logits


NO_PROPOSAL = Proposal([], source=DraftSource.TARGET)


def decode(target: OnnxLM, drafter: Optional[Drafter], prompt: list, cfg: DecodeConfig,
           stats: Stats, costs: Optional[StepCosts] = None, governor: Optional[Governor] = None,
           on_drop_draft: Callable[[], None] = lambda: None, learned: Optional[dict] = None) -> Iterator[list]:
    """Yield each round's committed new tokens (an empty list between prefill chunks, where a
    consumer may stop a long prompt); fill `stats` as it goes.

    drafter None is plain target decoding: the `ar` baseline. costs (shared across requests)
    are needed for auto K and are kept current with the steps this request runs. The governor,
    asked between rounds, can cap K, drop the draft (on_drop_draft frees it) or end the request.
    `learned` carries acceptance estimates from one request to the next (read, then updated).
    A round with no proposal is a plain step: the same verification with one row.
    """
    if not prompt:
        raise RequestError("the prompt is empty", param="prompt")
    if len(prompt) + 1 > target.max_context:
        raise RequestError(f"the prompt has {len(prompt)} tokens; the context limit is {target.max_context}",
                           param="prompt", code="context_length_exceeded")
    sp = cfg.sampling
    rng = np.random.default_rng(sp.seed)
    # steps that overlap drafting (parallel mode) do not measure the device's step costs
    costs_seen = None if drafter is not None and drafter.concurrent else costs
    policy = SpecPolicy(costs, cfg.k, cfg.k_min, cfg.k_max) if drafter is not None else None
    if policy is not None and learned:
        policy.load(learned)
    t_start = time.perf_counter()
    stats.prompt_tokens = len(prompt)
    target.reset()
    lazy = policy is not None and not drafter.concurrent and not policy.model_may_pay(cfg.max_new_tokens - 1, len(prompt))
    if policy is not None and (lazy or target.active > 1):
        policy.behind = len(prompt)  # the draft model's cache stays empty for now (ModelDrafter.start)
    logits = yield from _prefill(target, drafter, prompt, governor, lazy, costs_seen)
    new, src = [pick(logits[0], sp, rng)], [DraftSource.TARGET]
    t_first = time.perf_counter()
    stats.prefill_s = t_first - t_start
    seq = list(prompt)
    produced = 0
    try:
        while True:
            new, reason = _clip(new, cfg.eos_ids, cfg.max_new_tokens - produced)
            seq += new
            produced += len(new)
            stats.token_sources += src[:len(new)]
            if new:
                yield new
            if reason:
                stats.finish_reason = reason
                return
            # The cache holds seq[:-1]; a round feeds seq[-1] and k drafts (at least min_rows rows).
            room = target.max_context - len(seq) - max(0, target.min_rows - 1)
            if room < 0:
                stats.finish_reason = FinishReason.CONTEXT
                return
            room = min(room, cfg.max_new_tokens - produced - 1)  # tokens this round may draft
            act = _govern(governor, policy, drafter, room, stats)
            if act == GovernorAction.ABORT:
                return
            if act == GovernorAction.DROP_DRAFT:
                drafter = policy = None
                on_drop_draft()
            rnd = _draft_round(policy, drafter, room, governor, sp, rng, target.active) if policy is not None else None
            t0 = time.perf_counter()
            prop = drafter.propose(seq, rnd) if rnd is not None and rnd.k > 0 else NO_PROPOSAL
            t1 = time.perf_counter()
            stats.draft_s += t1 - t0
            _learn_from_drafting(prop, policy, costs_seen, stats)
            k = len(prop.tokens)
            if k:
                drafter.overlap(seq, prop, rnd)  # parallel mode: pre-draft the next round meanwhile
            logits = target.forward([seq[-1]] + prop.tokens, keep=k + 1)
            if sp.greedy:
                n, bonus = accept_greedy(logits, prop.tokens)
            else:
                n, bonus = accept_sampled(logits, prop.tokens, prop.q, sp, rng)
            dt = time.perf_counter() - t1
            stats.verify_s += dt
            if costs_seen is not None and target.active == 1:  # a batched step is not verify(k+1) alone
                costs_seen.observe_verify(k + 1, dt)
            if policy is not None:
                policy.advance(n + 1, by_model=bool(k) and prop.source == DraftSource.MODEL)
            if k:
                target.truncate(len(seq) + n)
                drafter.commit(len(seq) + n)
                policy.observe(prop.conf, n)
            stats.record_round(k, n, prop.source)
            new, src = prop.tokens[:n] + [bonus], [prop.source] * n + [DraftSource.TARGET]
    finally:
        if drafter is not None:
            stats.parallel = drafter.parallel_stats()
        if policy is not None:
            stats.probes = list(policy.probe_counts)
            if learned is not None and policy.observed:
                learned.update(policy.state())
        stats.new_tokens = produced
        t_end = time.perf_counter()
        stats.decode_s = t_end - t_first
        stats.total_s = t_end - t_start


def _govern(governor: Optional[Governor], policy: Optional[SpecPolicy], drafter: Optional[Drafter],
            room: int, stats: Stats) -> GovernorAction:
    """Ask the governor what to give up this round; record it; free the draft if it must go."""
    if governor is None:
        return GovernorAction.OK
    act = governor.check(policy.budget(room) if policy else 0, drafter is not None,
                         drafter.fanout if drafter is not None else 0)
    if act != GovernorAction.OK:
        stats.memory_events.append(act)
    if act == GovernorAction.ABORT:
        stats.finish_reason, stats.error = FinishReason.MEMORY, governor.abort_message()
    if act == GovernorAction.DROP_DRAFT:
        drafter.release()
    return act


def _learn_from_drafting(prop: Proposal, policy: Optional[SpecPolicy], costs: Optional[StepCosts],
                         stats: Stats) -> None:
    """What a proposal tells the estimates (whether the draft model ran, its step and catch-up
    times) and the request's stats (what its catch-ups fed the draft and took)."""
    if prop.catchup:
        stats.catchup = [stats.catchup[0] + prop.catchup[0], stats.catchup[1] + prop.catchup[1]]
    if prop.source == DraftSource.MODEL:
        policy.note_model_round(ran=bool(prop.tokens))
    if costs is not None:
        for s in prop.step_s:
            costs.observe_draft(s)
        if prop.catchup:
            costs.observe_catchup(*prop.catchup)
