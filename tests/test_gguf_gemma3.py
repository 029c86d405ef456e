"""Gemma 3 read directly from GGUF: the SentencePiece vocabulary rebuilt as llama.cpp tokenizes
(torch-free), and a tiny gemma3 GGUF's config, weights and exported logits against the
transformers model it was written from (torch)."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from tiny_gguf import spm_vocabulary, write_gemma3_gguf, write_vocabulary_gguf
from tokenizer_corpus import TRICKY

REAL_GGUF = Path("/work/models/gguf/gemma-3-270m-q4_k_m.gguf")
GOLDENS = Path(__file__).parent / "data" / "gemma3_llamacpp_tokens.json"
SPM_TEXTS = TRICKY + ["the and then", "  the   and", "\tthe\n\nand\n", "<start_of_turn>user\nhi<end_of_turn>\n",
                      "théâtre 😀 ▁the", "<start_of_turn", "hehehe thethe", "<0x41> is text"]


def llama_cpp_spm(text: str, tokens: list, scores: list, types: list) -> list:
    """llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm, add_space_prefix off), written
    from its description: control and user-defined tokens split the text first; in each piece
    spaces become U+2581, then the adjacent pair whose join is the best-scoring normal piece is
    merged (leftmost on ties) until none is left; a symbol outside the vocabulary is its bytes."""
    index = {t: i for i, t in enumerate(tokens)}
    whole = sorted((t for t, k in zip(tokens, types) if k in (3, 4)), key=len, reverse=True)
    out, raw, i = [], "", 0
    while i < len(text):
        hit = next((t for t in whole if text.startswith(t, i)), None)
        if hit is None:
            raw, i = raw + text[i], i + 1
            continue
        out += _spm_merge(raw.replace(" ", "\u2581"), index, scores, types) + [index[hit]]
        raw, i = "", i + len(hit)
    return out + _spm_merge(raw.replace(" ", "\u2581"), index, scores, types)


def _spm_merge(text: str, index: dict, scores: list, types: list) -> list:
    symbols = list(text)
    while True:
        best = None
        for j in range(len(symbols) - 1):
            t = index.get(symbols[j] + symbols[j + 1])
            if t is not None and types[t] == 1 and (best is None or scores[t] > best[0]):
                best = (scores[t], j)
        if best is None:
            break
        j = best[1]
        symbols[j:j + 2] = [symbols[j] + symbols[j + 1]]
    ids = []
    for s in symbols:
        ids += [index[s]] if s in index else [index[f"<0x{b:02X}>"] for b in s.encode()]
    return ids


def _tokenizer(gguf: Path):
    from tokenizers import Tokenizer

    from edge_ssd_export.gguf_source import gguf_tokenizer_json, read_header

    return Tokenizer.from_str(json.dumps(gguf_tokenizer_json(read_header(gguf))))


def test_spm_rebuild_tokenizes_like_llama_cpp(tmp_path):
    """A Gemma-shaped vocabulary: the rebuilt tokenizer against llama.cpp's algorithm."""
    tok = _tokenizer(write_vocabulary_gguf(tmp_path / "vocab.gguf"))
    tokens, scores, types = spm_vocabulary(300)
    for text in SPM_TEXTS:
        ids = tok.encode(text, add_special_tokens=False).ids
        assert ids == llama_cpp_spm(text, tokens, scores, types), text
        if "\u2581" not in text:  # a typed U+2581 decodes as a space, in llama.cpp too
            assert tok.decode(ids, skip_special_tokens=False) == text, text


def test_spm_special_token_text_typed_stays_text(tmp_path):
    """With special-token parsing off (how the runtime encodes message content), the text of a
    control token is never merged into that token."""
    tok = _tokenizer(write_vocabulary_gguf(tmp_path / "vocab.gguf"))
    tok.encode_special_tokens = True
    assert 4 not in tok.encode("<start_of_turn>user", add_special_tokens=False).ids


def test_spm_prefix_space_vocabulary_is_refused_by_name(tmp_path):
    from edge_ssd_export.gguf_source import UnsupportedGGUF

    path = write_vocabulary_gguf(tmp_path / "v.gguf", **{"tokenizer.ggml.add_space_prefix": True})
    with pytest.raises(UnsupportedGGUF, match="add_space_prefix is not rebuilt directly"):
        _tokenizer(path)


@pytest.mark.skipif(not (REAL_GGUF.exists() and GOLDENS.exists()), reason="the Gemma 3 270M GGUF is not here")
def test_real_gemma3_vocabulary_tokenizes_like_llama_cpp():
    """Gemma 3 270M's 262k-piece vocabulary against llama-tokenize's ids (the fixture:
    tools/gguf_vs_llamacpp.py --tokenizer-goldens)."""
    goldens = json.loads(GOLDENS.read_text(encoding="utf-8"))["ids"]
    tok = _tokenizer(REAL_GGUF)
    bad = [t for t, ids in goldens.items() if tok.encode(t, add_special_tokens=False).ids != ids]
    assert bad == []


# ---------------------------------------------------------------------------- the model (torch)

@pytest.fixture(scope="module")
def gemma3(tmp_path_factory) -> tuple:
    """(tiny Gemma 3 Hugging Face folder, the GGUF llama.cpp's converter would make of it). Its
    query_pre_attn_scalar is head_dim: a GGUF has no key for it (llama.cpp: 1/sqrt(head_dim))."""
    pytest.importorskip("torch")
    from tiny import make_family_model

    root = tmp_path_factory.mktemp("gemma3-gguf")
    hf = make_family_model(root / "hf", "gemma3", seed=7, layers=4, query_pre_attn_scalar=16,
                           rope_local_base_freq=20000.0)
    return hf, write_gemma3_gguf(hf, root / "gemma3.gguf")


def test_gemma3_gguf_config_and_weights(gemma3, tmp_path):
    from safetensors.numpy import load_file

    from edge_ssd_export.gguf_source import light_folder
    from edge_ssd_export.graph import Arch
    from edge_ssd_export.weights import open_weights

    hf, gguf = gemma3
    light = light_folder(gguf, tmp_path / "cache")
    ours = Arch.from_config(json.loads((light / "config.json").read_text()))
    theirs = Arch.from_config(json.loads((hf / "config.json").read_text()))
    assert ours.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-6)  # stored as float32
    assert dataclasses.replace(ours, rms_norm_eps=theirs.rms_norm_eps) == theirs
    weight = open_weights(light)
    for name, t in load_file(str(hf / "model.safetensors")).items():
        np.testing.assert_allclose(weight(name), t, rtol=0, atol=1e-6, err_msg=name)


def test_gemma3_gguf_export_matches_transformers(gemma3, tmp_path):
    """The fp32 graph exported from the GGUF against the transformers model (eager), over a
    context that crosses the sliding window; one BOS and <end_of_turn> in the manifest."""
    from conftest import export_bundle
    from test_families import reference_logits

    from edge_ssd.model import OnnxLM

    hf, gguf = gemma3
    bundle = export_bundle({"target": gguf}, tmp_path / "b", "fp32", draft=False, cache=tmp_path / "cache")
    ids = np.random.default_rng(0).integers(10, 290, 40).tolist()
    got = OnnxLM(bundle.target, threads=1).forward(ids, keep=len(ids))
    np.testing.assert_allclose(got, reference_logits(hf, ids), atol=1e-4, rtol=1e-4)
    tok = bundle.manifest["tokenizer"]
    assert (tok["bos_token"], tok["add_bos"], tok["eos_ids"]) == ("<bos>", True, [1, 5])
