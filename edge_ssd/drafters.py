"""Drafters: where proposals come from. The decoding loop sees only the `Drafter` interface.

A drafter proposes up to k tokens that follow a committed sequence, with the probabilities it
drew them from (q), or q None for a deterministic proposal, which the acceptance rule treats
as a point mass. `commit(n)` tells it that only the first n tokens of what it saw are final.
Every round it gets a `DraftRound`: what it may draft and the few estimates it may consult,
never the policy or the cost model, which only the loop updates.

* ModelDrafter: a small LM on its own KV cache (the classic draft model).
* NgramDrafter: prompt lookup. The last n tokens are searched for earlier in the prompt and
  the text so far; what followed them is proposed. Costs microseconds and wins on
  input-grounded text (summaries, RAG, code edits, extraction).
* AutoDrafter: per round, the proposal with the better expected payoff.
* ParallelDrafter (parallel.py): wraps a ModelDrafter and drafts the next round while the
  target verifies.
"""
from __future__ import annotations

import abc
import dataclasses
import time
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .enums import DraftSource
from .model import SHARED_PREFILL_CHUNK, OnnxLM, prefill
from .policy import DecayedRate, best_length
from .sampling import SamplingParams, probs, sample


@dataclass
class Proposal:
    tokens: list
    q: Optional[np.ndarray] = None    # [len(tokens), target vocab] float32, or None: deterministic
    conf: list = field(default_factory=list)  # the model draft's confidence per token
    source: DraftSource = DraftSource.MODEL
    rows: Optional[np.ndarray] = None  # the draft's logits at each proposed position, if kept
    step_s: list = field(default_factory=list)  # seconds of each one-token draft forward (the cost model's)
    catchup: tuple = ()  # (tokens, seconds) of the forward that fed the draft what it missed, if several


def _always(confs: Sequence[float]) -> bool:
    return True


@dataclass(frozen=True)
class DraftRound:
    """What the loop asks of a drafter for one round (built from the policy, the governor and
    the cost model, so that drafters never read or write those)."""

    room: int                 # most tokens this round may draft: context and token budget
    k_limit: int              # the policy's K (fixed, or k_max), within the governor's cap
    sampling: SamplingParams
    rng: np.random.Generator
    model_pays: bool = True   # a draft-model round is expected to beat a plain step (or a probe is due)
    keep_drafting: Callable[[Sequence[float]], bool] = _always  # after these confidences: one more?
    verify_cost: Optional[Callable[[int], float]] = None        # seconds to verify n rows; None: unmeasured
    accept_prob: Callable[[float], float] = lambda conf: conf    # P(target accepts | draft confidence)
    token_rate: float = 0.6   # recent per-token acceptance of model drafts
    fanout_cap: Optional[int] = None  # the governor's cap on parallel branches

    @property
    def k(self) -> int:
        """Most tokens to propose now."""
        return max(0, min(self.k_limit, self.room))

    def after(self, used: int) -> "DraftRound":
        """The next round's limits, once this round's `used` tokens are committed."""
        return dataclasses.replace(self, room=self.room - used)


class Drafter(abc.ABC):
    """The strategy interface. Capabilities and optional hooks are declared here with their
    defaults, so the loop calls them all unconditionally and a misspelt override is a bug
    that tests see, not a feature silently turned off."""

    concurrent: bool = False  # drafts while the target verifies: its step times are not device costs
    fanout: int = 0           # parallel branches held per round (the governor may lower it)

    @abc.abstractmethod
    def start(self, prompt: list, prefill_chunk: Optional[int] = None,
              lazy: bool = False) -> Optional[tuple]:
        """A new request: forget the last one, take in the prompt (a model feeds it
        `prefill_chunk` tokens per forward, to stay inside the memory budget; None: at once).
        lazy: the draft model is not expected to draft soon, so a model may leave its cache
        empty; its first drafting round catches it up. Returns (tokens, seconds) when a
        draft model took the prompt in: a catch-up the cost model learns from."""

    @abc.abstractmethod
    def propose(self, seq: list, rnd: DraftRound) -> Proposal:
        """Up to rnd.k tokens to follow `seq` (an empty proposal: a plain target step)."""

    def overlap(self, seq: list, prop: Proposal, rnd: DraftRound) -> None:
        """Called just before the target verifies `prop`: a parallel drafter starts on the next round."""

    def commit(self, n_valid: int) -> None:
        """Only the first n_valid tokens of what the drafter saw are final."""

    def release(self) -> None:
        """Let go of any model (the governor dropped the draft under memory pressure)."""

    @property
    def draft_share(self) -> float:
        """Share of drafting time that delays a round (1: sequential; parallel hits hide some)."""
        return 1.0

    def parallel_stats(self) -> dict:
        """The speculation cache's statistics (parallel mode), else empty."""
        return {}


def fit_vocab(q: np.ndarray, vocab: int) -> np.ndarray:
    """Pad (with zero mass) or cut a draft distribution to the target's vocabulary size."""
    if q.shape[-1] == vocab:
        return q
    if q.shape[-1] < vocab:
        return np.pad(q, ((0, 0), (0, vocab - q.shape[-1])))
    q = q[:, :vocab]
    return q / q.sum(axis=-1, keepdims=True)


def _top1_prob(logits: np.ndarray, t: int) -> float:
    x = logits - logits[t]
    return float(1.0 / np.exp(x, dtype=np.float32).sum())


class ModelDrafter(Drafter):
    """A small LM drafting autoregressively on its own KV cache.

    Its cache holds a prefix of the committed sequence plus its own last proposal; after
    verification it is truncated to what was accepted, and the next `propose` feeds whatever
    the cache lacks (the bonus token, or the last draft token and the bonus) in one call.
    """

    def __init__(self, lm: OnnxLM, target_vocab: int):
        self.lm = lm
        self.target_vocab = target_vocab
        self.keep_rows = False  # parallel mode reads the draft's candidates from each row

    def start(self, prompt: list, prefill_chunk: Optional[int] = None,
              lazy: bool = False) -> Optional[tuple]:
        """Prefill the draft's cache with the prompt (part of the request's prefill time). Lazy
        (the policy does not expect the model to pay) or in a batch, later: the first round
        that drafts catches the cache up. In a batch a model round seldom pays
        (policy.batch_cost), and the draft's prefill would hold the device from every other
        request (measured: 2.9 s of 10 s for four requests); alone, a draft that never drafts
        would add its prefill to the time to first token for nothing (0.25 s of 0.83 s on a
        Spec-Bench writing prompt, 2-core AVX-512 machine)."""
        self.lm.reset()
        if lazy or self.lm.active > 1:
            return None
        t0 = time.perf_counter()
        for _ in prefill(self.lm, prompt, prefill_chunk or len(prompt)):
            pass
        return len(prompt), time.perf_counter() - t0

    def propose(self, seq: list, rnd: DraftRound) -> Proposal:
        if rnd.k <= 0 or not rnd.model_pays:
            return Proposal([])
        sp, vmax = rnd.sampling, self.target_vocab
        missing = seq[self.lm.length:]  # the bonus token, or a catch-up after plain rounds
        t0 = time.perf_counter()
        for logits in prefill(self.lm, missing, SHARED_PREFILL_CHUNK):
            pass
        logits = logits[0]
        fed = time.perf_counter() - t0
        step_s, catchup = ([fed], ()) if len(missing) == 1 else ([], (len(missing), fed))  # a catch-up is no draft step
        tokens, qs, confs, rows = [], [], [], []
        while True:
            if self.keep_rows:
                rows.append(logits.copy())
            if sp.greedy:
                t = int(np.argmax(logits[:vmax]))
                confs.append(_top1_prob(logits[:vmax], t))
            else:
                q = fit_vocab(probs(logits[None], sp), vmax)[0]
                t = sample(q, rnd.rng)
                qs.append(q)
                confs.append(float(q[t]))
            tokens.append(t)
            if len(tokens) >= rnd.k or not rnd.keep_drafting(confs):
                break
            t0 = time.perf_counter()
            logits = self.lm.forward([t])[0]
            step_s.append(time.perf_counter() - t0)
        return Proposal(tokens, np.stack(qs) if qs else None, confs, DraftSource.MODEL,
                        np.stack(rows) if rows else None, step_s, catchup)

    def commit(self, n_valid: int) -> None:
        self.lm.truncate(n_valid)

    def release(self) -> None:
        self.lm = None


class NgramDrafter(Drafter):
    """Prompt lookup: continue the most recent earlier occurrence of the sequence's last n tokens."""

    def __init__(self, n_max: int = 4, n_min: int = 2):
        if not 1 <= n_min <= n_max:
            raise ValueError(f"need 1 <= ngram min <= max, got {n_min}, {n_max}")
        self.n_max, self.n_min = n_max, n_min
        self.arr = np.empty(0, np.int64)  # the committed sequence, grown in place
        self.n = 0

    def start(self, prompt: list, prefill_chunk: Optional[int] = None, lazy: bool = False) -> None:
        self.arr = np.empty(max(256, 2 * len(prompt)), np.int64)
        self.arr[: len(prompt)] = prompt
        self.n = len(prompt)

    def lookup(self, seq: list, k: int) -> list:
        if len(seq) > len(self.arr):  # amortized growth: no copy of the whole sequence per round
            self.arr = np.concatenate([self.arr[: self.n], np.empty(len(seq) + len(self.arr), np.int64)])
        if len(seq) > self.n:  # append only what is new: the committed sequence only grows
            self.arr[self.n: len(seq)] = seq[self.n:]
            self.n = len(seq)
        a = self.arr[: len(seq)]
        for n in range(min(self.n_max, len(a) - 1), self.n_min - 1, -1):
            tail = a[-n:]
            starts = np.flatnonzero(a[: len(a) - n] == tail[0])
            for s in starts[::-1]:  # most recent first
                if np.array_equal(a[s:s + n], tail):
                    cont = a[s + n: s + n + k]
                    if len(cont):
                        return cont.tolist()
        return []

    def propose(self, seq: list, rnd: DraftRound) -> Proposal:
        return Proposal(self.lookup(seq, rnd.k) if rnd.k > 0 else [], None, [], DraftSource.NGRAM)


class AutoDrafter(Drafter):
    """Per round: the best paying free proposal (lookups: a prediction, prompt lookup, the
    suffix cache), else the draft model.

    Lookup tokens cost no drafting, only verification rows, and on a CPU a row is not free,
    so each proposal is cut to the length L that maximizes (1 + sum_{i<=L} a^i) / verify(L+1)
    at its source's tracked per-token acceptance a; the proposal with the best expected rate
    is taken whenever that beats a plain step, and the draft model drafts the rounds without
    one (docs/architecture.md, "Drafters", says why this rule). A match passed over
    PROBE_AFTER times is tried anyway (two tokens), so a bad start is not final. With no
    draft model this is the `ngram` drafter.
    """

    PROBE_AFTER = 6          # matches passed over before one is tried anyway
    PROBE_TOKENS = 2         # tokens such a probe proposes
    PRIORS = {               # per-token acceptance before a source is tested, as (hits, seen)
        DraftSource.NGRAM: (1.4, 2.0),        # 0.7: text that repeats the prompt tends to go on repeating it
        DraftSource.SUFFIX: (1.0, 2.0),       # 0.5: earlier answers are a weaker guide than this one's prompt
        DraftSource.PREDICTION: (1.8, 2.0),   # 0.9: the caller expects the output to follow it
    }
    DECAY = 0.95             # matches come and go with the text: a shorter memory than the model's
    CARRY_TOKENS = 6.0       # evidence handed to the next request, in tokens

    def __init__(self, model: Optional[Drafter], lookups: Sequence[Drafter], learned: Optional[dict] = None):
        self.model, self.lookups = model, list(lookups)
        self.learned = learned if learned is not None else {}
        self.rates = {src: DecayedRate(*self.learned.get(str(src), prior), decay=self.DECAY)
                      for src, prior in self.PRIORS.items()}
        self._skipped = 0
        self._last: Optional[Proposal] = None
        self._base = 0

    @property
    def concurrent(self) -> bool:
        return self.model is not None and self.model.concurrent

    @property
    def fanout(self) -> int:
        return self.model.fanout if self.model is not None else 0

    @property
    def draft_share(self) -> float:
        return self.model.draft_share if self.model is not None else 1.0

    def start(self, prompt: list, prefill_chunk: Optional[int] = None,
              lazy: bool = False) -> Optional[tuple]:
        for d in self.lookups:
            d.start(prompt, prefill_chunk)
        return self.model.start(prompt, prefill_chunk, lazy) if self.model is not None else None

    def _cut(self, prop: Proposal, rnd: DraftRound) -> tuple:
        """(tokens worth proposing, expected tokens per second) of a lookup proposal."""
        if rnd.verify_cost is None:
            return len(prop.tokens), float(len(prop.tokens))
        return best_length(self.rates[prop.source].value, range(len(prop.tokens) + 1),
                           lambda n: rnd.verify_cost(n + 1))

    def propose(self, seq: list, rnd: DraftRound) -> Proposal:
        self._base = len(seq)
        best, best_n, best_rate, seen = None, 0, 0.0, None
        for d in self.lookups if rnd.k > 0 else ():
            prop = d.propose(seq, rnd)
            if not prop.tokens:
                continue
            seen = seen or prop
            n, rate = self._cut(prop, rnd)
            if n and rate > best_rate:
                best, best_n, best_rate = prop, n, rate
        if best is None and seen is not None and self._skipped >= self.PROBE_AFTER:
            best, best_n = seen, min(self.PROBE_TOKENS, len(seen.tokens))
        if best is not None:
            self._skipped = 0
            prop = Proposal(best.tokens[:best_n], None, [], best.source)
        else:
            self._skipped += seen is not None
            prop = self.model.propose(seq, rnd) if self.model is not None else Proposal([], source=DraftSource.NGRAM)
        self._last = prop
        return prop

    def overlap(self, seq: list, prop: Proposal, rnd: DraftRound) -> None:
        if self.model is not None:
            self.model.overlap(seq, prop, rnd)

    def commit(self, n_valid: int) -> None:
        if self.model is not None:
            self.model.commit(n_valid)
        prop, n = self._last, n_valid - self._base
        if prop is not None and prop.source in self.rates and prop.tokens:
            rate = self.rates[prop.source]
            rate.observe(n, min(len(prop.tokens), n + 1))
            self.learned[str(prop.source)] = rate.carried(self.CARRY_TOKENS)
        self._last = None

    def release(self) -> None:
        if self.model is not None:
            self.model.release()

    def parallel_stats(self) -> dict:
        return self.model.parallel_stats() if self.model is not None else {}
