"""A scripted language model for fast, torch-free tests of the loop, the drafters and the policy.

FakeLM has the part of OnnxLM's interface that decoding uses (forward, truncate, reset,
length, max_context, min_rows, active). Its next token is a fixed function of the last three tokens,
so text repeats (n-gram drafting finds matches) and every run is reproducible. A draft built
with `agree_with=target, agreement=a` predicts the target's next token on a share a of
positions (chosen by a hash of the context, so the same positions every run); elsewhere it
predicts another token and, with `runner_up`, ranks the target's token second, as a real
draft often does.
"""
from __future__ import annotations

import zlib
from typing import Optional, Sequence

import numpy as np

MARGIN = 6.0  # logit lead of the predicted token: far from ties, so greedy choices are stable


def _hash(ctx: Sequence[int], salt: int) -> int:
    return zlib.crc32(np.asarray(list(ctx[-3:]) + [salt], np.int64).tobytes())


class FakeLM:
    def __init__(self, vocab: int = 64, max_context: int = 512, seed: int = 0,
                 agree_with: Optional["FakeLM"] = None, agreement: float = 1.0, runner_up: bool = True,
                 min_rows: int = 1, active: int = 1):
        self.vocab, self.max_context, self.seed, self.min_rows = vocab, max_context, seed, min_rows
        self.active = active  # requests batched with this one: the policy prices rounds by it
        self.agree_with, self.agreement, self.runner_up = agree_with, agreement, runner_up
        self.tokens: list = []
        self.calls = 0  # forward passes run

    @property
    def length(self) -> int:
        return len(self.tokens)

    def agrees(self, ctx: Sequence[int]) -> bool:
        return _hash(ctx, self.seed + 7919) / 2**32 < self.agreement

    def next_token(self, ctx: Sequence[int]) -> int:
        if self.agree_with is None:
            return _hash(ctx, self.seed) % self.vocab
        theirs = self.agree_with.next_token(ctx)
        return theirs if self.agrees(ctx) else (theirs + 1 + _hash(ctx, self.seed) % (self.vocab - 1)) % self.vocab

    def logits(self, ctx: Sequence[int]) -> np.ndarray:
        rng = np.random.default_rng(_hash(ctx, self.seed + 1))
        row = rng.normal(0.0, 1.0, self.vocab).astype(np.float32)
        best = self.next_token(ctx)
        row[best] = row.max() + MARGIN
        if self.agree_with is not None and self.runner_up:
            theirs = self.agree_with.next_token(ctx)
            if theirs != best:
                row[theirs] = row[best] - MARGIN / 2
        return row

    def forward(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        assert ids and 1 <= keep <= len(ids), (ids, keep)
        assert len(self.tokens) + len(ids) <= self.max_context, "past the context"
        self.calls += 1
        self.tokens += list(ids)
        n = len(self.tokens)
        return np.stack([self.logits(self.tokens[:n - keep + i + 1]) for i in range(keep)])

    def truncate(self, length: int) -> None:
        del self.tokens[length:]

    def reset(self) -> None:
        self.tokens = []
