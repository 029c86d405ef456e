"""One decoder on ONNX Runtime, with its KV cache in a static buffer.

The graph's GroupQueryAttention reads past K/V from a [batch, kv_heads, max_context, head_dim]
buffer and writes the new entries into the same buffer (input and output are bound to one
address). So the cache never grows, is never copied, and stays on the device for CUDA or
DirectML; rolling back after a partial accept is just lowering a length: stale entries past
it are ignored (attention reads `seqlens_k`) and overwritten by the next step.

The buffer holds `slots` sequences ([slots, kv_heads, max_context, head_dim] per layer):
a forward binds the contiguous range of slots it runs, by address, so one sequence runs alone
(`forward(ids, slot=s)`) and several take one-row steps together (`step(slots, tokens)`,
batching.py) on the same memory. ONNX Runtime's CPU GroupQueryAttention refuses several rows
per sequence in a batch with a past ("batch_size must be 1 when sequence_length > 1"), so a
batched forward is one row per sequence, and verification of K+1 rows runs one sequence.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional, Sequence

import numpy as np
import onnxruntime as ort

from .bundle import ModelEntry
from .errors import BundleError, RequestError
from .hugepages import keep_small_pages
from .providers import DEVICE_OF, PROVIDERS


def session_options(threads: int) -> ort.SessionOptions:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.intra_op_num_threads = max(1, threads)
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Workers spin between the ops of one Run (op-to-op latency), and with force_spinning_stop
    # they stop the moment Run returns, so that they do not steal the cores from the other
    # model's step that follows. Measured here: plain decoding 17% faster than without
    # spinning, and the draft's step stays at its calibrated cost instead of doubling next to
    # a still-spinning pool.
    so.add_session_config_entry("session.intra_op.allow_spinning", "1")
    so.add_session_config_entry("session.force_spinning_stop", "1")
    so.log_severity_level = 3
    return so


class OnnxLM:
    """A causal LM session. `forward(ids, keep, slot)` appends ids to one slot's cache and returns
    logits; `step(slots, tokens)` appends one token to each of several slots in one forward."""

    def __init__(self, entry: ModelEntry, provider: str = "cpu", threads: int = 2,
                 max_context: Optional[int] = None, max_keep: int = 17,
                 min_rows: int = 1, allocate: bool = True, slots: int = 1):
        self.entry = entry
        # Quantized MatMul kernels compute a lone row differently from a row among several
        # (measured: up to 0.22 logit on the int4 target), while any M >= 2 gives bit-identical
        # rows. min_rows=2 pads one-token steps with a dummy row, so plain decoding computes
        # exactly what verification computes: that is --exact.
        self.min_rows = min_rows
        self.max_context = min(entry.max_context, max_context or entry.max_context)
        try:
            with contextlib.redirect_stdout(sys.stderr):  # its "EP Error ... falling back" goes to stdout
                self.session = ort.InferenceSession(
                    str(entry.graph), session_options(threads), providers=[PROVIDERS[provider]]
                )
        except Exception as e:  # onnxruntime raises its own exception types; say which file
            raise BundleError(f"onnxruntime could not load {entry.graph}: {e}") from e
        self.provider = provider
        self.providers_used = self.session.get_providers()
        self.device = DEVICE_OF[provider] if self.providers_used[0] == PROVIDERS[provider] else "cpu"
        self.io = self.session.io_binding()
        self.vocab = entry.vocab_size
        self.max_keep = max_keep
        self.slots = slots
        self.kv: list = []
        self.lengths: list = [0] * slots
        if allocate:
            self.allocate(self.max_context, slots)

    def allocate(self, max_context: int, slots: Optional[int] = None) -> None:
        """(Re)allocate the static KV buffers for `slots` sequences of `max_context` tokens.

        Separate from loading so that the memory governor can size the cache after measuring
        what the weights really take.
        """
        e = self.entry
        self.slots = slots or self.slots
        self.max_context = min(e.max_context, max_context)
        self.kv = []  # drop the old buffers before allocating new ones
        self.dtype = np.float16 if e.kv_dtype == "float16" else np.float32
        self.positions = self.max_context
        shape = [self.slots, e.num_kv_heads, self.positions, e.head_dim]
        self.slot_bytes = e.num_kv_heads * self.positions * e.head_dim * np.dtype(self.dtype).itemsize
        names = []
        for i in range(e.num_layers):
            for kind in ("key", "value"):
                names.append((e.io["inputs"][f"past_{kind}"].format(i=i), e.io["outputs"][f"present_{kind}"].format(i=i)))
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, self.dtype, self.device, 0)
                if self.device == "cpu":
                    keep_small_pages(buf.data_ptr(), self.slots * self.slot_bytes)
                self.kv.append(buf)
        self._kv_names = names
        self._bound: Optional[tuple] = None
        self.lengths = [0] * self.slots
        # logits: each slot's own rows, valid until that slot's next forward (a batched step
        # writes into a scratch buffer and copies each slot's row there: a batch that spans a
        # slot it leaves out must not overwrite the rows that slot is still reading)
        self._rows = [np.empty((0, self.vocab), np.float32) for _ in range(self.slots)]
        self._scratch = np.empty((self.slots, 1, self.vocab), np.float32) if self.slots > 1 else None

    @property
    def length(self) -> int:
        """Tokens in slot 0's cache (the single-sequence interface)."""
        return self.lengths[0]

    @property
    def active(self) -> int:
        """Requests sharing this model's forwards: one, on this single-sequence interface."""
        return 1

    @property
    def kv_bytes(self) -> int:
        return self.slots * self.max_context * self.entry.kv_bytes_per_token

    def _bind_kv(self, lo: int, hi: int) -> None:
        """Bind slots [lo, hi) of every layer's buffer, by address, as past and present."""
        if self._bound == (lo, hi):
            return
        e = self.entry
        shape = [hi - lo, e.num_kv_heads, self.positions, e.head_dim]
        offset = lo * self.slot_bytes
        for (past, present), buf in zip(self._kv_names, self.kv):
            ptr = buf.data_ptr() + offset
            self.io.bind_input(past, self.device, 0, self.dtype, shape, ptr)
            self.io.bind_output(present, self.device, 0, self.dtype, shape, ptr)
        self._bound = (lo, hi)

    def _run(self, lo: int, ids: np.ndarray, seqlens: np.ndarray, rows: int, out: np.ndarray) -> None:
        """One forward over slots [lo, lo + len(ids)): ids [b, S], seqlens_k [b] (each slot's
        length after the step, minus one), logits of the last `rows` positions into out [b, rows, V]."""
        names = self.entry.io["inputs"]
        io = self.io
        self._bind_kv(lo, lo + ids.shape[0])
        io.bind_cpu_input(names["input_ids"], ids)
        io.bind_cpu_input(names["seqlens_k"], seqlens)
        io.bind_cpu_input(names["total_sequence_length"], np.array(int(seqlens.max()) + 1, np.int32))
        io.bind_cpu_input(names["logits_to_keep"], np.array([rows], np.int64))
        io.bind_output(self.entry.io["outputs"]["logits"], "cpu", 0, np.float32, list(out.shape), out.ctypes.data)
        self.session.run_with_iobinding(io)

    def forward(self, ids: Sequence[int], keep: int = 1, slot: int = 0) -> np.ndarray:
        """Feed ids after slot `slot`'s cached prefix; return float32 logits [keep, vocab] of
        the last positions.

        The returned array is a view of the slot's reused buffer: valid until its next call.
        """
        n = len(ids)
        if n == 0 or not 1 <= keep <= n:
            raise ValueError(f"forward needs 1 <= keep <= len(ids), got keep={keep}, len={n}")
        pad = max(0, self.min_rows - n)
        if pad:  # padding rows come last, so the real rows are the first `keep` kept rows
            ids = list(ids) + [ids[-1]] * pad
        total = self.lengths[slot] + n + pad
        if total > self.max_context:
            raise RequestError(f"context of {total} tokens exceeds this model's limit of {self.max_context}")
        rows = keep + pad
        out = self._own_rows(slot, rows)[None]
        self._run(slot, np.asarray(ids, dtype=np.int64).reshape(1, n + pad), np.array([total - 1], np.int32),
                  rows, out)
        self.lengths[slot] += n  # a padding row's cache entry lies beyond the length: ignored, overwritten
        return out[0, :keep]

    def step(self, slots: Sequence[int], tokens: Sequence[int]) -> list:
        """Append tokens[i] to slot slots[i], all in one forward; return each slot's logits [1, V].

        The forward spans slots min..max; a slot in that range but not in `slots` gets a
        padding row at its length (beyond what it holds: ignored, overwritten later; a full
        slot's last position instead, which only a finished sequence can have). Each returned
        view is valid until that slot's next forward.
        """
        lo, hi = min(slots), max(slots) + 1
        ids = np.zeros((hi - lo, 1), np.int64)
        seqlens = np.array([min(n, self.max_context - 1) for n in self.lengths[lo:hi]], np.int32)
        for s, t in zip(slots, tokens):
            if self.lengths[s] + 1 > self.max_context:
                raise RequestError(f"context of {self.lengths[s] + 1} tokens exceeds this model's limit "
                                   f"of {self.max_context}")
            ids[s - lo, 0] = t
        self._run(lo, ids, seqlens, 1, self._scratch[:hi - lo])
        out = []
        for s in slots:
            self.lengths[s] += 1
            row = self._own_rows(s, 1)
            row[0] = self._scratch[s - lo, 0]
            out.append(row)
        return out

    def _own_rows(self, slot: int, rows: int) -> np.ndarray:
        """The first `rows` rows of the slot's logits buffer (grown to max_keep rows at once)."""
        if rows > self._rows[slot].shape[0]:
            self._rows[slot] = np.empty((max(rows, self.max_keep), self.vocab), np.float32)
        return self._rows[slot][:rows]

    def truncate(self, length: int, slot: int = 0) -> None:
        """Roll a slot's cache back to its first `length` tokens (free: nothing is copied)."""
        self.lengths[slot] = min(self.lengths[slot], max(0, length))

    def reset(self, slot: int = 0) -> None:
        self.lengths[slot] = 0


# Prompt tokens per forward while other requests are decoding in the same batch: a prefill
# forward holds the device, so every other stream waits for it; 64 tokens keeps that wait near
# a few decoding steps' time while the matmuls still run near prefill efficiency (measured
# here: 256 tokens in 2.03 s by 64s against 1.93 s by 256s).
SHARED_PREFILL_CHUNK = 64


def prefill(lm, ids: Sequence[int], chunk: int) -> Iterator[np.ndarray]:
    """Feed a long prompt to `lm` `chunk` tokens per forward, yielding the logits after each:
    the working memory of a forward grows with its rows times the context, so a bounded chunk
    bounds the peak, and the caller may stop (or check memory) between chunks. The last item
    is the logits row after the whole prompt."""
    for start in range(0, len(ids), max(1, chunk)):
        yield lm.forward(ids[start:start + chunk], keep=1)


def rows_invariant(lm: OnnxLM, ids: list, past: int, n: int = 9) -> bool:
    """Does a row get bit-identical logits whatever the number (>= 2) of rows evaluated with it?

    That is what --exact relies on: plain steps padded to two rows must compute what any
    K+1-row verification computes. Measured: true for int4 block 32, false for block 128.
    """
    lm.reset()
    lm.forward(ids[:past])
    ref = lm.forward(ids[past:past + n], keep=n).copy()
    saved_min = lm.min_rows
    lm.min_rows = 2
    try:
        for chunk in (2, 3, 4, 5, 6, 8):
            lm.truncate(past)
            rows = []
            for i in range(past, past + n, chunk):
                part = ids[i:min(i + chunk, past + n)]
                rows.append(lm.forward(part, keep=len(part)).copy())
            if not np.array_equal(np.concatenate(rows), ref):
                return False
        return True
    finally:
        lm.min_rows = saved_min
        lm.reset()


def rows_invariant_here(lm: OnnxLM) -> bool:
    """rows_invariant on a fixed probe sequence: what this device's kernels do, whatever the
    exporting machine recorded (the kernels differ between CPUs)."""
    half = (np.arange(48) * 7 % (min(lm.entry.vocab_size, 5000) - 10) + 10).tolist()
    ids = (half + half)[:lm.max_context]
    return rows_invariant(lm, ids, past=len(ids) // 2 - 5)
