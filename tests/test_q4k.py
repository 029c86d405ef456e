"""A GGUF's own quantization kept in the graph (export/gguf_quant.py): Q4_K blocks built by hand
(gguf.quants has no numpy Q4_K quantizer) reproduce their matmul through ONNX Runtime, the
q/k/v and gate/up linears share one block sum, and a tiny Q4_K/Q8_0 GGUF exports to a graph
equal to the fp32 forward of its own dequantized weights. Torch-free, seconds."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tiny import make_tokenizer
from tiny_gguf import _add_vocabulary

gguf = pytest.importorskip("gguf")
Q = gguf.GGMLQuantizationType
QK_K = 256  # values per Q4_K super-block


def q4k_blocks(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Random Q4_K rows [n, k/256*144] laid out as ggml's block_q4_K (d, dmin, 12 bytes of 6-bit
    scales and mins, 128 bytes of nibbles), with sub-block scales and mins of every size."""
    nb = n * k // QK_K
    d = (rng.uniform(0.5, 1.0, nb) * 2e-4).astype(np.float16)
    dmin = (rng.uniform(0.5, 1.0, nb) * 1.6e-3).astype(np.float16)
    sc, m = rng.integers(0, 64, (nb, 8), dtype=np.uint8), rng.integers(0, 64, (nb, 8), dtype=np.uint8)
    scales = np.empty((nb, 12), np.uint8)  # inverse of ggml's get_scale_min_k4
    scales[:, 0:4] = sc[:, :4] | ((sc[:, 4:] >> 4) << 6)
    scales[:, 4:8] = m[:, :4] | ((m[:, 4:] >> 4) << 6)
    scales[:, 8:12] = (sc[:, 4:] & 15) | ((m[:, 4:] & 15) << 4)
    q = rng.integers(0, 16, (nb, 4, 2, 32), dtype=np.uint8)  # per 64 values: low nibbles, then high
    qs = (q[:, :, 0] | (q[:, :, 1] << 4)).reshape(nb, 128)
    raw = np.concatenate([d.view(np.uint8).reshape(nb, 2), dmin.view(np.uint8).reshape(nb, 2), scales, qs], 1)
    return raw.reshape(n, -1)


def q4k_values(rows: np.ndarray, k: int) -> np.ndarray:
    return gguf.quants.dequantize(rows, Q.Q4_K).reshape(rows.shape[0], k)


def test_q4k_parts_rebuild_the_gguf_values():
    from edge_ssd_export.gguf_quant import q4k_parts

    rows = q4k_blocks(np.random.default_rng(0), 8, 512)
    p = q4k_parts(rows)
    q = np.stack([p.packed & 15, p.packed >> 4], -1).reshape(8, 512).astype(np.float32)
    rebuilt = np.repeat(p.scales, 32, 1) * (q - 8) - np.repeat(p.offsets, 32, 1)
    np.testing.assert_allclose(rebuilt, q4k_values(rows, 512), rtol=0, atol=1e-7)


def q6_k_blocks(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """Random Q6_K rows (210 bytes per 256 values: any bits are a valid ql, qh and int8 scales)
    with a finite fp16 d in the last two bytes."""
    raw = rng.integers(0, 256, (n * k // QK_K, 210), dtype=np.uint8)
    raw[:, 208:] = (rng.uniform(0.5, 1.0, (n * k // QK_K, 1)) * 1e-3).astype(np.float16).view(np.uint8)
    return raw.reshape(n, -1)


def test_int8_parts_rebuild_q6_k_q8_0_and_q5_0():
    """Q6_K at block 16, Q8_0 and Q5_0 at block 32: scales * (packed - 128) is the GGUF's value, exactly."""
    from edge_ssd_export.gguf_quant import int8_parts

    rng = np.random.default_rng(0)
    q8 = gguf.quants.quantize(rng.standard_normal((8, 512)).astype(np.float32), Q.Q8_0)
    q5 = gguf.quants.quantize(rng.standard_normal((8, 512)).astype(np.float32), Q.Q5_0)
    for qtype, rows, block in ((Q.Q6_K, q6_k_blocks(rng, 8, 512), 16), (Q.Q8_0, q8, 32), (Q.Q5_0, q5, 32)):
        p = int8_parts(qtype, rows)
        assert p.block == block and p.packed.shape == (8, 512 // block, block)
        rebuilt = np.repeat(p.scales, block, 1) * (p.packed.reshape(8, 512).astype(np.float32) - 128)
        np.testing.assert_array_equal(rebuilt, gguf.quants.dequantize(rows, qtype).reshape(8, 512))


def test_kl_divergence():
    from edge_ssd_export.validate import kl_divergence

    ref = np.random.default_rng(0).standard_normal((3, 50))
    np.testing.assert_allclose(kl_divergence(ref, ref + 5.0), 0, atol=1e-12)  # a shift is the same distribution
    p, q = np.exp(ref) / np.exp(ref).sum(-1, keepdims=True), np.exp(2 * ref) / np.exp(2 * ref).sum(-1, keepdims=True)
    np.testing.assert_allclose(kl_divergence(ref, 2 * ref), (p * np.log(p / q)).sum(-1))


def _tiny_arch(hidden: int = 256):
    from edge_ssd_export.graph import Arch

    return Arch.from_config({"architectures": ["Qwen2ForCausalLM"], "hidden_size": hidden, "num_hidden_layers": 1,
                             "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 512,
                             "vocab_size": 300, "rms_norm_eps": 1e-6, "rope_theta": 10000.0,
                             "max_position_embeddings": 64, "tie_word_embeddings": False})


def _run_linears(tmp_path: Path, linears: list, k: int, keep: bool = True) -> tuple:
    """Build [x] -> one output per linear (each a list of (fp32, Blocks) parts) with the graph
    builder's own linear(); returns (the outputs for x, the graph's node types)."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper

    from edge_ssd_export.graph import ORT_DOMAIN, QuantConfig, TensorWriter, _Decoder, _Graph

    g = _Graph(TensorWriter(tmp_path / "w.data"))
    d = _Decoder(_tiny_arch(k), lambda name: None, QuantConfig("int4", 32, 0, keep_source_quant=keep), g, 64)
    outs = [d.linear("x", parts, f"lin{i}", "int4") for i, parts in enumerate(linears)]
    g.writer.close()
    for i, y in enumerate(outs):
        g.nodes.append(helper.make_node("Identity", [y], [f"y{i}"]))
    graph = helper.make_graph(g.nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, "s", k])],
                              [helper.make_tensor_value_info(f"y{i}", TensorProto.FLOAT, None) for i in range(len(outs))],
                              initializer=g.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ORT_DOMAIN, 1)])
    onnx.save_model(model, str(tmp_path / "m.onnx"))
    sess = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = np.random.default_rng(1).standard_normal((1, 5, k)).astype(np.float32)
    return x, sess.run(None, {"x": x}), [n.op_type for n in g.nodes]


def _rel(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.linalg.norm(y - ref) / np.linalg.norm(ref))


def test_q4k_encoding_reproduces_the_matmul_and_shares_block_sums(tmp_path):
    """q and k Q4_K, v Q8_0 (packed as one linear: two encodings, concatenated), gate Q4_K and
    a Q6_K linear on the same input: one ReduceSum for both Q4_K linears, fp32 compute exact to ~1e-6."""
    from edge_ssd_export.gguf_source import Blocks

    rng, k = np.random.default_rng(0), 512
    q, kk, gate = (q4k_blocks(rng, n, k) for n in (256, 128, 384))
    v_fp32 = rng.standard_normal((128, k)).astype(np.float32) * 0.05
    v_rows = gguf.quants.quantize(v_fp32, Q.Q8_0)
    parts = {"q": (q4k_values(q, k), Blocks(Q.Q4_K, q)), "k": (q4k_values(kk, k), Blocks(Q.Q4_K, kk)),
             "v": (gguf.quants.dequantize(v_rows, Q.Q8_0), Blocks(Q.Q8_0, v_rows)),
             "gate": (q4k_values(gate, k), Blocks(Q.Q4_K, gate))}
    q6 = q6_k_blocks(rng, 128, k)
    parts["q6"] = (gguf.quants.dequantize(q6, Q.Q6_K).reshape(128, k), Blocks(Q.Q6_K, q6))
    x, (qkv, gu, y6), ops = _run_linears(tmp_path, [[parts[n] for n in "qkv"], [parts["gate"]], [parts["q6"]]], k)
    for y, names in ((qkv, "qkv"), (gu, ["gate"]), (y6, ["q6"])):
        ref = x.astype(np.float64) @ np.concatenate([parts[n][0] for n in names]).T.astype(np.float64)
        assert _rel(y, ref) < 1e-5
    assert ops.count("ReduceSum") == 1 and ops.count("Concat") == 1
    assert ops.count("MatMulNBits") == 4  # q+k packed, v (8-bit), gate, the Q6_K one (8-bit)
    x, (qkv_re, _, _), ops = _run_linears(tmp_path, [[parts[n] for n in "qkv"], [parts["gate"]], [parts["q6"]]], k,
                                          keep=False)
    assert "ReduceSum" not in ops and ops.count("MatMulNBits") == 3  # the old path: one int4 node per linear
    ref = x.astype(np.float64) @ np.concatenate([parts[n][0] for n in "qkv"]).T.astype(np.float64)
    assert _rel(qkv_re, ref) > 100 * _rel(qkv, ref)


# ------------------------------------------------------------------- a tiny Q4_K GGUF, exported

HIDDEN, FFN, LAYERS, HEADS, KV_HEADS = 256, 512, 2, 4, 2
Q8_NAMES = (".attn_v.", "output.weight")  # the rest of the 2-D weights are Q4_K


def _tiny_tensors(rng: np.random.Generator, vocab: int, tied: bool) -> dict:
    """GGUF name -> (GGML type, array as add_tensor takes it) of a tiny Qwen2 model; tied: no
    output.weight, and a Q4_K token_embd that serves as the LM head too."""
    def f32(*shape, scale=0.05):
        return Q.F32, (rng.standard_normal(shape) * scale).astype(np.float32)

    def weight(name, n, k):
        if any(s in name for s in Q8_NAMES):
            return Q.Q8_0, gguf.quants.quantize(f32(n, k)[1], Q.Q8_0)
        return Q.Q4_K, q4k_blocks(rng, n, k)

    kv = KV_HEADS * HIDDEN // HEADS
    out = {"output_norm.weight": (Q.F32, np.ones(HIDDEN, np.float32))}
    if tied:
        out["token_embd.weight"] = (Q.Q4_K, q4k_blocks(rng, vocab, HIDDEN))
    else:
        out["token_embd.weight"] = f32(vocab, HIDDEN, scale=1.0)
        out["output.weight"] = weight("output.weight", vocab, HIDDEN)
    for i in range(LAYERS):
        shapes = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (kv, HIDDEN), "attn_v": (kv, HIDDEN),
                  "attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN),
                  "ffn_down": (HIDDEN, FFN)}
        for short, (n, k) in shapes.items():
            out[f"blk.{i}.{short}.weight"] = weight(f"blk.{i}.{short}.", n, k)
        for short, n in (("attn_q", HIDDEN), ("attn_k", kv), ("attn_v", kv)):
            out[f"blk.{i}.{short}.bias"] = f32(n, scale=0.5)
        for norm in ("attn_norm", "ffn_norm"):
            out[f"blk.{i}.{norm}.weight"] = (Q.F32, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    return out


def write_q4k_gguf(root: Path, tied: bool = False) -> Path:
    """A 2-layer Qwen2 GGUF, hidden 256 (one Q4_K super-block), with the tiny tokenizer."""
    make_tokenizer(root / "tok")
    vocab = len(json.loads((root / "tok" / "tokenizer.json").read_text())["model"]["vocab"])
    path = root / "tiny-q4k.gguf"
    w = gguf.GGUFWriter(str(path), "qwen2")
    for key, value in (("block_count", LAYERS), ("context_length", 256), ("embedding_length", HIDDEN),
                       ("feed_forward_length", FFN), ("head_count", HEADS), ("head_count_kv", KV_HEADS)):
        getattr(w, f"add_{key}")(value)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-6)
    _add_vocabulary(w, root / "tok", "qwen2")
    for name, (qtype, arr) in _tiny_tensors(np.random.default_rng(0), vocab, tied).items():
        w.add_tensor(name, arr, raw_dtype=None if qtype == Q.F32 else qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture(scope="module", params=[False, True], ids=["lm-head", "tied"])
def q4k_gguf(request, tmp_path_factory) -> Path:
    return write_q4k_gguf(tmp_path_factory.mktemp("q4k"), tied=request.param)


def _export(gguf_path: Path, out: Path, keep: bool):
    from edge_ssd_export.graph import QuantConfig
    from edge_ssd_export.pipeline import ExportPlan, ModelPlan, export_pair

    quant = QuantConfig("int4", block_size=32, accuracy_level=0, keep_source_quant=keep)
    return export_pair(ExportPlan(target=ModelPlan("target", str(gguf_path), quant), draft=None, out=out,
                                  cache=out.parent / "cache", force=True))


def test_tiny_q4k_gguf_exports_to_its_own_values(q4k_gguf, tmp_path):
    """Kept, the graph's logits are the fp32 forward of the GGUF's values (fp32 compute), its own
    LM head or the tied embedding's Q4_K blocks; the manifest says it kept them; re-quantized
    (--requantize-gguf), they are much further off."""
    import onnx

    from edge_ssd.model import OnnxLM
    from edge_ssd_export.gguf_source import light_folder, read_header
    from edge_ssd_export.graph import Arch
    from edge_ssd_export.reference import forward_logits
    from edge_ssd_export.weights import open_weights

    folder = light_folder(q4k_gguf, tmp_path / "cache")
    arch = Arch.from_config(json.loads((folder / "config.json").read_text()))
    ids = list(range(3, 43))
    ref = forward_logits(open_weights(folder), arch, [ids], keep_argmax=False)[0]
    tied = "output.weight" not in read_header(q4k_gguf).tensors
    errors = {}
    for keep in (True, False):
        b = _export(q4k_gguf, tmp_path / f"bundle-{keep}", keep)
        assert b.manifest["models"]["target"]["quant"]["keep_source_quant"] is keep
        if keep:  # the head kept as its blocks are: Q4_K (tied to the embedding) or Q8_0
            inits = {t.name for t in onnx.load(str(b.target.graph), load_external_data=False).graph.initializer}
            assert ("lm_head.offsets" in inits) is tied
        errors[keep] = float(np.abs(OnnxLM(b.target, threads=1).forward(ids, keep=len(ids)) - ref).max())
    assert errors[True] < 1e-3 * np.abs(ref).max()
    assert errors[False] > 10 * errors[True]


@pytest.mark.parametrize("choice,keep", [(None, False), ("requantize", False), ("keep", True)])
def test_gguf_weights_option(choice, keep):
    """Re-quantization stays the default (it is the faster graph); --gguf-weights keep opts in."""
    from edge_ssd_export.cli import _quant, build_parser

    argv = ["--target", "m.gguf"] + (["--gguf-weights", choice] if choice else [])
    assert _quant(build_parser().parse_args(argv), None, {}, "target").keep_source_quant is keep
