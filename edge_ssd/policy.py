"""How many tokens to draft: fixed K, or K chosen each round from measured costs and acceptance.

Auto mode keeps two online estimates: the cost model (costs.py) and an acceptance model that
maps the draft's confidence in a token (its top-1 probability when greedy, q(token) when
sampling) to the chance that the target accepts it, learned per confidence bucket from what
verification really accepts. A round drafts while one more token is expected to raise
tokens-per-second:  E[j+1] / cost(j+1) > E[j] / cost(j),  with
E[j] = 1 + sum_i prod_{l<=i} a(c_l)  and  cost(j) = j x draft_step x s + verify(j+1), where s
is the share of drafting that delays the round: 1 for sequential drafting, lower in parallel
mode, where a hit in the speculation cache hides the next round's drafting.
That single rule is both the adaptive K and the confidence stop. With several requests in a
batch, verify(j + 1) is replaced by what the round costs the whole batch (`batch_cost`). When even the best K at the
recent per-token acceptance is not expected to beat a plain step, the round drafts nothing
(K = 0: a plain target step), with an occasional probe (rarer while probes keep failing) so the
estimates can recover when the text becomes predictable again.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Optional, Sequence

import numpy as np

from .costs import StepCosts

BUCKETS = 10
PRIOR = 4.0          # pseudo-observations per bucket, centred on the bucket's confidence
DECAY = 0.98         # older rounds weigh less: acceptance drifts with the text
PROBE_EVERY = 8      # after this many plain rounds, draft one round anyway (when it can pay) ...
PROBE_MAX = 64       # ... and twice as long after each probe that leaves the model unpaid: a probe
                     # pays the draft's catch-up on every token since its last round (30-50 ms on
                     # the 2-core AVX-512 machine, against ≈ 18 ms it earns at acceptance 0.6),
                     # which cost short low-acceptance answers 10-30% (docs/benchmarks.md)
PROBE_RATE = 0.85    # per-token acceptance a probe hopes to find: the draft's on its best text (code,
                     # 0.81-0.92 measured); what a probe is judged by (`model_round_pays`)
PROBE_ODDS_PRIOR = (1.0, 2.0)  # (found, probes): before any probe, even odds that one finds such text;
                     # each probe then counts, undecayed, so odds fall to 1/7 after five failures but
                     # never to zero (a prose answer that turns to code can still be found); not
                     # carried to the next request, whose text may be another kind
TOKEN_RATE_PRIOR = (1.2, 2.0)  # per-token acceptance 0.6 (two tokens' worth) before any round
CARRY_TOKENS = 8.0   # a request hands the next one at most this many tokens' worth of evidence


def expected_tokens(accept: Sequence[float]) -> float:
    """Tokens a round yields when draft token i is accepted with probability accept[i] given
    the ones before it: 1 + sum_i prod_{l<=i} accept[l] (the target's own token always comes)."""
    return 1.0 + float(np.cumprod(accept).sum()) if len(accept) else 1.0


def best_length(rate: float, lengths: Iterable[int], cost: Callable[[int], float]) -> tuple:
    """(n, tokens per second) of the best proposal length among `lengths`, each draft token
    accepted with probability `rate`; ties keep the first (shortest) length."""
    best_n, best = -1, 0.0
    for n in lengths:
        r = expected_tokens([rate] * n) / cost(n)
        if r > best:
            best_n, best = n, r
    return best_n, best


def batch_cost(costs: StepCosts, active: int, rows: int) -> float:
    """Seconds a round of `rows` target rows for one of `active` batched requests is worth,
    in the units the policy compares; with one request, verify(rows).

    A batched step gives the `active` slots one row each in one forward: R = n / verify(n)
    tokens per second (the same matmuls as an n-row verification). A slot that verifies K+1
    rows alone instead takes its row out of the batch (saving r = verify(n) - verify(n-1)) and
    holds the device for T = verify(K+1) (plus its drafting), so it pays iff the tokens it
    adds beat what the batch makes meanwhile: E - 1 > R (T - r). As a cost comparable by
    E / cost: cost(1) = 1 / R (staying in the batch), cost(rows) = 1 / R + verify(rows) - r.
    As n grows R grows, and fewer drafts pay: K shrinks with concurrency.
    """
    if active <= 1:
        return costs.verify_rows(rows)
    n = active
    batch = costs.verify_rows(n)
    per_token = batch / n
    if rows <= 1:
        return per_token
    return per_token + costs.verify_rows(rows) - (batch - costs.verify_rows(n - 1))


@dataclass
class DecayedRate:
    """A per-token acceptance rate over recent rounds: hits / seen, both decayed at each update."""

    hits: float
    seen: float
    decay: float = DECAY

    @property
    def value(self) -> float:
        return self.hits / self.seen

    def observe(self, hits: float, seen: float) -> None:
        self.hits = self.decay * self.hits + hits
        self.seen = self.decay * self.seen + seen

    def carried(self, tokens: float) -> tuple:
        """(hits, seen) scaled to at most `tokens` of evidence: a prior for the next request."""
        w = min(1.0, tokens / max(self.seen, 1e-9))
        return self.hits * w, self.seen * w


class AcceptanceModel:
    """P(target accepts a draft token | the draft's confidence in it), bucketed and decayed."""

    def __init__(self) -> None:
        centres = (np.arange(BUCKETS) + 0.5) / BUCKETS
        self.hits = centres * PRIOR
        self.seen = np.full(BUCKETS, PRIOR)

    def _bucket(self, conf: float) -> int:
        return min(BUCKETS - 1, max(0, int(conf * BUCKETS)))

    def prob(self, conf: float) -> float:
        b = self._bucket(conf)
        return float(self.hits[b] / self.seen[b])

    def observe(self, confs: list, n_accepted: int) -> None:
        """Tokens up to and including the first rejected one were really tested."""
        self.hits *= DECAY
        self.seen *= DECAY
        for i, c in enumerate(confs[: n_accepted + 1]):
            b = self._bucket(c)
            self.seen[b] += 1
            self.hits[b] += float(i < n_accepted)


@dataclass
class SpecPolicy:
    """fixed_k set: always draft that many (within budget). Otherwise auto within [k_min, k_max]."""

    costs: Optional[StepCosts] = None
    fixed_k: Optional[int] = None
    k_min: int = 0
    k_max: int = 8
    draft_share: float = 1.0   # of drafting time on the critical path (the drafter's, set by the loop)
    active: int = 1            # requests batched with this one (set by the loop each round)
    rate: DecayedRate = field(default_factory=lambda: DecayedRate(*TOKEN_RATE_PRIOR))
    observed: int = 0          # model-drafted rounds seen
    behind: int = 0            # tokens committed since the draft model last drafted: its next catch-up
    probes: DecayedRate = field(default_factory=lambda: DecayedRate(*PROBE_ODDS_PRIOR, decay=1.0))

    def __post_init__(self) -> None:
        self.acceptance = AcceptanceModel()
        self._plain_streak = 0
        self._probe_every = PROBE_EVERY
        self._probing = False
        if self.fixed_k is None and self.costs is None:
            raise ValueError("auto K needs step costs")

    # -- per round -------------------------------------------------------------------------
    @property
    def k_limit(self) -> int:
        """Most tokens a round drafts: the fixed K, or k_max."""
        return self.fixed_k if self.fixed_k is not None else self.k_max

    def budget(self, room: int) -> int:
        """Most tokens this round may draft."""
        return max(0, min(self.k_limit, room))

    def cost(self, rows: int) -> float:
        """What a round verifying `rows` rows costs, for this request among `active` ones."""
        return batch_cost(self.costs, self.active, rows)

    def model_round_pays(self, room: int) -> bool:
        """Run the draft model this round? Its round first feeds the draft the `behind` tokens
        it missed (`StepCosts.catchup`: measured ≈ 1-3 ms a token on 2 cores, so a 700-token
        prompt it did not prefill costs 0.6-2 s), so it runs when the time it is expected to
        save over the `room` left repays that. Otherwise, alone, after PROBE_EVERY declined
        rounds (longer while probes fail), a probe runs if the model's best case (PROBE_RATE),
        at the odds that a probe finds it (`probes`: how earlier probes went), would repay it,
        so the estimate can recover; where even that cannot (a draft too slow for this
        device) probes only cost (measured: 7% of `spec`'s rate on Spec-Bench prose, and a
        stem answer's four model rounds took 0.55 s of drafting, 10% of its decode: docs/benchmarks.md).
        In a batch a probe would hold every other request back for its drafting and
        verification: the estimate recovers once the request is alone again."""
        if self._forced():
            return True
        owed = self.costs.catchup(self.behind)
        if self.saving(room) > owed:
            return True
        return (self._plain_streak >= self._probe_every and self.active == 1
                and self.probes.value * self.saving(room, PROBE_RATE) > owed)

    def model_may_pay(self, room: int, prompt_tokens: int) -> bool:
        """Prefill the draft with the prompt now? Exactly when the first round would run it
        (`model_round_pays` with the whole prompt behind): where the estimate expects the
        model to win the prefill back over the `room`. Otherwise the draft waits, the time to
        first token is the target's alone, and a later round that drafts, if one comes (a
        probe, or an estimate that rose), catches it up; where none does, the prefill is
        saved (measured on Spec-Bench: 1.5-2.5 ms a prompt token, 0.1-0.5 s on short-answer
        prompts, 1.4 s on a 700-token rag prompt)."""
        return self._forced() or self.saving(room) > self.costs.catchup(prompt_tokens)

    def saving(self, room: int, rate: Optional[float] = None) -> float:
        """Seconds model-drafted rounds would save over plain steps across the next room + 1
        tokens at per-token acceptance `rate` (None: the recent one); negative when they lose."""
        tokens = room + 1
        return tokens * self.cost(1) - tokens / self.model_rate(rate)

    def advance(self, tokens: int, by_model: bool) -> None:
        """A round committed `tokens`; drafted by the model, its cache then lacks only the last."""
        self.behind = 1 if by_model else self.behind + tokens

    def note_model_round(self, ran: bool) -> None:
        """The draft model ran this round (the probe count restarts) or was declined. A round
        that ran without the estimate's backing was a probe: the next one waits twice as long
        (up to PROBE_MAX); a round the estimate backs restores the short wait."""
        if ran:
            paid = self.model_pays_estimate()
            self._probe_every = PROBE_EVERY if paid else min(2 * self._probe_every, PROBE_MAX)
            self._probing = not paid
        self._plain_streak = 0 if ran else self._plain_streak + 1

    @property
    def probe_counts(self) -> tuple:
        """(probes run, probes that found the model paying) in this request: the odds less their prior."""
        return round(self.probes.seen - PROBE_ODDS_PRIOR[1]), round(self.probes.hits - PROBE_ODDS_PRIOR[0])

    def model_pays_estimate(self) -> bool:
        """Is a model-drafted round (its draft caught up) expected to beat a plain step?"""
        return self._forced() or self.model_rate() > 1 / self.cost(1)

    def _forced(self) -> bool:
        """A fixed K or a K floor: the user asked for model drafting whatever it costs."""
        return self.fixed_k is not None or self.k_min > 0

    def model_rate(self, rate: Optional[float] = None) -> float:
        """Expected tokens per second of a model-drafted round at per-token acceptance `rate`
        (None: the recent one), for the best K (or the fixed one)."""
        d = self.costs.draft_step * self.draft_share
        ks = [self.fixed_k] if self.fixed_k else range(max(1, self.k_min), self.k_max + 1)
        return best_length(self.rate.value if rate is None else rate, ks, lambda k: k * d + self.cost(k + 1))[1]

    def keep_drafting(self, confs: Sequence[float]) -> bool:
        """After drafting len(confs) tokens: is drafting one more expected to pay?"""
        j = len(confs)
        if self.fixed_k is not None or j < max(1, self.k_min):
            return True
        accept = [self.acceptance.prob(x) for x in confs]
        d = self.costs.draft_step * self.draft_share
        cost_now = j * d + self.cost(j + 1)
        cost_next = cost_now + d + self.cost(j + 2) - self.cost(j + 1)
        return expected_tokens(accept + accept[-1:]) / cost_next > expected_tokens(accept) / cost_now

    def state(self) -> dict:
        """What this request learned, scaled down to a prior for the next request."""
        a = self.acceptance
        return {"rate": self.rate.carried(CARRY_TOKENS), "buckets": (a.hits.tolist(), a.seen.tolist())}

    def load(self, state: dict) -> None:
        if "rate" in state:
            self.rate = DecayedRate(*state["rate"])
            hits, seen = state["buckets"]
            self.acceptance.hits, self.acceptance.seen = np.array(hits), np.array(seen)

    def observe(self, confs: list, n_accepted: int) -> None:
        """A verified proposal: the acceptance estimates learn from it; a probe's also tells
        the probe odds whether it found text the model pays on."""
        if confs:
            self.observed += 1
            self.acceptance.observe(confs, n_accepted)
            self.rate.observe(n_accepted, min(len(confs), n_accepted + 1))
        if self._probing:
            self.probes.observe(float(self.model_pays_estimate()), 1.0)
            self._probing = False
