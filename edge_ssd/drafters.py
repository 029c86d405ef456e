"""Drafters: where proposals come from. The decoding loop sees only this interface.

A drafter proposes up to k tokens that follow a committed sequence, with the probabilities it
drew them from (q) or None for a deterministic proposal, which the acceptance rule treats as
a point mass. `commit(n)` tells it that only the first n tokens of what it saw are final.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import numpy as np

from .model import OnnxLM
from .sampling import SamplingParams, probs, sample


@dataclass
class Proposal:
    tokens: list
    q: Optional[np.ndarray]  # [len(tokens), target vocab] float32, or None: deterministic


class Drafter(Protocol):
    def start(self, prompt: list) -> None: ...

    def propose(self, seq: list, k: int, sp: SamplingParams, rng: np.random.Generator) -> Proposal: ...

    def commit(self, n_valid: int) -> None: ...


def fit_vocab(q: np.ndarray, vocab: int) -> np.ndarray:
    """Pad (with zero mass) or cut a draft distribution to the target's vocabulary size."""
    if q.shape[-1] == vocab:
        return q
    if q.shape[-1] < vocab:
        return np.pad(q, ((0, 0), (0, vocab - q.shape[-1])))
    q = q[:, :vocab]
    return q / q.sum(axis=-1, keepdims=True)


class ModelDrafter:
    """A small LM drafting autoregressively on its own KV cache.

    Its cache holds a prefix of the committed sequence plus its own last proposal; after
    verification it is truncated to what was accepted, and the next `propose` feeds whatever
    the cache lacks (the bonus token, or the last draft token and the bonus) in one call.
    """

    def __init__(self, lm: OnnxLM, target_vocab: int):
        self.lm = lm
        self.target_vocab = target_vocab
        self.seconds = 0.0

    def start(self, prompt: list) -> None:
        """Prefill the draft's cache with the prompt (part of the request's prefill time)."""
        self.lm.reset()
        self.lm.forward(prompt, keep=1)

    def propose(self, seq: list, k: int, sp: SamplingParams, rng: np.random.Generator) -> Proposal:
        logits = self.lm.forward(seq[self.lm.length:], keep=1)[0]
        vmax = self.target_vocab
        tokens, qs = [], []
        for i in range(k):
            if sp.greedy:
                t = int(np.argmax(logits[:vmax]))
            else:
                q = fit_vocab(probs(logits[None], sp), vmax)[0]
                t = sample(q, rng)
                qs.append(q)
            tokens.append(t)
            if i + 1 < k:
                logits = self.lm.forward([t])[0]
        return Proposal(tokens, np.stack(qs) if qs else None)

    def commit(self, n_valid: int) -> None:
        self.lm.truncate(n_valid)
