"""Keep a GGUF tensor's own quantization in the graph instead of re-quantizing its fp32 values.

Re-quantizing a Q4_K tensor to symmetric int4 rounds it a second time (y = x W^T of the 1.5B
target's blk.0 gate+up is off by 10.8% at block 128, 8.7% at block 32; tools/q4k_encoding.py).
Q4_K stores, per 32 values of a row, w = s*q - m with s = d*sc, m = dmin*m6 and q in 0..15,
that is s*(q - 8) - (m - 8s): ONNX Runtime computes it exactly as

    MatMulNBits(x, q, scales s, block 32) - blocksum32(x) @ offsets[K/32, N],  offsets = m - 8s

MatMulNBits without zero points (its implicit 8) runs MLAS's symmetric kernel: with explicit
zero points 0 the same gate+up MatMulNBits took about twice as long (0.93 vs 0.44 ms a row). The offsets
term is a small fp32 MatMul over the 32-value block sums of x (K/32 rows).
Q8_0 and Q5_0 are exactly 8-bit MatMulNBits at block 32 (Q5_0's 5-bit values fit 8 bits;
there is no 5-bit MatMulNBits, and 4 bits would round them again: most of Gemma 3 270M's
Q4_K_M tensors are Q5_0), Q6_K exactly 8-bit at block 16 (its scale granularity). Other
types return None here and the caller re-quantizes them as configured. All these blocks (32, 16) are row-invariant in MLAS, so --exact still works.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

Q4K_SUB_BLOCK = 32  # values per Q4_K scale/min: the MatMulNBits block of the exact encoding
QK_K = 256  # values per k-quant super-block
INT4_ZERO, INT8_ZERO = 8, 128  # MatMulNBits' zero points when none are given (4 and 8 bits)

# Rows decoded at a time: bounds the decoders' uint8 temporaries, ~1 GB at once for the
# 151,936-row Q6_K LM head of the 1.5B target (the export's peak RSS), ~30 MB per chunk.
ROWS_PER_CHUNK = 8192

Q4K, INT8 = "q4k", "int8-kept"  # the kept encodings: Q4_K's triple, or an exact 8-bit MatMulNBits


@dataclass
class Int8Parts:
    """Rows as 8-bit MatMulNBits: w[n, k] = scales[n, k/block] * (packed - 128)."""

    packed: np.ndarray  # [N, K/block, block] uint8
    scales: np.ndarray  # [N, K/block] fp32
    block: int


def by_row_chunks(decode: Callable[[np.ndarray], tuple], rows: np.ndarray) -> tuple:
    """decode(rows) -> arrays with one row per input row, run ROWS_PER_CHUNK rows at a time into
    preallocated outputs (its temporaries then stay small whatever the tensor's size)."""
    out = None
    for i in range(0, rows.shape[0], ROWS_PER_CHUNK):
        chunk = decode(rows[i:i + ROWS_PER_CHUNK])
        if out is None:
            out = tuple(np.empty((rows.shape[0],) + a.shape[1:], a.dtype) for a in chunk)
        for o, a in zip(out, chunk):
            o[i:i + len(a)] = a
    return out


def _q8_0(rows: np.ndarray) -> tuple:
    """Q8_0 (fp16 d, 32 int8 q per block: w = d*q) -> (packed + 128, scales d), block 32."""
    n = rows.shape[0]
    blocks = rows.reshape(-1, 34)
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    q = blocks[:, 2:].copy().view(np.int8).astype(np.int16) + INT8_ZERO
    return q.astype(np.uint8).reshape(n, -1, 32), d.reshape(n, -1)


def _q5_0(rows: np.ndarray) -> tuple:
    """Q5_0 (fp16 d, 32 high bits, 16 bytes of low nibbles per 32 values: w = d*(q - 16)) ->
    (packed q - 16 + 128, scales d), block 32. Layout as gguf.quants.Q5_0.dequantize_blocks reads it."""
    n = rows.shape[0]
    blocks = rows.reshape(-1, 22)
    nb = blocks.shape[0]
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)
    qh = blocks[:, 2:6].copy().view(np.uint32).reshape(nb, 1) >> np.arange(32, dtype=np.uint32).reshape(1, 32)
    ql = (blocks[:, 6:].reshape(nb, 1, 16) >> np.array([0, 4], np.uint8).reshape(1, 2, 1)) & 0x0F
    q = ql.reshape(nb, 32) | ((qh & 1).astype(np.uint8) << 4)  # 0..31, the value is q - 16
    return (q + (INT8_ZERO - 16)).astype(np.uint8).reshape(n, -1, 32), d.reshape(n, -1)


def _q6_k(rows: np.ndarray) -> tuple:
    """Q6_K (per 16 values an int8 scale times fp16 d, q in 0..63 offset by 32) -> (packed
    q - 32 + 128, scales), block 16. Bit layout as gguf.quants.Q6_K.dequantize_blocks reads it."""
    n = rows.shape[0]
    blocks = rows.reshape(-1, 210)
    nb = blocks.shape[0]
    ql, qh, sc, d = np.hsplit(blocks, [QK_K // 2, QK_K // 2 + QK_K // 4, QK_K // 2 + QK_K // 4 + QK_K // 16])
    scales = d.copy().view(np.float16).astype(np.float32) * sc.view(np.int8).astype(np.float32)
    ql = (ql.reshape(nb, -1, 1, 64) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)) & 0x0F
    qh = (qh.reshape(nb, -1, 1, 32) >> np.array([0, 2, 4, 6], np.uint8).reshape(1, 1, 4, 1)) & 0x03
    q = ql.reshape(nb, -1, 32) | (qh.reshape(nb, -1, 32) << 4)  # 0..63, the value is q - 32
    return (q + (INT8_ZERO - 32)).astype(np.uint8).reshape(n, -1, 16), scales.reshape(n, -1)


def kept_encoding(qtype: int) -> Optional[str]:
    """The encoding that keeps a GGML type exactly, or None (re-quantize as configured)."""
    from gguf import GGMLQuantizationType as Q

    return {Q.Q4_K: Q4K, Q.Q6_K: INT8, Q.Q8_0: INT8, Q.Q5_0: INT8}.get(qtype)


def int8_parts(qtype: int, rows: np.ndarray) -> Int8Parts:
    """The exact 8-bit parts of a type kept_encoding maps to INT8."""
    from gguf import GGMLQuantizationType as Q

    packed, scales = by_row_chunks({Q.Q6_K: _q6_k, Q.Q8_0: _q8_0, Q.Q5_0: _q5_0}[qtype], rows)
    return Int8Parts(packed, scales, int8_block(qtype))


def int8_block(qtype: int) -> int:
    """The MatMulNBits block of a type kept as INT8 (its own scale granularity)."""
    from gguf import GGMLQuantizationType as Q

    return {Q.Q6_K: 16, Q.Q8_0: 32, Q.Q5_0: 32}[qtype]


@dataclass
class Q4KParts:
    """A Q4_K tensor in MatMulNBits layout: w[n, k] = scales[n, k/32] * (q - 8) - offsets[n, k/32]."""

    packed: np.ndarray   # [N, K/32, 16] uint8, two 4-bit q per byte, low nibble first
    scales: np.ndarray   # [N, K/32] fp32, d * sc
    offsets: np.ndarray  # [N, K/32] fp32, dmin * m - 8 * d * sc


def q4k_parts(rows: np.ndarray) -> Q4KParts:
    """Decode Q4_K blocks ([N, bytes per row], 144 bytes per 256 values) into MatMulNBits parts."""
    return Q4KParts(*by_row_chunks(_q4k, rows))


def _q4k(rows: np.ndarray) -> tuple:
    """Q4_K rows -> (packed q, scales s = d*sc, offsets dmin*m - 8s).

    Block layout (ggml-quants.c, block_q4_K): fp16 d, fp16 dmin, 12 bytes of eight 6-bit
    (sc, m) pairs, 128 bytes of 4-bit q: per 64 values, 32 bytes whose low nibbles are the
    first 32 values and high nibbles the next 32.
    """
    from gguf.quants import Q4_K

    n = rows.shape[0]
    blocks = rows.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    nibbles = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (nibbles & 0x0F).reshape(n, -1)
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, -1, Q4K_SUB_BLOCK // 2)
    scales = (d * sc.astype(np.float32)).reshape(n, -1)
    return packed, scales, (dmin * m.astype(np.float32)).reshape(n, -1) - INT4_ZERO * scales
