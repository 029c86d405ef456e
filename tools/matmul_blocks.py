#!/usr/bin/env python3
"""What the int4 block size costs one decode-step matmul: a lone MatMulNBits node (4 bits,
symmetric, accuracy level 4, one row) at block 32, 64 and 128 for the shapes of the default
pair, random weights, 2 threads. The LM heads do not fit in the cache, so theirs is the DRAM
rate; the layer matmuls alone do fit, so theirs is the kernel's own cost per byte.

    python tools/matmul_blocks.py [--threads 2] [--reps 40] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from edge_ssd.model import session_options

SHAPES = {"draft gate/up": (896, 9728), "draft LM head": (896, 151936),
          "target gate/up": (1536, 17920), "target LM head": (1536, 151936)}   # (K, N)
BLOCKS = (32, 64, 128)


def matmul_model(k: int, n: int, block: int) -> bytes:
    rng = np.random.default_rng(0)
    blocks = k // block
    w = numpy_helper.from_array(rng.integers(0, 256, (n, blocks, block // 2), dtype=np.uint8), "W")
    s = numpy_helper.from_array((rng.random(n * blocks) * 0.01).astype(np.float32), "S")
    node = helper.make_node("MatMulNBits", ["A", "W", "S"], ["Y"], domain="com.microsoft",
                            K=k, N=n, bits=4, block_size=block, accuracy_level=4)
    graph = helper.make_graph([node], "matmul", [helper.make_tensor_value_info("A", TensorProto.FLOAT, [1, k])],
                              [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [1, n])], [w, s])
    opsets = [helper.make_opsetid("", 18), helper.make_opsetid("com.microsoft", 1)]
    return helper.make_model(graph, opset_imports=opsets).SerializeToString()


def time_ms(k: int, n: int, block: int, threads: int, reps: int) -> float:
    """Fastest of `reps` one-row runs (the uncontended cost), in ms; the runtime's own session options."""
    sess = ort.InferenceSession(matmul_model(k, n, block), session_options(threads), providers=["CPUExecutionProvider"])
    x = {"A": np.random.default_rng(1).random((1, k), dtype=np.float32)}
    for _ in range(5):
        sess.run(None, x)
    ts = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(None, x)
        ts.append(time.perf_counter() - t0)
    return 1000 * min(ts)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=40)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    out = []
    for name, (k, n) in SHAPES.items():
        for block in BLOCKS:
            ms = time_ms(k, n, block, args.threads, args.reps)
            nbytes = n * k // 2 + n * (k // block) * 4    # int4 weights + fp32 scales
            out.append({"matmul": name, "K": k, "N": n, "block": block, "ms": ms, "bytes": nbytes,
                        "gb_per_s": nbytes / ms / 1e6})
            print(f"{name:<16} K={k:<5} N={n:<7} block {block:<4}{ms:>8.3f} ms{nbytes / 1e6:>8.1f} MB"
                  f"{nbytes / ms / 1e6:>7.1f} GB/s", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"threads": args.threads, "reps": args.reps, "runs": out}, indent=1))


if __name__ == "__main__":
    main()
