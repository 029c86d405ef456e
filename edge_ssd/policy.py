"""How many tokens to draft: fixed K, or K chosen each round from measured costs and acceptance.

Auto mode keeps two online estimates: the cost model (costs.py) and an acceptance model that
maps the draft's confidence in a token (its top-1 probability when greedy, q(token) when
sampling) to the chance that the target accepts it, learned per confidence bucket from what
verification really accepts. A round drafts while one more token is expected to raise
tokens-per-second:  E[j+1] / cost(j+1) > E[j] / cost(j),  with
E[j] = 1 + sum_i prod_{l<=i} a(c_l)  and  cost(j) = j x draft_step x s + verify(j+1), where s
is the share of drafting that delays the round: 1 for sequential drafting, lower in parallel
mode, where a hit in the speculation cache hides the next round's drafting.
That single rule is both the adaptive K and the confidence stop. When even the best K at the
recent per-token acceptance is not expected to beat a plain step, the round drafts nothing
(K = 0: a plain target step), with an occasional probe so the estimates can recover when the
text becomes predictable again.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .costs import StepCosts

BUCKETS = 10
PRIOR = 4.0          # pseudo-observations per bucket, centred on the bucket's confidence
DECAY = 0.98         # older rounds weigh less: acceptance drifts with the text
PROBE_EVERY = 8      # after this many plain rounds, draft one round anyway


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
    draft_share: float = 1.0   # of drafting time on the critical path (parallel mode lowers it)

    def __post_init__(self) -> None:
        self.acceptance = AcceptanceModel()
        self.rate_hits, self.rate_seen = 1.2, 2.0   # decayed per-token acceptance, prior 0.6
        self.observed = 0                           # model-drafted rounds seen
        self._plain_streak = 0
        if self.fixed_k is None and self.costs is None:
            raise ValueError("auto K needs step costs")

    # -- per round -------------------------------------------------------------------------
    def budget(self, room: int) -> int:
        """Most tokens this round may draft."""
        return max(0, min(self.fixed_k if self.fixed_k is not None else self.k_max, room))

    def model_pays(self) -> bool:
        """Run the draft model this round? Yes when expected to beat a plain target step, and
        once every PROBE_EVERY plain rounds anyway, so the estimate can recover."""
        if self.model_pays_estimate() or self._plain_streak >= PROBE_EVERY:
            self._plain_streak = 0
            return True
        self._plain_streak += 1
        return False

    def model_pays_estimate(self) -> bool:
        """Is a model-drafted round expected to beat a plain step? (no side effects)"""
        return self.fixed_k is not None or self.k_min > 0 or self.model_rate() > 1 / self.costs.verify_rows(1)

    def model_rate(self) -> float:
        """Expected tokens per second of a model-drafted round at the recent per-token
        acceptance, for the best K (or the fixed one)."""
        c = self.costs
        a = self.rate_hits / self.rate_seen
        best = 0.0
        for k in ([self.fixed_k] if self.fixed_k else range(max(1, self.k_min), self.k_max + 1)):
            e = 1 + sum(a ** i for i in range(1, k + 1))
            best = max(best, e / (k * c.draft_step * self.draft_share + c.verify_rows(k + 1)))
        return best

    def keep_drafting(self, confs: list) -> bool:
        """After drafting len(confs) tokens: is drafting one more expected to pay?"""
        j = len(confs)
        if self.fixed_k is not None or j < max(1, self.k_min):
            return True
        c = self.costs
        probs = [self.acceptance.prob(x) for x in confs]
        cum = np.cumprod(probs)
        e_now = 1 + cum.sum()
        d = c.draft_step * self.draft_share
        cost_now = j * d + c.verify_rows(j + 1)
        a_next = probs[-1]
        e_next = e_now + cum[-1] * a_next
        cost_next = cost_now + d + c.verify_rows(j + 2) - c.verify_rows(j + 1)
        return e_next / cost_next > e_now / cost_now

    def state(self) -> dict:
        """What this request learned, scaled down to a prior for the next request."""
        w = min(1.0, 8.0 / max(self.rate_seen, 1e-9))
        a = self.acceptance
        return {"rate": (self.rate_hits * w, self.rate_seen * w),
                "buckets": (a.hits.tolist(), a.seen.tolist())}

    def load(self, state: dict) -> None:
        if "rate" in state:
            self.rate_hits, self.rate_seen = state["rate"]
            hits, seen = state["buckets"]
            self.acceptance.hits, self.acceptance.seen = np.array(hits), np.array(seen)

    def observe(self, confs: list, n_accepted: int) -> None:
        if confs:
            self.observed += 1
            self.acceptance.observe(confs, n_accepted)
            self.rate_hits = DECAY * self.rate_hits + n_accepted
            self.rate_seen = DECAY * self.rate_seen + min(len(confs), n_accepted + 1)
