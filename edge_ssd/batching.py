"""Continuous batching: several requests' one-row steps share one forward of the model.

Plain decoding is bound by reading the weights, so B sequences stepping together cost about
what a B-row verification costs, far less than B steps (docs/benchmarks.md, "Batching").
Each request keeps its own decoding loop (decode.py), drafter, acceptance estimates and RNG,
in its own thread; what it holds of a model is a `SlotLM`, one slot of the model's KV
buffer. When a loop asks its slot for a one-row forward, the `Batcher` waits briefly for the
other active slots' one-row forwards and runs them all as one `OnnxLM.step`; a forward of
several rows (a prefill chunk, a K+1-row verification) runs alone, because ONNX Runtime's CPU
attention takes several rows per sequence only for a batch of one (model.py). Requests join
and leave between rounds: a slot is taken when a request starts and given back when it ends.

Which rounds speculate under load is the policy's choice (policy.batch_costs): a solo
verification holds the other slots back, so it must pay for their lost rows as well.
"""
from __future__ import annotations

import threading
import time
from typing import Optional, Sequence

import numpy as np

from .model import OnnxLM

# How long the pending one-row steps wait for the other active slots to ask for theirs, from
# when the device is free for them: GATHER_SHARE of the last batched forward's time, at least
# GATHER_S. Between steps each loop runs ~1-3 ms of Python (accepting, lookups, text, the
# server's events), one thread at a time under the GIL, so n slots come back over n times
# that. A row that joins costs its compute only (~12 ms a row against ~31 ms a forward for
# the int4 1.5B target here), while one that misses the batch needs a forward of its own; a
# slot that is really away (a slow consumer, model drafting) costs the others at most the
# window. The window restarts when a forward ends, so a slot that missed one batch waits for
# the slots that just got their logits, and the batch does not split for good into groups.
GATHER_S = 0.003
GATHER_SHARE = 0.25


class Batcher:
    """Gathers the one-row forwards of an OnnxLM's slots, from their threads, into batched steps.

    `device` serializes every forward on the device (both models of a pair share one), so a
    batch never competes with another model's forward for the same cores.
    """

    def __init__(self, lm: OnnxLM, device: threading.Lock, batch_steps: bool = True):
        self.lm = lm
        self.device = device
        # False under --exact: a one-row-per-sequence batch runs attention with another kernel
        # than a padded K+1-row verification, so its logits differ in the last bits (measured)
        self.batch_steps = batch_steps
        self._cv = threading.Condition()
        self._free = list(range(lm.slots))
        self._active: set = set()
        self._solo = 0                  # active slots running (or waiting to run) a forward alone
        self._pending: dict = {}        # slot -> token of a one-row step not yet run
        self._done: dict = {}           # slot -> logits of a finished one-row step
        self._running = False
        self._window_end: Optional[float] = None  # the pending steps run by then, all slots or not
        self._window = GATHER_S
        self.steps = 0                  # batched forwards run, and the rows they carried
        self.rows = 0

    # -- slots --------------------------------------------------------------------------------
    def acquire(self) -> Optional["SlotLM"]:
        """A free slot, or None when all are taken (the caller queues)."""
        with self._cv:
            if not self._free:
                return None
            slot = self._free.pop(0)
            self._active.add(slot)
            self.lm.reset(slot)
            return SlotLM(self, slot)

    def release(self, slot: int) -> None:
        with self._cv:
            self._active.discard(slot)
            self._pending.pop(slot, None)
            self._free.append(slot)
            self._free.sort()  # the lowest slots first: batches span fewer idle slots
            self._cv.notify_all()

    @property
    def active(self) -> int:
        return len(self._active)

    # -- forwards -----------------------------------------------------------------------------
    def solo(self, slot: int, ids: Sequence[int], keep: int) -> np.ndarray:
        with self._cv:
            self._solo += 1
            self._cv.notify_all()  # a gathering step need not wait for this slot
        try:
            with self.device:
                return self.lm.forward(ids, keep, slot)
        finally:
            with self._cv:
                self._solo -= 1

    def step(self, slot: int, token: int) -> np.ndarray:
        """Run slot's one-row forward within a batch of every slot that asks for one now."""
        with self._cv:
            self._pending[slot] = token
            if self._window_end is None and not self._running:
                self._window_end = time.perf_counter() + self._window
            self._cv.notify_all()
            while slot not in self._done:
                if self._running:
                    self._cv.wait()
                    continue
                ready = len(self._pending) + self._solo >= len(self._active)
                if self._pending and (ready or time.perf_counter() >= self._window_end):
                    self._lead()
                    continue
                self._cv.wait(max(1e-4, self._window_end - time.perf_counter()))
            out = self._done.pop(slot)
        if isinstance(out, BaseException):
            raise out
        return out

    def _lead(self) -> None:
        """Run the pending steps as one forward (called holding the condition; released while
        the forward runs, so that other slots can queue their next steps)."""
        batch = dict(sorted(self._pending.items()))
        self._pending.clear()
        self._running = True
        self._window_end = None
        self._cv.release()
        try:
            with self.device:
                t0 = time.perf_counter()
                out = self.lm.step(list(batch), list(batch.values()))
                self._window = max(GATHER_S, GATHER_SHARE * (time.perf_counter() - t0))
            results = dict(zip(batch, out))
        except BaseException as e:  # every waiting slot gets the error, not a hang
            results = {s: e for s in batch}
        finally:
            self._cv.acquire()
            self._running = False
            if self._pending:  # steps that arrived meanwhile: a new window, from now
                self._window_end = time.perf_counter() + self._window
        self.steps += 1
        self.rows += len(batch)
        self._done.update(results)
        self._cv.notify_all()


class SlotLM:
    """One sequence's part of a shared model: the `OnnxLM` interface that decode() and the
    drafters use (forward, truncate, reset, length, max_context, min_rows, entry, vocab,
    device), routed through the batcher."""

    def __init__(self, batcher: Batcher, slot: int):
        self.batcher, self.slot, self.lm = batcher, slot, batcher.lm
        self.entry, self.vocab, self.device = self.lm.entry, self.lm.vocab, self.lm.device
        self.max_context, self.min_rows = self.lm.max_context, self.lm.min_rows

    @property
    def length(self) -> int:
        return self.lm.lengths[self.slot]

    @property
    def active(self) -> int:
        """Requests whose one-row steps share a forward with this one's (1 when steps run alone)."""
        return self.batcher.active if self.batcher.batch_steps else 1

    def forward(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        if len(ids) == 1 and self.batcher.batch_steps:
            return self.batcher.step(self.slot, ids[0])
        return self.batcher.solo(self.slot, ids, keep)

    def truncate(self, length: int) -> None:
        self.lm.truncate(length, self.slot)

    def reset(self) -> None:
        self.lm.reset(self.slot)

    def release(self) -> None:
        """Give the slot back (the request has ended)."""
        self.batcher.release(self.slot)
