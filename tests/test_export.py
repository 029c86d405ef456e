"""Export: fused graphs equal the Hugging Face model, the golden check, manifests, refusals."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from conftest import export_bundle
from edge_ssd.bundle import load_bundle
from edge_ssd.errors import BundleError
from edge_ssd.model import OnnxLM

torch = pytest.importorskip("torch")


def hf_logits(folder, ids):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


@pytest.mark.parametrize("key", ["target", "llama"])
def test_fp32_graph_matches_hugging_face(tiny_sources, tmp_path, key):
    b = export_bundle(tiny_sources, tmp_path / "b", "fp32", draft=False, target_key=key)
    ids = list(range(5, 45))
    lm = OnnxLM(b.target, threads=1)
    ours = lm.forward(ids, keep=len(ids))
    np.testing.assert_allclose(ours, hf_logits(tiny_sources[key], ids), atol=1e-3, rtol=1e-3)


@pytest.mark.parametrize("quant,tol", [("fp32", 1e-4), ("fp16", 5e-2), ("int8", 0.5), ("int4", 0.5)])
@pytest.mark.parametrize("key", ["target", "llama"])
def test_golden_k_plus_1_at_once_equals_one_at_a_time(tiny_sources, tmp_path, quant, tol, key):
    """Tolerance: fp32 differs only by summation order; int kernels quantize activations per row."""
    b = export_bundle(tiny_sources, tmp_path / "b", quant, draft=False, target_key=key)
    lm = OnnxLM(b.target, threads=1)
    rng = np.random.default_rng(0)
    for past, k1 in [(1, 2), (7, 5), (30, 9)]:
        ids = rng.integers(3, 290, past + k1).tolist()
        lm.reset()
        lm.forward(ids[:past])
        at_once = lm.forward(ids[past:], keep=k1).copy()
        lm.truncate(past)
        one = np.stack([lm.forward([t])[0].copy() for t in ids[past:]])
        assert np.abs(at_once - one).max() <= tol, (quant, past, k1)
    report = b.manifest["validation"]["target"]
    assert report["golden_max_abs_diff"] <= report["golden_tolerance"]


def test_rollback_overwrites_stale_cache(fp32_bundle):
    lm = OnnxLM(fp32_bundle.target, threads=1)
    a = lm.forward([5, 6, 7, 8, 9, 10], keep=1).copy()
    lm.reset()
    lm.forward([5, 6, 7, 50, 60])   # a different continuation, then roll back over it
    lm.truncate(3)
    b = lm.forward([8, 9, 10], keep=1)
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_manifest_round_trip(fp32_bundle):
    m = json.loads((fp32_bundle.path / "pair.json").read_text())
    assert m["schema"] == "edge-ssd/pair-bundle" and m["schema_version"] == 1
    again = load_bundle(fp32_bundle.path, verify="full")
    assert again.manifest == m
    t = again.target
    assert (t.num_layers, t.num_kv_heads, t.head_dim, t.vocab_size) == (2, 2, 16, 300)
    assert t.kv_bytes_per_token == 2 * 2 * 2 * 16 * 4
    assert again.draft is not None and again.draft.quant["weights"] == "fp32"
    assert 2 in m["tokenizer"]["eos_ids"] and m["tokenizer"]["chat_template"]
    assert {"torch", "onnx", "onnxruntime"} <= set(m["provenance"]["tools"])
    assert m["validation"]["draft"]["top1_agreement_vs_fp32"] > 0.99


def test_corrupt_file_is_named(fp32_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle.path, copy)
    data = copy / "draft" / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with pytest.raises(BundleError, match="draft/model.onnx.data is corrupt"):
        load_bundle(copy)
    (copy / "target" / "model.onnx").unlink()
    with pytest.raises(BundleError, match="target/model.onnx is missing"):
        load_bundle(copy, verify="size")


def test_manifest_path_outside_bundle_is_refused(fp32_bundle, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(fp32_bundle.path, copy)
    m = json.loads((copy / "pair.json").read_text())
    m["models"]["draft"]["files"][0]["path"] = "../../etc/passwd"
    (copy / "pair.json").write_text(json.dumps(m))
    with pytest.raises(BundleError, match="outside the bundle"):
        load_bundle(copy)


def test_half_written_bundle_is_refused(fp32_bundle, tmp_path):
    copy = tmp_path / "half"
    shutil.copytree(fp32_bundle.path, copy)
    (copy / "pair.json").unlink()
    with pytest.raises(BundleError, match="not a complete bundle"):
        load_bundle(copy)


def test_interrupted_export_leaves_nothing_loadable(tiny_sources, tmp_path, monkeypatch):
    from edge_ssd_export import pipeline

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "_write_manifest", boom)
    with pytest.raises(KeyboardInterrupt):
        export_bundle(tiny_sources, tmp_path / "b", "fp32")
    assert not (tmp_path / "b").exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".b.partial")]


def test_mismatched_tokenizer_is_refused(tiny_sources, tmp_path):
    from edge_ssd_export.validate import ValidationError
    from tiny import make_tokenizer

    other = tmp_path / "other-draft"
    shutil.copytree(tiny_sources["draft"], other)
    make_tokenizer(other, specials=["<|im_start|>", "<|endoftext|>", "<|im_end|>"])  # ids 0 and 1 swapped
    with pytest.raises(ValidationError, match="differ at id 0"):
        export_bundle({**tiny_sources, "draft": other}, tmp_path / "b", "fp32")
    assert not (tmp_path / "b").exists()


def test_unsupported_architecture_is_refused_by_name(tiny_sources, tmp_path):
    from edge_ssd_export.graph import UnsupportedModelError

    odd = tmp_path / "odd"
    shutil.copytree(tiny_sources["llama"], odd)
    cfg = json.loads((odd / "config.json").read_text())
    cfg["architectures"] = ["GPT2LMHeadModel"]
    (odd / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="GPT2LMHeadModel"):
        export_bundle({**tiny_sources, "llama": odd}, tmp_path / "b", "fp32", draft=False, target_key="llama")


@pytest.mark.parametrize("weights,head", [("int4", "int8"), ("fp32", "fp16"), ("int8", "fp32")])
def test_lm_head_kept_at_other_precision(tiny_sources, tmp_path, weights, head):
    """The head setting takes effect: a more precise head brings logits closer to fp32, a less
    precise one moves them away, compared with a head quantized like the rest."""
    from edge_ssd_export.graph import QuantConfig
    from edge_ssd_export.pipeline import ExportPlan, ModelPlan, export_pair

    ids = list(range(5, 30))
    ref = hf_logits(tiny_sources["target"], ids)
    err = {}
    for h in (head, None):
        q = QuantConfig(weights=weights, block_size=32, accuracy_level=4, lm_head=h)
        b = export_pair(ExportPlan(target=ModelPlan("target", str(tiny_sources["target"]), q), draft=None,
                                   out=tmp_path / f"b-{h}", cache=tmp_path / ".cache"))
        assert b.target.quant["lm_head"] == (h or weights)
        err[h] = float(np.abs(OnnxLM(b.target, threads=1).forward(ids, keep=len(ids)) - ref).mean())
    rank = ["int4", "int8", "fp16", "fp32"]
    if rank.index(head) > rank.index(weights):
        assert err[head] < err[None]
    else:
        assert err[head] > err[None]


def test_lm_head_block_size_applies_to_the_head_only(tiny_sources, tmp_path):
    """The head's own block: its MatMulNBits node carries it, the layers keep theirs, the
    manifest says so, and a finer head block brings the logits closer to fp32."""
    import onnx

    from edge_ssd_export.graph import QuantConfig
    from edge_ssd_export.pipeline import ExportPlan, ModelPlan, export_pair

    ids = list(range(5, 30))
    ref = hf_logits(tiny_sources["target"], ids)
    err = {}
    for head_block in (16, None):
        q = QuantConfig(weights="int4", block_size=64, accuracy_level=4, lm_head_block_size=head_block)
        b = export_pair(ExportPlan(target=ModelPlan("target", str(tiny_sources["target"]), q), draft=None,
                                   out=tmp_path / f"b-{head_block}", cache=tmp_path / ".cache"))
        assert b.target.quant["lm_head_block_size"] == (head_block or 64)
        graph = onnx.load(str(b.target.graph), load_external_data=False).graph
        blocks = {n.name: next(a.i for a in n.attribute if a.name == "block_size")
                  for n in graph.node if n.op_type == "MatMulNBits"}
        assert blocks.pop("lm_head") == (head_block or 64)
        assert set(blocks.values()) == {64}
        err[head_block] = float(np.abs(OnnxLM(b.target, threads=1).forward(ids, keep=len(ids)) - ref).mean())
    assert err[16] < err[None]
