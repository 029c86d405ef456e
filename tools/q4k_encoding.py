"""Measure one GGUF linear under each encoding the exporter can give it, built by graph.py's own
linear(): re-quantized int4 (block 128, the old target default; block 32, the old draft's),
re-quantized int8 block 32, and kept (export/gguf_quant.py: Q4_K exact as symmetric MatMulNBits
minus block sums @ offsets; Q6_K/Q8_0 exact 8-bit).

    python tools/q4k_encoding.py GGUF [--tensors blk.0.ffn_gate.weight,blk.0.ffn_up.weight]
        [--threads 2] [--reps 30]

Several --tensors are packed as the graph packs them (q,k,v; gate,up). Prints, per encoding,
the relative error of y = x W^T against fp64 on the GGUF's own values at accuracy level 4
(int8 activations, the default) and 0 (fp32 compute), the min/median ms for 1 and 5 rows, and
whether a row computed among 2 equals the same row among 5 (row invariance, the --exact question).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_ssd_export.gguf_source import Blocks, gguf_config, read_blocks, read_header, read_tensor  # noqa: E402
from edge_ssd_export.graph import ORT_DOMAIN, Arch, QuantConfig, TensorWriter, _Decoder, _Graph  # noqa: E402

ENCODINGS = (  # label, configured weights, block size, keep the GGUF's own encoding
    ("re-quantized int4 block 128", "int4", 128, False),
    ("re-quantized int4 block 32", "int4", 32, False),
    ("re-quantized int8 block 32", "int8", 32, False),
    ("kept (gguf_quant.py)", "int4", 32, True),
)


def session(arch: Arch, parts: list, quant: QuantConfig, threads: int, folder: Path):
    """An ORT session of x [1, S, K] -> the one linear over `parts` that the graph builder emits."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    folder.mkdir(parents=True, exist_ok=True)
    g = _Graph(TensorWriter(folder / "w.data"))
    y = _Decoder(arch, lambda name: None, quant, g, 1).linear("x", parts, "linear", quant.weights)
    g.writer.close()
    g.nodes.append(helper.make_node("Identity", [y], ["y"]))
    k = parts[0][0].shape[1]
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ORT_DOMAIN, 1)])
    onnx.save_model(model, str(folder / "m.onnx"))
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    return ort.InferenceSession(str(folder / "m.onnx"), so, providers=["CPUExecutionProvider"])


def timed(sess, x: np.ndarray, reps: int) -> str:
    for _ in range(3):
        sess.run(None, {"x": x})
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        sess.run(None, {"x": x})
        ts.append(time.perf_counter() - t)
    return f"{1e3 * min(ts):.2f}/{1e3 * float(np.median(ts)):.2f}"


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("gguf", type=Path)
    ap.add_argument("--tensors", default="blk.0.ffn_gate.weight,blk.0.ffn_up.weight")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--reps", type=int, default=30)
    args = ap.parse_args()
    h = read_header(args.gguf, vocabulary=False)
    arch = Arch.from_config(gguf_config(read_header(args.gguf)))
    names = args.tensors.split(",")
    parts = [(read_tensor(h, n), Blocks(h.tensors[n].qtype, read_blocks(h, n))) for n in names]
    x = np.random.default_rng(0).standard_normal((1, 5, parts[0][0].shape[1])).astype(np.float32)
    ref = x[0].astype(np.float64) @ np.concatenate([w for w, _ in parts]).T.astype(np.float64)
    print(f"{args.tensors} (GGML types {[b.qtype for _, b in parts]}), {args.threads} threads; ms min/median")
    for label, weights, block, keep in ENCODINGS:
        with tempfile.TemporaryDirectory() as tmp:
            errs = {}
            for level in (0, 4):
                quant = QuantConfig(weights, block, level, keep_source_quant=keep)
                sess = session(arch, parts, quant, args.threads, Path(tmp) / str(level))
                errs[level] = _rel(sess.run(None, {"x": x})[0][0], ref)
            y5, y2 = sess.run(None, {"x": x})[0][0], sess.run(None, {"x": x[:, :2]})[0][0]
            print(f"  {label}: rel. error {errs[4]:.2e} (level 4), {errs[0]:.2e} (fp32); "
                  f"1 row {timed(sess, x[:, :1], args.reps)} ms, 5 rows {timed(sess, x, args.reps)} ms; "
                  f"row invariant: {bool((y5[:2] == y2).all())}", flush=True)
            del sess
    return 0


if __name__ == "__main__":
    sys.exit(main())
