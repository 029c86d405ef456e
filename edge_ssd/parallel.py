"""Parallel speculation: draft round T+1 while the target verifies round T (the "SSD" idea).

While the target checks round T's proposal d1..dK, a worker thread fills a speculation cache
in the manner of Saguaro (Kumar, Dao, May, "Speculative Speculative Decoding", 2026): it
pre-drafts round T+1 for the verification outcomes it expects most. An outcome is (j, b):
j of the K proposals accepted, then b, the target's own token. b is guessed among the draft's
top candidates at position j+1 other than d_{j+1} (which the target just rejected), or after
dK when all K are accepted. Each outcome is scored P(j) x P(b | j), P(j) from the policy's
acceptance model and P(b | j) from the draft's probabilities, so fan-out goes where rejection
is likely; the best `fanout` outcomes are drafted in score order. PEARL's post-verify (assume
all accepted, keep drafting) is the first branch whenever acceptance is likely.

All branches share the draft's one static KV cache: a branch writes beyond the committed
prefix, where the cache is scratch anyway, so branches cost no KV memory and moving between
them is a truncate. The cache's contents are tracked token by token (`held`), so whoever
drafts next keeps exactly the prefix that is still right and feeds the rest in one call.

When verification ends, the real outcome's branch is
* done: a hit. Round T+1's proposal is ready with no drafting latency, and the main thread
  does not wait for the worker (it finishes its current step and moves on to round T+1);
* being drafted: the main thread waits for that branch only (its first steps were hidden);
* absent: a miss. The worker is stopped (at most one draft step to wait) and the round
  drafts as usual.

Lossless: greedy output does not depend on the proposals. Sampled branches draw each token
from the draft's q given that branch's exact prefix, with a generator of their own, and keep
q for the acceptance test and the residual, so a branch is a valid proposal for its outcome
whatever the other branches and the timing were (q is used as is: Saguaro's reshaping of q
to raise hit rates is not implemented).
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

import numpy as np

from .drafters import Drafter, DraftRound, ModelDrafter, Proposal, fit_vocab
from .enums import DraftSource
from .request import DEFAULT_FANOUT
from .sampling import SamplingParams, probs, sample

CANDIDATES = 4       # bonus-token guesses looked at per position
HIT_EMA = 0.1        # weight of the newest lookup in the hit-rate average
HIT_RATE_PRIOR = 0.5  # the hit rate assumed before the first lookup


def distribution(logits: np.ndarray, sp: SamplingParams, vocab: int) -> np.ndarray:
    """The draft's probabilities over the target vocabulary at one position: softmax when
    greedy (for scoring guesses), the processed q when sampling (what is drawn from)."""
    if sp.greedy:
        x = np.exp(logits[:vocab] - logits[:vocab].max(), dtype=np.float32)
        return x / x.sum()
    return fit_vocab(probs(logits[None], sp), vocab)[0]


def top_candidates(p: np.ndarray, n: int = CANDIDATES) -> tuple:
    """The n likeliest tokens of a probability row and their probabilities, likeliest first."""
    idx = np.argpartition(-p, n)[:n]
    idx = idx[np.argsort(-p[idx])]
    return idx, p[idx]


@dataclass
class Branch:
    """Round T+1's proposal for one outcome (j, bonus) of round T."""

    j: int
    bonus: int
    score: float
    tokens: list = field(default_factory=list)
    conf: list = field(default_factory=list)
    q: list = field(default_factory=list)        # sampling: q row per token
    cands: list = field(default_factory=list)    # (ids, probs) of the draft at each token's position
    steps: int = 0
    seconds: float = 0.0
    done: bool = False


@dataclass
class FanOut:
    """One round's fan-out: what the worker needs, copied, since `seq` keeps growing."""

    gen: int
    floor: int                 # positions below this are committed and in the draft cache
    tail: list                 # seq[floor:] + the proposal
    base: int                  # len(seq) when the round was proposed
    tokens: list               # the proposal under verification
    accept: list               # P(target accepts token i | the draft's confidence)
    cands: list                # (ids, probs) at each proposed position, or None where unknown
    sp: SamplingParams
    keep_drafting: Callable[[Sequence[float]], bool]  # the policy's confidence stop
    depth: int                 # most tokens a branch drafts
    fanout: int
    rng: Optional[np.random.Generator]
    branches: dict = field(default_factory=dict)  # (j, bonus) -> Branch, in drafting order
    want: Optional[tuple] = None                   # the real outcome, once known
    feed_steps: int = 0                            # forwards to catch the cache up (0 or 1)
    full: list = field(default_factory=list)       # the committed sequence + the proposal

    @property
    def k_round(self) -> int:
        return len(self.tokens)

    def outcome(self, seq: list) -> Optional[tuple]:
        """(j, bonus) if `seq` is this round's prefix + j accepted proposals + one new token."""
        j = len(seq) - self.base - 1
        if 0 <= j <= len(self.tokens) and seq[self.base:self.base + j] == self.tokens[:j]:
            return j, seq[-1]
        return None


class ParallelDrafter(Drafter):
    """Wraps a ModelDrafter; drafts the next round's likely proposals during verification."""

    concurrent = True  # drafting overlaps verification: step times are not the device's costs

    def __init__(self, model: ModelDrafter, pool: ThreadPoolExecutor, fanout: int = DEFAULT_FANOUT,
                 wait_all: bool = False):
        self.model = model
        self.model.keep_rows = True
        self.pool = pool                    # one worker thread, owned by the engine
        self.fanout = fanout
        self.wait_all = wait_all            # measurement: let each fan-out finish (timing-free hit rate)
        self.gen = 0                        # bumped to call off the running job
        self.job: Optional[FanOut] = None
        self.futures: list = []             # jobs submitted and not yet collected (a worker error surfaces here)
        self.lock = threading.Lock()
        self.held: list = []                # the draft cache's tokens (len == lm.length)
        self.floor = 0
        self._hit: Optional[tuple] = None   # (proposal, its branch) handed out on the last hit
        # rounds: lookups; hits (partial_hits: waited for the branch to finish); rejection_hits:
        # hits on a branch for a partial accept (Saguaro's fan-out, beyond PEARL's all-accepted guess)
        self.st = {"rounds": 0, "hits": 0, "partial_hits": 0, "rejection_hits": 0, "misses": 0,
                   "branches": 0, "hidden_s": 0.0, "wait_s": 0.0, "worker_s": 0.0}
        # per lookup, for the cost model (tools/parallel_bench.py): (K of the round verified,
        # rank of the hit branch or -1, draft forwards until it was ready, K of the new round,
        # proposals of the verified round the hit branch assumed accepted or -1, its own forwards)
        self.trace: list = []
        self.hit_ema = HIT_RATE_PRIOR       # recent hit rate: the share of drafting hidden

    # -- main thread ---------------------------------------------------------------------------
    def start(self, prompt: list, prefill_chunk: Optional[int] = None,
              lazy: bool = False) -> Optional[tuple]:
        self._quiesce()
        fed = self.model.start(prompt, prefill_chunk)  # never lazy: the speculation cache drafts from the prompt on
        self.held, self.floor, self.job = list(prompt), len(prompt), None
        return fed

    @property
    def draft_share(self) -> float:
        """Drafting that still delays a round: what K is chosen against (policy.py)."""
        return 1.0 - self.hit_ema if self.st["rounds"] else 1.0

    def propose(self, seq: list, rnd: DraftRound) -> Proposal:
        job, self._hit, k = self.job, None, rnd.k
        key = job.outcome(seq) if job is not None else None
        if key is not None:
            self.st["rounds"] += 1
            if self.wait_all:
                self._wait()
            with self.lock:
                br = job.branches.get(key)
                if br is not None and not br.done and not self.wait_all:
                    job.want = key                       # the worker finishes this branch, then stops
            if br is not None and not br.done:
                self._wait()
                self.st["partial_hits"] += br.done
            hit = br is not None and br.done and bool(br.tokens) and k > 0
            self.hit_ema = (1 - HIT_EMA) * self.hit_ema + HIT_EMA * hit
            if hit:
                self.st["hits"] += 1
                self.st["rejection_hits"] += br.j < len(job.tokens)
                self.st["hidden_s"] += br.seconds
                order = list(job.branches.values())            # drafting order = score order
                rank = order.index(br)
                self.gen += 1                            # the worker moves on; nobody waits for it
                n = min(k, len(br.tokens))
                ready = job.feed_steps + sum(b.steps for b in order[:rank + 1])
                self.trace.append((job.k_round, rank, ready, n, br.j, br.steps))
                prop = Proposal(br.tokens[:n], np.stack(br.q[:n]) if br.q else None, br.conf[:n], DraftSource.MODEL)
                self._hit = (prop, br)
                return prop
            self.st["misses"] += 1
        self._quiesce()
        self._sync(seq)
        self._truncate(min(self.model.lm.length, len(seq) - 1))  # the drafter feeds at least seq[-1]
        prop = self.model.propose(seq, rnd)
        if key is not None:
            self.trace.append((job.k_round, -1, 0, len(prop.tokens), -1, 0))
        lm = self.model.lm
        self.held = (seq + prop.tokens)[:lm.length]
        self.floor = min(len(seq), lm.length)
        return prop

    def overlap(self, seq: list, prop: Proposal, rnd: DraftRound) -> None:
        """Called just before the target verifies `prop`: start pre-drafting round T+1 (as
        deep as the next round may draft, as wide as the governor allows)."""
        fanout = min(self.fanout, self.fanout if rnd.fanout_cap is None else rnd.fanout_cap)
        depth = rnd.after(len(prop.tokens)).k
        sp = rnd.sampling
        hit = self._hit is not None and self._hit[0] is prop
        if not prop.tokens or depth <= 0 or fanout <= 0:
            self.job = None
            return
        # The draft's candidates at each proposed position: a hit's branch drafted them; a
        # proposal drafted just now has its logits rows; an n-gram proposal is fed by the worker.
        cands = list(self._hit[1].cands[:len(prop.tokens)]) if hit else [None] * len(prop.tokens)
        rows = prop.rows if not hit else None
        accept = [rnd.accept_prob(c) for c in prop.conf] if prop.conf else [rnd.token_rate] * len(prop.tokens)
        self.gen += 1
        job = FanOut(self.gen, self.floor, seq[self.floor:] + prop.tokens, len(seq), list(prop.tokens), accept,
                     cands, sp, rnd.keep_drafting, depth, fanout,
                     None if sp.greedy else np.random.default_rng(int(rnd.rng.integers(1 << 62))))
        self.job, self._hit = job, None
        self._harvest()
        self.futures.append(self.pool.submit(self._run, job, rows))

    def release(self) -> None:
        self._quiesce()
        self.model.release()

    def parallel_stats(self) -> dict:
        self._quiesce()
        s = dict(self.st)
        looked = max(1, s["rounds"])
        s.update(hit_rate=round(s["hits"] / looked, 4), mean_fanout=round(s["branches"] / looked, 3),
                 fanout=self.fanout)
        for key in ("hidden_s", "wait_s", "worker_s"):
            s[key] = round(s[key], 4)
        return s

    @property
    def target_vocab(self) -> int:
        return self.model.target_vocab

    def _harvest(self) -> None:
        """Forget finished jobs (their time counted); failed ones stay for _wait to raise."""
        keep = []
        for f in self.futures:
            if f.done() and f.exception() is None:
                self.st["worker_s"] += f.result()
            else:
                keep.append(f)
        self.futures = keep

    def _wait(self) -> None:
        """Wait for every job submitted; then raise the first error a job met, if any."""
        t0 = time.perf_counter()
        futures, self.futures = self.futures, []
        error = None
        for f in futures:
            try:
                self.st["worker_s"] += f.result()
            except Exception as e:  # noqa: BLE001 - re-raised below, once all jobs are done
                error = error or e
        self.st["wait_s"] += time.perf_counter() - t0
        if error is not None:
            raise error

    def _quiesce(self) -> None:
        """Call off the worker and wait for its current step: the draft session is ours again."""
        self.gen += 1
        self._wait()
        self.job = None

    def _sync(self, want: list) -> None:
        """Keep the longest cached prefix that agrees with `want` (both threads use this, never at once)."""
        held, n = self.held, min(len(self.held), len(want))
        i = min(self.floor, n)
        while i < n and held[i] == want[i]:
            i += 1
        self.model.lm.truncate(i)
        del held[i:]

    # -- worker thread -------------------------------------------------------------------------
    def _run(self, job: FanOut, rows: Optional[np.ndarray]) -> float:
        t0 = time.perf_counter()
        self._fan_out(job, rows)
        return time.perf_counter() - t0

    def _forward(self, ids: list, keep: int = 1) -> np.ndarray:
        out = self.model.lm.forward(ids, keep)
        self.held += ids
        return out

    def _truncate(self, n: int) -> None:
        self.model.lm.truncate(n)
        del self.held[n:]

    def _fan_out(self, job: FanOut, rows: Optional[np.ndarray]) -> None:
        if job.gen != self.gen:                        # called off while queued
            return
        sp, vocab, lm = job.sp, self.model.target_vocab, self.model.lm
        want = self.held[:job.floor] + job.tail       # the committed sequence + the proposal
        job.full = want
        self._sync(want)
        if rows is not None:                           # the proposal's own logits, kept by the drafter
            job.cands = [top_candidates(distribution(r, sp, vocab)) for r in rows]
        # Feed what the cache lacks; the last row gives the candidates after the whole proposal,
        # and positions still without candidates (an n-gram proposal) need their rows too.
        unknown = sum(c is None for c in job.cands)
        self._truncate(min(lm.length, len(want) - 1 - unknown))
        if len(want) > lm.max_context:
            return
        logits = self._forward(want[lm.length:], keep=unknown + 1)
        job.feed_steps = 1
        self.floor = job.base                          # the cache holds seq (and the proposal)
        K = len(job.tokens)
        for i in range(unknown):
            job.cands[K - unknown + i] = top_candidates(distribution(logits[i], sp, vocab))
        after = top_candidates(distribution(logits[-1], sp, vocab))
        for br in self._plan(job, after):
            with self.lock:
                if job.gen != self.gen or (job.want is not None and job.want != (br.j, br.bonus)):
                    return
                job.branches[(br.j, br.bonus)] = br
            self._draft_branch(job, br)
            self.st["branches"] += 1
            if job.want is not None:
                return

    def _plan(self, job: FanOut, after: tuple) -> list:
        """The `fanout` likeliest outcomes of verification, likeliest first."""
        outcomes = []
        reach = 1.0                                    # P(the first j proposals are accepted)
        for j, tok in enumerate(job.tokens):
            ids, p = job.cands[j]
            rest = max(1e-6, 1.0 - float(p[ids == tok].sum()))
            for b, pb in zip(ids.tolist(), p.tolist()):
                if b != tok:
                    outcomes.append((reach * (1 - job.accept[j]) * pb / rest, j, b))
            reach *= job.accept[j]
        ids, p = after
        outcomes += [(reach * pb, len(job.tokens), b) for b, pb in zip(ids.tolist(), p.tolist())]
        outcomes = sorted((o for o in outcomes if o[0] > 0), reverse=True)  # top-k/top-p zeros: never
        return [Branch(j, b, s) for s, j, b in outcomes[:job.fanout]]

    def _draft_branch(self, job: FanOut, br: Branch) -> None:
        """Draft one branch: bring the cache to its accepted prefix (an earlier branch may have
        overwritten proposals there), feed its bonus, draft on."""
        t0 = time.perf_counter()
        sp, vocab = job.sp, self.model.target_vocab
        start = job.base + br.j                        # the bonus token's position
        self._sync(job.full[:start])
        depth = min(job.depth, self.model.lm.max_context - start - 1)
        feed = job.full[self.model.lm.length:start] + [br.bonus]
        while len(br.tokens) < depth:
            logits = self._forward(feed)[0]
            br.steps += 1
            p = distribution(logits, sp, vocab)
            tok = int(np.argmax(p)) if sp.greedy else sample(p, job.rng)
            if not sp.greedy:
                br.q.append(p)
            br.conf.append(float(p[tok]))
            br.cands.append(top_candidates(p))
            br.tokens.append(tok)
            feed = [tok]
            called_off = job.gen != self.gen and job.want != (br.j, br.bonus)
            if called_off or not job.keep_drafting(br.conf):
                break
        br.seconds = time.perf_counter() - t0
        br.done = True
