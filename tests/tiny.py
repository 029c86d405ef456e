"""Tiny random Llama / Qwen2 models and a tiny byte-level BPE tokenizer, built in seconds.

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
        common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      rms_norm_eps=1e-6, initializer_range=0.25, eos_token_id=2, bos_token_id=0)
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
