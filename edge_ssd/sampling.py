"""Logits processing and the acceptance rules that keep speculative decoding lossless.

Everything is vectorized over the vocabulary (numpy): temperature, top-k, top-p, softmax.
The target's p and the draft's q go through the same `probs` function, so the acceptance
test compares like with like, and `ar` mode samples from the very same p.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from .checks import is_int, is_number
from .errors import RequestError


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: Optional[int] = None

    def __post_init__(self) -> None:
        t, k, p, s = self.temperature, self.top_k, self.top_p, self.seed
        if not is_number(t) or not 0 <= t <= 100:
            raise RequestError(f"temperature must be a number in [0, 100], got {t!r}", param="temperature")
        if not is_int(k) or k < 0:
            raise RequestError(f"top_k must be an integer >= 0, got {k!r}", param="top_k")
        if not is_number(p) or not 0 < p <= 1:
            raise RequestError(f"top_p must be a number in (0, 1], got {p!r}", param="top_p")
        if s is not None and (not is_int(s) or not 0 <= s < 2**63):
            raise RequestError(f"seed must be a non-negative integer, got {s!r}", param="seed")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _top_p_mask(p: np.ndarray, top_p: float) -> np.ndarray:
    """Zero the tail of each row beyond nucleus mass top_p (keeps at least one token).

    Sorting 152k entries per row costs ~10 ms, so the nucleus is looked for among the
    largest 64, then 2,048 entries, and only then in the full sort.
    """
    n, v = p.shape
    out = np.zeros_like(p)
    for r in range(n):  # rows: at most K+1, not the vocabulary
        row = p[r]
        for m in (64, 2048, v):
            m = min(m, v)
            idx = np.argpartition(-row, m - 1)[:m] if m < v else np.arange(v)
            order = idx[np.argsort(-row[idx], kind="stable")]
            csum = np.cumsum(row[order])
            if csum[-1] >= top_p or m == v:
                keep = order[: int(np.searchsorted(csum, top_p, side="left")) + 1]
                out[r, keep] = row[keep]
                break
    return out


def probs(logits: np.ndarray, sp: SamplingParams) -> np.ndarray:
    """Processed probabilities, float32 [rows, vocab], for sampling at sp.temperature > 0."""
    x = np.asarray(logits, dtype=np.float32) / np.float32(sp.temperature)
    v = x.shape[-1]
    if 0 < sp.top_k < v:
        kth = np.partition(x, v - sp.top_k, axis=-1)[:, v - sp.top_k : v - sp.top_k + 1]
        x = np.where(x >= kth, x, -np.inf)
    x = x - x.max(axis=-1, keepdims=True)
    e = np.exp(x, dtype=np.float32)
    e /= e.sum(axis=-1, keepdims=True)
    if sp.top_p < 1.0:
        e = _top_p_mask(e, sp.top_p)
        e /= e.sum(axis=-1, keepdims=True)
    return e


def sample(p: np.ndarray, rng: np.random.Generator) -> int:
    """One draw from a probability row (inverse CDF: one cumsum, no Python loop)."""
    c = np.cumsum(p, dtype=np.float64)
    return int(min(np.searchsorted(c, rng.random() * c[-1], side="right"), len(p) - 1))


def pick(logits_row: np.ndarray, sp: SamplingParams, rng: np.random.Generator) -> int:
    """The next token from one row of logits: argmax when greedy, else a draw from probs."""
    if sp.greedy:
        return int(np.argmax(logits_row))
    return sample(probs(logits_row[None], sp)[0], rng)


def accept_greedy(target_logits: np.ndarray, draft: list) -> tuple:
    """Greedy verification: keep the longest prefix where the target's argmax agrees.

    target_logits has len(draft)+1 rows; returns (n accepted, the target's token after them).
    """
    best = target_logits.argmax(axis=-1)
    k = len(draft)
    agree = best[:k] == np.asarray(draft)
    n = k if agree.all() else int(np.argmin(agree))
    return n, int(best[n])


def accept_sampled(target_logits: np.ndarray, draft: list, q: Optional[np.ndarray],
                   sp: SamplingParams, rng: np.random.Generator) -> tuple:
    """Rejection sampling (Leviathan et al. 2023; Chen et al. 2023), exact for the target's p.

    Accept draft token i with probability min(1, p_i(d)/q_i(d)); at the first rejection,
    draw from normalize(max(0, p_i - q_i)); if all are accepted, draw the bonus from p_k.
    q is None for a deterministic proposal (greedy draft at T > 0, n-gram): a point mass.
    """
    k = len(draft)
    p = probs(target_logits, sp)
    d = np.asarray(draft, dtype=np.int64)
    rows = np.arange(k)
    pd = p[rows, d]
    qd = q[rows, d] if q is not None else np.ones(k, np.float32)
    ok = rng.random(k) * qd < pd
    n = k if ok.all() else int(np.argmin(ok))
    if n == k:
        return k, sample(p[k], rng)
    residual = p[n] - q[n] if q is not None else p[n].copy()
    if q is None:
        residual[d[n]] = 0.0
    np.maximum(residual, 0.0, out=residual)
    if residual.sum() <= 0:  # p == q on its support: rejection had probability 0
        residual = p[n]
    return n, sample(residual, rng)
