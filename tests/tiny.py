"""Tiny random models of each supported family and a tiny byte-level BPE tokenizer, built in seconds.

Weights are drawn with a large init scale so that logits are far from ties: greedy decisions
then do not hinge on the last bits of a kernel's summation order.
"""
from __future__ import annotations

import json
from pathlib import Path

CORPUS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. Über naïve café — 東京 and 😀 emoji.",
    "import numpy as np\nx = np.zeros((3, 4))\nprint(x.shape)\n",
    "Speculative decoding proposes tokens with a small model and verifies them with a large one.",
] * 20
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def make_tokenizer(folder: Path, vocab_size: int = 300, specials=SPECIALS) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials),
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "eos_token": "<|im_end|>", "bos_token": None, "pad_token": "<|endoftext|>",
        "chat_template": CHAT_TEMPLATE, "add_bos_token": False}))


def make_model(folder: Path, arch: str = "qwen2", seed: int = 0, noise_from: Path = None,
               noise: float = 0.0, layers: int = 2, vocab: int = 300) -> Path:
    """Save a random model (or a noisy copy of `noise_from`) with the tiny tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

    torch.manual_seed(seed)
    if noise_from is not None:
        model = AutoModelForCausalLM.from_pretrained(str(noise_from), dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(noise * p.std() * torch.randn_like(p))
    else:
        common = _common(vocab, layers)
        cfg = (Qwen2Config(tie_word_embeddings=False, rope_theta=10000.0, **common) if arch == "qwen2"
               else LlamaConfig(tie_word_embeddings=True, **common))
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        if arch == "qwen2":  # biases start at zero; make them matter
            with torch.no_grad():
                for layer in model.model.layers:
                    for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                        proj.bias.normal_(0, 0.5)
    model.save_pretrained(str(folder), safe_serialization=True)
    make_tokenizer(folder, vocab)
    return folder


def _common(vocab: int, layers: int) -> dict:
    return dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                rms_norm_eps=1e-6, initializer_range=0.25, eos_token_id=2, bos_token_id=0)


WINDOW = 8  # Gemma's sliding window in the tiny models: a 40-token context crosses it
# family -> (transformers config class, settings beyond _common): each family's own features on,
# at values where they change the logits (a soft-cap near the logits' scale, a short window,
# llama3 scaling with a small original context, query_pre_attn_scalar != head_dim).
FAMILIES = {
    "qwen3": ("Qwen3Config", dict(head_dim=16, tie_word_embeddings=True, rope_theta=1000000.0)),
    "llama3": ("LlamaConfig", dict(tie_word_embeddings=True, rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16})),
    "llama-bias": ("LlamaConfig", dict(attention_bias=True)),  # q/k/v and o biases (attention_bias)
    "smollm3": ("SmolLM3Config", dict(no_rope_layer_interval=2, pad_token_id=1)),
    "mistral": ("MistralConfig", dict(sliding_window=16)),
    "phi3": ("Phi3Config", dict(pad_token_id=1, num_attention_heads=2, num_key_value_heads=1,
                                 partial_rotary_factor=0.5, max_position_embeddings=512,
                                 original_max_position_embeddings=128, sliding_window=16, rope_scaling={
                                     "type": "longrope", "short_factor": [1.0, 1.2, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0],
                                     "long_factor": [2.0] * 8})),
    "gemma2": ("Gemma2Config", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                    attn_logit_softcapping=5.0, final_logit_softcapping=8.0)),
    "gemma3": ("Gemma3TextConfig", dict(head_dim=16, query_pre_attn_scalar=24, sliding_window=WINDOW,
                                        sliding_window_pattern=2, rope_theta=1000000.0,
                                        rope_local_base_freq=10000.0,
                                        rope_scaling={"rope_type": "linear", "factor": 4.0})),
}
# Gemma 3 4B and up: the same language model inside a multimodal checkpoint (a tiny vision tower;
# the image tokens sit at the top of the vocabulary, outside the ids the tests feed).
FAMILIES["gemma3-multimodal"] = ("Gemma3Config", FAMILIES["gemma3"][1])
MULTIMODAL = dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                     num_attention_heads=2, image_size=28, patch_size=14),
                  mm_tokens_per_image=4, boi_token_index=297, eoi_token_index=298, image_token_index=299)


def _config(family: str, vocab: int, layers: int, overrides: dict):
    import transformers

    cls_name, extra = FAMILIES[family]
    text = {**_common(vocab, layers), **extra, **overrides}
    if cls_name == "Gemma3Config":
        return transformers.Gemma3Config(text_config=text, **MULTIMODAL)
    return getattr(transformers, cls_name)(**text)


def make_family_model(folder: Path, family: str, seed: int = 0, layers: int = 3, vocab: int = 300,
                      **overrides) -> Path:
    """Save a random model of a family in FAMILIES, with its norm weights and biases drawn too
    (they start at one, or zero, which would hide a norm applied to the wrong tensor or a bias
    left out)."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    cfg = _config(family, vocab, layers, overrides)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="eager")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(str(folder), safe_serialization=True)
    make_tokenizer(folder, vocab)
    return folder
