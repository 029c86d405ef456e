"""One decoder on ONNX Runtime, with its KV cache in a static buffer.

The graph's GroupQueryAttention reads past K/V from a [1, kv_heads, max_context, head_dim]
buffer and writes the new entries into the same buffer (input and output are bound to one
OrtValue). So the cache never grows, is never copied, and stays on the device for CUDA or
DirectML; rolling back after a partial accept is just lowering `length`: stale entries past it
are ignored (attention reads `seqlens_k`) and overwritten by the next step.
"""
from __future__ import annotations

import contextlib
import sys
from typing import Iterator, Optional, Sequence

import numpy as np
import onnxruntime as ort

from .bundle import ModelEntry
from .errors import BundleError, RequestError
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
    """A causal LM session: `forward(ids, keep)` appends ids to the cache and returns logits."""

    def __init__(self, entry: ModelEntry, provider: str = "cpu", threads: int = 2,
                 max_context: Optional[int] = None, max_keep: int = 17,
                 min_rows: int = 1, allocate: bool = True):
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
        self.kv: list = []
        if allocate:
            self.allocate(self.max_context)
        self.vocab = entry.vocab_size
        self.logits = np.empty((1, max_keep, self.vocab), np.float32)
        self.length = 0

    def allocate(self, max_context: int) -> None:
        """(Re)allocate the static KV buffers for `max_context` tokens and bind them.

        Separate from loading so that the memory governor can size the cache after measuring
        what the weights really take.
        """
        entry = self.entry
        self.max_context = min(entry.max_context, max_context)
        self.kv = []  # drop the old buffers before allocating new ones
        dtype = np.float16 if entry.kv_dtype == "float16" else np.float32
        shape = [1, entry.num_kv_heads, self.max_context, entry.head_dim]
        for i in range(entry.num_layers):
            for kind in ("key", "value"):
                buf = ort.OrtValue.ortvalue_from_shape_and_type(shape, dtype, self.device, 0)
                self.io.bind_ortvalue_input(entry.io["inputs"][f"past_{kind}"].format(i=i), buf)
                self.io.bind_ortvalue_output(entry.io["outputs"][f"present_{kind}"].format(i=i), buf)
                self.kv.append(buf)
        self.length = 0

    @property
    def kv_bytes(self) -> int:
        return self.max_context * self.entry.kv_bytes_per_token

    def forward(self, ids: Sequence[int], keep: int = 1) -> np.ndarray:
        """Feed ids after the cached prefix; return float32 logits [keep, vocab] of the last positions.

        The returned array is a view of a reused buffer: valid until the next call.
        """
        n = len(ids)
        if n == 0 or not 1 <= keep <= n:
            raise ValueError(f"forward needs 1 <= keep <= len(ids), got keep={keep}, len={n}")
        pad = max(0, self.min_rows - n)
        if pad:  # padding rows come last, so the real rows are the first `keep` kept rows
            ids = list(ids) + [ids[-1]] * pad
        total = self.length + n + pad
        if total > self.max_context:
            raise RequestError(f"context of {total} tokens exceeds this model's limit of {self.max_context}")
        rows = keep + pad
        if rows > self.logits.shape[1]:
            self.logits = np.empty((1, rows, self.vocab), np.float32)
        names = self.entry.io["inputs"]
        io = self.io
        io.bind_cpu_input(names["input_ids"], np.asarray(ids, dtype=np.int64).reshape(1, n + pad))
        io.bind_cpu_input(names["seqlens_k"], np.array([total - 1], np.int32))
        io.bind_cpu_input(names["total_sequence_length"], np.array(total, np.int32))
        io.bind_cpu_input(names["logits_to_keep"], np.array([rows], np.int64))
        io.bind_output(self.entry.io["outputs"]["logits"], "cpu", 0, np.float32, [1, rows, self.vocab],
                       self.logits.ctypes.data)
        self.session.run_with_iobinding(io)
        self.length += n  # a padding row's cache entry lies beyond `length`: ignored, overwritten
        return self.logits[0, :keep]

    def truncate(self, length: int) -> None:
        """Roll the cache back to its first `length` tokens (free: nothing is copied)."""
        self.length = min(self.length, max(0, length))

    def reset(self) -> None:
        self.length = 0


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
