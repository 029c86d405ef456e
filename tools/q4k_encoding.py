"""Measure: today's int4 re-quantization of a GGUF Q4_K tensor vs an encoding that keeps it exact.

    python tools/q4k_encoding.py GGUF [--tensor blk.0.ffn_gate.weight] [--rows 4]

Q4_K stores, per 32-value sub-block, w = d*sc*q - dmin*m with q in 0..15. That is
MatMulNBits(q, scale d*sc, zero point 0) minus (block sums of x) @ (dmin*m): exact, where
re-quantizing the dequantized weights (graph.py today: symmetric, block 32 or 128) is not.
Prints the relative error of y = x W^T for each encoding against fp32 and each one's time.
Measurement only: the graph builder is not changed.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_ssd_export.gguf_source import read_header, read_tensor  # noqa: E402
from edge_ssd_export.graph import quantize_blockwise  # noqa: E402


def q4k_parts(raw: np.ndarray, n: int, k: int) -> tuple:
    """(q [n, k] uint8 in 0..15, scale [n, k/32], min [n, k/32]) of Q4_K rows, fp32."""
    from gguf.quants import Q4_K

    blocks = raw.reshape(-1, 144)
    d = blocks[:, 0:2].copy().view(np.float16).astype(np.float32)
    dmin = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
    sc, m = Q4_K.get_scale_min(blocks[:, 4:16])
    qs = blocks[:, 16:].reshape(-1, 4, 1, 32) >> np.array([0, 4], np.uint8).reshape(1, 1, 2, 1)
    q = (qs & 0x0F).reshape(n, k)
    return q, (d * sc.astype(np.float32)).reshape(n, k // 32), (dmin * m.astype(np.float32)).reshape(n, k // 32)


def _session(nodes, inits, k: int, n: int):
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["m", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["m", n])],
                              initializer=[numpy_helper.from_array(v, name) for name, v in inits.items()])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def _mnb(name: str, out: str, k: int, n: int, bits: int, block: int, level: int, zp: bool):
    from onnx import helper

    ins = ["x", f"{name}.q", f"{name}.s"] + ([f"{name}.zp"] if zp else [])
    return helper.make_node("MatMulNBits", ins, [out], domain="com.microsoft", K=k, N=n, bits=bits,
                            block_size=block, accuracy_level=level)


def requantized(w: np.ndarray, block: int, level: int):
    n, k = w.shape
    packed, scales = quantize_blockwise(np.ascontiguousarray(w.T), 4, block)
    return _session([_mnb("w", "y", k, n, 4, block, level, False)], {"w.q": packed, "w.s": scales}, k, n)


def exact_q4k(q: np.ndarray, scale: np.ndarray, mins: np.ndarray, level: int):
    from onnx import helper

    n, k = q.shape
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, k // 32, 16)
    zp = np.zeros((n, (k // 32 + 1) // 2), np.uint8)
    nodes = [_mnb("w", "y1", k, n, 4, 32, level, True),
             helper.make_node("Reshape", ["x", "shape"], ["xb"]),
             helper.make_node("ReduceSum", ["xb", "axes"], ["xs"], keepdims=0),
             helper.make_node("MatMul", ["xs", "minsT"], ["y2"]),
             helper.make_node("Sub", ["y1", "y2"], ["y"])]
    inits = {"w.q": packed, "w.s": scale.astype(np.float32), "w.zp": zp,
             "shape": np.array([-1, k // 32, 32], np.int64), "axes": np.array([-1], np.int64),
             "minsT": np.ascontiguousarray(mins.T.astype(np.float32))}
    return _session(nodes, inits, k, n)


def exact_q4k_matmul_only(q: np.ndarray, scale: np.ndarray, level: int):
    """The MatMulNBits part of exact_q4k alone (its cost without the mins correction)."""
    n, k = q.shape
    packed = (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8).reshape(n, k // 32, 16)
    zp = np.zeros((n, (k // 32 + 1) // 2), np.uint8)
    return _session([_mnb("w", "y", k, n, 4, 32, level, True)],
                    {"w.q": packed, "w.s": scale.astype(np.float32), "w.zp": zp}, k, n)


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def _ms(sess, x: np.ndarray, reps: int = 30) -> float:
    sess.run(None, {"x": x})
    t = time.perf_counter()
    for _ in range(reps):
        sess.run(None, {"x": x})
    return (time.perf_counter() - t) / reps * 1e3


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--tensor", default="blk.0.ffn_gate.weight")
    ap.add_argument("--rows", type=int, default=4)
    args = ap.parse_args()
    h = read_header(args.gguf, vocabulary=False)
    t = h.tensors[args.tensor]
    n, k = t.shape
    raw = np.fromfile(h.path, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
    w = read_tensor(h, args.tensor)
    q, scale, mins = q4k_parts(raw, n, k)
    rebuilt = (np.repeat(scale, 32, 1) * q - np.repeat(mins, 32, 1)).astype(np.float32)
    print(f"{args.tensor} {n}x{k}: Q4_K parts rebuild gguf's values, max |diff| {np.abs(rebuilt - w).max():.3g}")
    x = np.random.default_rng(0).standard_normal((args.rows, k)).astype(np.float32)
    ref = x.astype(np.float64) @ w.T.astype(np.float64)
    for label, make in (("re-quantized int4 b128 (today's target)", lambda lv: requantized(w, 128, lv)),
                        ("re-quantized int4 b32 (today's draft)", lambda lv: requantized(w, 32, lv)),
                        ("Q4_K exact: MatMulNBits zp 0 - blocksum(x)@mins", lambda lv: exact_q4k(q, scale, mins, lv))):
        errs = {lv: _rel(make(lv).run(None, {"x": x})[0], ref) for lv in (0, 4)}
        print(f"  {label}: rel. error of x W^T {errs[0]:.2e} (fp32 compute), {errs[4]:.2e} (accuracy level 4); "
              f"ms at level 4: {_ms(make(4), x[:1]):.2f} (1 row), {_ms(make(4), x):.2f} ({args.rows} rows)")
    only = exact_q4k_matmul_only(q, scale, 4)
    print(f"  its MatMulNBits with zero points alone: {_ms(only, x[:1]):.2f} ms (1 row), {_ms(only, x):.2f} ms "
          f"({args.rows} rows)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
