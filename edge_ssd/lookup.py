"""Model-free proposals from text already seen: the request's own prompt and output (prompt
lookup), earlier requests' outputs (a suffix cache shared by an engine), and a predicted
output the caller supplies (OpenAI's Predicted Outputs).

All three find the sequence's last n tokens (n_max down to n_min) in a token store and
propose what followed. The cache and the prediction walk every match at once and vote per
position, weighted by how often each continuation followed (SuffixDecoding's frequency-
weighted continuation): a proposal runs while one continuation keeps a clear majority of
the matches, so its length comes from the match's own statistics. Proposals cost no draft
model step, only verification rows; the loop checks them like any other (lossless).
"""
from __future__ import annotations

import threading
from collections import defaultdict
from typing import Optional, Sequence

import numpy as np

from .drafters import Drafter, DraftRound, NgramDrafter, Proposal
from .enums import DraftSource

KEY = 3              # tokens hashed in the index: matches start from this many
N_MAX = 8            # longest suffix matched: longer matches are likelier to continue the same way
MIN_SUPPORT = 0.5    # a proposal goes on while one continuation holds more than this share of the matches
MAX_MATCHES = 64     # matches voted on (the most recent): bounds the cost of a common n-gram
CACHE_TOKENS = 1 << 16  # the suffix cache keeps the latest 65,536 output tokens (~7 MB with its index)
INDEX_ENTRY_BYTES = 100  # a position in the index: the list slot, and a share of the key tuples and lists


class TokenStore:
    """Documents of tokens in one array, with an index from each KEY-gram to where it ends.

    Bounded: past `capacity` tokens the oldest half is dropped and the index rebuilt, so
    memory stays at O(capacity) however long the engine runs. Requests decoding together
    read it while one that ends adds to it: `add`, `clear` and `continuation` take a lock.
    """

    def __init__(self, capacity: int = CACHE_TOKENS):
        self.capacity = capacity
        self.arr = np.full(capacity + 1, -1, np.int64)  # -1 separates documents: no match crosses one
        self.n = 0
        self.index: dict = defaultdict(list)   # KEY-gram -> positions just after it
        self._lock = threading.Lock()

    @staticmethod
    def max_bytes(capacity: int = CACHE_TOKENS) -> int:
        """The most a store of `capacity` tokens holds: its array, and an index entry per token
        (a list slot and, at worst, a key tuple of its own: about 100 bytes)."""
        return 8 * (capacity + 1) + INDEX_ENTRY_BYTES * capacity

    def clear(self) -> None:
        """Forget every document (a benchmark measures each request as if it came first)."""
        with self._lock:
            self.arr[:] = -1
            self.n = 0
            self.index = defaultdict(list)

    def add(self, tokens: Sequence[int]) -> None:
        with self._lock:
            self._add(tokens)

    def continuation(self, seq: Sequence[int], k: int) -> list:
        """Up to k tokens the store's matches of seq's suffix agree should follow (matches + vote)."""
        with self._lock:
            return self.vote(self.matches(seq), k)

    def _add(self, tokens: Sequence[int]) -> None:
        toks = list(tokens)[-self.capacity // 2:]
        if len(toks) < KEY + 1:
            return
        if self.n + len(toks) + 1 > self.capacity:
            self._drop_oldest(self.n + len(toks) + 1 - self.capacity)
        start = self.n
        self.arr[start:start + len(toks)] = toks
        self.arr[start + len(toks)] = -1
        self.n += len(toks) + 1
        self._index(start, start + len(toks))

    def _index(self, start: int, end: int) -> None:
        a = self.arr
        for i in range(start + KEY, end):
            self.index[tuple(a[i - KEY:i].tolist())].append(i)

    def _drop_oldest(self, at_least: int) -> None:
        keep_from = max(at_least, self.n // 2)
        seps = np.flatnonzero(self.arr[keep_from:self.n] == -1)
        keep_from = keep_from + int(seps[0]) + 1 if len(seps) else self.n  # start at a document
        rest = self.arr[keep_from:self.n].copy()
        self.arr[:] = -1
        self.arr[:len(rest)] = rest
        self.n = len(rest)
        self.index = defaultdict(list)
        for s, e in _documents(self.arr[:self.n]):
            self._index(s, e)

    def matches(self, seq: Sequence[int]) -> np.ndarray:
        """Positions just after the longest suffix of `seq` (N_MAX down to KEY tokens) found here."""
        if len(seq) < KEY:
            return np.empty(0, np.int64)
        found = self.index.get(tuple(seq[-KEY:]))
        if not found:
            return np.empty(0, np.int64)
        pos = np.asarray(found[-MAX_MATCHES:], np.int64)
        tail = np.asarray(seq[-N_MAX:], np.int64)
        for n in range(min(N_MAX, len(seq)), KEY, -1):  # the longest suffix that still matches somewhere
            ok = pos >= n
            ok[ok] = np.all(self.arr[pos[ok, None] - n + np.arange(n)] == tail[-n:], axis=1)
            if ok.any():
                return pos[ok]
        return pos

    def vote(self, pos: np.ndarray, k: int) -> list:
        """Walk the matches' continuations together: at each position the most frequent next
        token, while it holds more than MIN_SUPPORT of the matches that led there."""
        out: list = []
        for _ in range(k):
            if len(pos) == 0:
                break
            nxt = self.arr[np.minimum(pos, self.capacity)]
            vals, counts = np.unique(nxt[nxt >= 0], return_counts=True)
            if len(vals) == 0 or counts.max() <= MIN_SUPPORT * len(pos):
                break
            best = int(vals[np.argmax(counts)])
            out.append(best)
            pos = pos[nxt == best] + 1
        return out


def _documents(arr: np.ndarray):
    """(start, end) of each document between -1 separators."""
    seps = np.flatnonzero(arr == -1)
    start = 0
    for s in seps.tolist():
        if s > start:
            yield start, s
        start = s + 1
    if start < len(arr):
        yield start, len(arr)


class SuffixCacheDrafter(Drafter):
    """Proposals from earlier requests' outputs (the engine's shared TokenStore)."""

    def __init__(self, store: TokenStore):
        self.store = store

    def start(self, prompt: list, prefill_chunk: Optional[int] = None, lazy: bool = False) -> None:
        pass

    def propose(self, seq: list, rnd: DraftRound) -> Proposal:
        tokens = self.store.continuation(seq, rnd.k) if rnd.k > 0 else []
        return Proposal(tokens, None, [], DraftSource.SUFFIX)


class PredictionDrafter(Drafter):
    """Proposals from a predicted output: at the start its first tokens, later what follows
    the output's last tokens in the prediction (re-aligned after every edit)."""

    def __init__(self, prediction: Sequence[int]):
        self.prediction = list(prediction)
        self.store = TokenStore(capacity=max(2 * len(self.prediction) + 2, 64))
        self.store.add(self.prediction)
        self.base = 0

    def start(self, prompt: list, prefill_chunk: Optional[int] = None, lazy: bool = False) -> None:
        self.base = len(prompt)

    def propose(self, seq: list, rnd: DraftRound) -> Proposal:
        if rnd.k <= 0:
            return Proposal([], source=DraftSource.PREDICTION)
        produced = len(seq) - self.base
        if produced <= KEY:  # too little output to align: assume it follows the prediction from its start
            head = self.prediction[:produced]
            if seq[self.base:] == head:
                return Proposal(self.prediction[produced:produced + rnd.k], None, [], DraftSource.PREDICTION)
        tokens = self.store.continuation(seq, rnd.k)
        return Proposal(tokens, None, [], DraftSource.PREDICTION)


def lookup_drafters(prediction: Optional[Sequence[int]], cache: Optional[TokenStore]) -> list:
    """The free drafters of a request, the likeliest to be right first: its prediction, its own
    prompt and output, earlier outputs."""
    out: list = []
    if prediction:
        out.append(PredictionDrafter(prediction))
    out.append(NgramDrafter())
    if cache is not None:
        out.append(SuffixCacheDrafter(cache))
    return out
