"""GGUF read directly (no torch): weights, permutation, tokenizer, torch-free export; safetensors
bf16 without torch; the numpy reference against the Hugging Face model."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tiny_gguf import qwen2_style_tokenizer, write_gguf
from tokenizer_corpus import TRICKY, tokenizer_disagreements

torch = pytest.importorskip("torch")
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def ggufs(tiny_sources, tmp_path_factory) -> dict:
    """Qwen2 target and draft (Qwen2 pre-tokenizer), Llama (Q/K permuted), as f32 GGUF files,
    next to copies of their Hugging Face folders with the same tokenizer."""
    import shutil

    root = tmp_path_factory.mktemp("gguf")
    out = {}
    for key in ("target", "draft", "llama"):
        hf = root / f"hf-{key}"
        shutil.copytree(tiny_sources[key], hf)
        if key != "llama":
            qwen2_style_tokenizer(hf)
        out[key] = (write_gguf(hf, root / f"{key}.gguf", pre="qwen2" if key != "llama" else "gpt-2"), hf)
    return out


def _light(gguf: Path, tmp_path: Path) -> Path:
    from edge_ssd_export.gguf_source import light_folder

    return light_folder(gguf, tmp_path / "cache")


@pytest.mark.parametrize("key", ["target", "llama"])
def test_gguf_weights_equal_hugging_face(ggufs, tmp_path, key):
    """Every parameter, in Hugging Face layout: for llama, llama.cpp's Q/K permutation undone."""
    from safetensors.numpy import load_file

    from edge_ssd_export.weights import open_weights

    gguf, hf = ggufs[key]
    weight = open_weights(_light(gguf, tmp_path))
    expected = load_file(str(hf / "model.safetensors"))
    for name, t in expected.items():
        np.testing.assert_array_equal(weight(name), t, err_msg=name)
    cfg = json.loads((_light(gguf, tmp_path) / "config.json").read_text())
    hf_cfg = json.loads((hf / "config.json").read_text())
    for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads",
              "intermediate_size", "vocab_size", "max_position_embeddings", "tie_word_embeddings"):
        assert cfg[k] == hf_cfg[k], k
    assert cfg["rms_norm_eps"] == pytest.approx(hf_cfg["rms_norm_eps"], rel=1e-6)


def test_llama_unpermutation_agrees_with_transformers(ggufs, tmp_path):
    """An independent reading of the same GGUF: transformers' own GGUF loader."""
    pytest.importorskip("accelerate")
    from transformers import AutoModelForCausalLM

    from edge_ssd_export.weights import open_weights

    gguf, _ = ggufs["llama"]
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    weight = open_weights(_light(gguf, tmp_path))
    for name, t in model.state_dict().items():
        if name == "lm_head.weight":
            name = "model.embed_tokens.weight"  # tied
        np.testing.assert_allclose(weight(name), t.numpy(), rtol=0, atol=1e-6, err_msg=name)


def test_quantized_tensors_dequantize_like_gguf(ggufs, tmp_path):
    """Quantized tensors (more rows than one dequantization chunk) read as gguf.quants reads them."""
    import gguf as gg
    from safetensors.numpy import load_file

    from edge_ssd_export.weights import open_weights

    _, hf = ggufs["target"]
    q = {"token_embd.weight": gg.GGMLQuantizationType.Q8_0, "blk.0.ffn_down.weight": gg.GGMLQuantizationType.Q4_0}
    path = write_gguf(hf, tmp_path / "q.gguf", quant=q)
    weight = open_weights(_light(path, tmp_path))
    src = load_file(str(hf / "model.safetensors"))
    for hf_name, g in (("model.embed_tokens.weight", "token_embd.weight"), ("model.layers.0.mlp.down_proj.weight",
                                                                           "blk.0.ffn_down.weight")):
        expected = gg.quants.dequantize(gg.quants.quantize(src[hf_name], q[g]), q[g])
        got = weight(hf_name)
        assert got.shape == src[hf_name].shape
        np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("key", ["target", "llama"])
def test_gguf_tokenizer_encodes_like_the_source(ggufs, tmp_path, key):
    from edge_ssd_export.tokenizer_meta import load_tokenizer, tokenizer_meta

    gguf, hf = ggufs[key]
    light = _light(gguf, tmp_path)
    ours, theirs = load_tokenizer(light / "tokenizer.json"), load_tokenizer(hf / "tokenizer.json")
    assert tokenizer_disagreements(ours, theirs, TRICKY) == []
    assert ours.get_vocab(with_added_tokens=True) == theirs.get_vocab(with_added_tokens=True)
    meta, ref = tokenizer_meta(light, light / "tokenizer.json"), tokenizer_meta(hf, hf / "tokenizer.json")
    for k in ("eos_ids", "special_tokens", "chat_template", "add_bos", "vocab_size"):
        assert meta[k] == ref[k], k


def test_qwen2_pre_tokenizer_matters(ggufs, tmp_path):
    """The corpus tells pre-tokenizers apart: the GPT-2 one disagrees with Qwen2's somewhere."""
    from edge_ssd_export.tokenizer_meta import load_tokenizer

    gguf, hf = ggufs["target"]
    gpt2 = write_gguf(hf, tmp_path / "gpt2-pre.gguf", pre="gpt-2")
    wrong = load_tokenizer(_light(gpt2, tmp_path) / "tokenizer.json")
    assert tokenizer_disagreements(wrong, load_tokenizer(hf / "tokenizer.json"), TRICKY)


def test_header_reads_like_gguf_reader(ggufs):
    """Our header parser against the gguf package's own reader, with and without the vocabulary."""
    import gguf as gg

    from edge_ssd_export.gguf_source import read_header

    path = ggufs["llama"][0]
    ref = gg.GGUFReader(str(path))
    full, light = read_header(path), read_header(path, vocabulary=False)
    for f in ref.fields.values():
        if f.name.startswith("GGUF."):
            continue
        value = f.contents()
        assert full.metadata[f.name] == (pytest.approx(value) if isinstance(value, float) else value), f.name
    assert full.metadata["tokenizer.ggml.tokens"] and light.metadata["tokenizer.ggml.tokens"] is None
    for t in ref.tensors:
        for h in (full, light):
            info = h.tensors[t.name]
            assert (info.offset, info.n_bytes, info.qtype) == (t.data_offset, t.n_bytes, t.tensor_type), t.name
            assert info.shape == tuple(int(d) for d in reversed(t.shape)), t.name


def test_unmapped_gguf_is_named(ggufs, tmp_path):
    from edge_ssd_export.gguf_source import UnsupportedGGUF, gguf_config, read_header

    header = read_header(ggufs["target"][0])
    header.metadata["general.architecture"] = "gpt2"
    with pytest.raises(UnsupportedGGUF, match="architecture 'gpt2'"):
        gguf_config(header)


def test_truncated_gguf_is_refused_by_name(ggufs, tmp_path):
    from edge_ssd_export.sources import SourceError, resolve_source

    data = ggufs["target"][0].read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) - 100])
    with pytest.raises(SourceError, match="cut.gguf: truncated GGUF file"):
        resolve_source(str(cut), tmp_path / "cache")


EXPORT_NO_TORCH = """
import sys, json
from pathlib import Path
from edge_ssd_export.graph import QuantConfig
from edge_ssd_export.pipeline import ExportPlan, ModelPlan, export_pair
q = QuantConfig(weights="fp32", block_size=32, accuracy_level=0)
b = export_pair(ExportPlan(target=ModelPlan("target", sys.argv[1], q), draft=ModelPlan("draft", sys.argv[2], q),
                           out=Path(sys.argv[3]), cache=Path(sys.argv[4])))
heavy = sorted(m for m in sys.modules if m.split(".")[0] in ("torch", "transformers", "accelerate"))
print(json.dumps({"heavy": heavy}))
"""


def test_gguf_export_imports_no_torch_and_matches_hugging_face(ggufs, tmp_path):
    """The whole export of a GGUF pair in a fresh process: torch never imported, the fp32
    graph equal to the Hugging Face model, validated against the numpy reference."""
    from test_export import hf_logits

    from edge_ssd.bundle import load_bundle
    from edge_ssd.model import OnnxLM

    (target, hf), (draft, _) = ggufs["target"], ggufs["draft"]
    out = tmp_path / "bundle"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-c", EXPORT_NO_TORCH, str(target), str(draft), str(out),
                           str(tmp_path / "cache")], capture_output=True, text=True, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == {"heavy": []}
    b = load_bundle(out)
    assert not {"torch", "transformers"} & set(b.manifest["provenance"]["tools"])
    ids = list(range(5, 45))
    np.testing.assert_allclose(OnnxLM(b.target, threads=1).forward(ids, keep=len(ids)), hf_logits(hf, ids),
                               atol=1e-3, rtol=1e-3)
    v = b.manifest["validation"]
    assert v["target"]["reference"] == "numpy-fp32" and v["target"]["top1_agreement_vs_fp32"] > 0.99


@pytest.mark.parametrize("key", ["target", "llama"])
def test_numpy_reference_matches_hugging_face(tiny_sources, key):
    from test_export import hf_logits

    from edge_ssd_export.graph import Arch
    from edge_ssd_export.reference import forward_logits
    from edge_ssd_export.weights import open_weights

    folder = tiny_sources[key]
    arch = Arch.from_config(json.loads((folder / "config.json").read_text()))
    prompts = [list(range(5, 45)), [7, 3, 250]]
    got = forward_logits(open_weights(folder), arch, prompts, keep_argmax=False)
    for p, g in zip(prompts, got):
        np.testing.assert_allclose(g, hf_logits(folder, p), atol=1e-3, rtol=1e-3)


def test_bf16_safetensors_read_without_torch(tmp_path):
    from safetensors.torch import save_file

    from edge_ssd_export.weights import open_weights

    t = {"a": torch.randn(7, 5).to(torch.bfloat16), "b": torch.randn(3).to(torch.float16),
         "c": torch.randn(2, 2)}
    save_file(t, str(tmp_path / "model.safetensors"))
    weight = open_weights(tmp_path)
    for k, v in t.items():
        got = weight(k)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, v.float().numpy())


@pytest.mark.parametrize("key", ["target", "llama"])
def test_reference_tap_equals_the_standalone_forward(tiny_sources, tmp_path, key):
    """The reference computed on the weights as the build reads them is the reference."""
    from edge_ssd_export.graph import Arch, QuantConfig
    from edge_ssd_export.pipeline import REFERENCE_FILE, build_graph_cached
    from edge_ssd_export.reference import forward_logits
    from edge_ssd_export.weights import open_weights

    folder = tiny_sources[key]
    arch = Arch.from_config(json.loads((folder / "config.json").read_text()))
    prompts = [list(range(5, 45)), [7, 3, 250]]
    built = build_graph_cached(folder, arch, QuantConfig(weights="int4"), 256, tmp_path, "t", prompts)
    kept = json.loads((built / REFERENCE_FILE).read_text())
    assert kept["prompts"] == prompts
    assert kept["argmax"] == [a.tolist() for a in forward_logits(open_weights(folder), arch, prompts)]
