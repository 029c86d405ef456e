"""An fp32 numpy forward of the source model, the reference the exported graph is checked against.

Why numpy and not the transformers model: the export must not need torch (a GGUF or
safetensors source is read without it), and a torch model holds every weight in fp32 at once
(7 GB for the 1.5B target). This forward streams the weights layer by layer through all
prompts, so it holds one layer (and the LM head) at a time, and it is written from the model
definition independently of graph.py, so a graph-builder bug does not cancel out.

It implements the Llama / Qwen2 / Mistral decoder (RMSNorm, rotary with Hugging Face's
half-split layout, grouped-query attention, SiLU-gated MLP); for other architectures
`numpy_reference` returns None and the caller uses torch if it can (validate.py).
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import numpy as np

from .graph import Arch, rope_inv_freq
from .weights import Weights

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

Reference = Callable[[list], list]  # prompts (lists of ids) -> teacher-forced argmax per prompt


def _rms_norm(x: np.ndarray, gamma: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * gamma


def _rotate(x: np.ndarray, cos: np.ndarray, sin: np.ndarray) -> np.ndarray:
    """Rotary embedding on [S, heads, head_dim], halves split as Hugging Face's rotate_half."""
    half = x.shape[-1] // 2
    rotated = np.concatenate([-x[..., half:], x[..., :half]], axis=-1)
    return x * cos[:, None, :] + rotated * sin[:, None, :]


def _attention(x: np.ndarray, w: dict, arch: Arch, cos: np.ndarray, sin: np.ndarray, starts: list) -> np.ndarray:
    """Causal self-attention of the prompts stacked in x ([sum of lengths, hidden]); the
    projections run on all rows at once (each weight is read once), attention per prompt."""
    s, nh, kvh, hd = x.shape[0], arch.num_heads, arch.num_kv_heads, arch.head_dim

    def proj(n: str, heads: int) -> np.ndarray:
        y = x @ w[f"{n}_proj.weight"].T
        if arch.attention_bias:
            y = y + w[f"{n}_proj.bias"]
        return y.reshape(s, heads, hd)

    q, k, v = _rotate(proj("q", nh), cos, sin), _rotate(proj("k", kvh), cos, sin), proj("v", kvh)
    out = np.empty((s, nh, hd), dtype=np.float32)
    for a, b in zip(starts, starts[1:]):
        kk, vv = np.repeat(k[a:b], nh // kvh, axis=1), np.repeat(v[a:b], nh // kvh, axis=1)
        scores = np.einsum("qhd,khd->hqk", q[a:b], kk) / math.sqrt(hd)
        scores = scores + np.triu(np.full((b - a, b - a), -np.inf, dtype=np.float32), 1)
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        out[a:b] = np.einsum("hqk,khd->qhd", p, vv)
    return out.reshape(s, nh * hd) @ w["o_proj.weight"].T


def _mlp(x: np.ndarray, w: dict) -> np.ndarray:
    gate = x @ w["gate_proj.weight"].T
    return (gate / (1 + np.exp(-gate)) * (x @ w["up_proj.weight"].T)) @ w["down_proj.weight"].T


def _layer_weights(weight: Weights, arch: Arch, i: int) -> dict:
    p = f"model.layers.{i}."
    names = [f"self_attn.{n}_proj.weight" for n in "qkvo"] + [f"mlp.{n}_proj.weight" for n in ("gate", "up", "down")]
    names += [f"self_attn.{n}_proj.bias" for n in "qkv"] if arch.attention_bias else []
    w = {n.split(".", 1)[1]: weight(p + n) for n in names}
    w["input_norm"], w["post_norm"] = weight(p + "input_layernorm.weight"), weight(p + "post_attention_layernorm.weight")
    return w


def forward_logits(weight: Weights, arch: Arch, prompts: list, keep_argmax: bool = True) -> list:
    """Teacher-forced logits (or their argmax) of each prompt, weights read one layer at a time."""
    starts = np.cumsum([0] + [len(p) for p in prompts]).tolist()
    positions = np.concatenate([np.arange(len(p)) for p in prompts])
    emb = weight("model.embed_tokens.weight")
    h = emb[np.concatenate([np.asarray(p, dtype=np.int64) for p in prompts])].astype(np.float32)
    head = emb if arch.tie_word_embeddings else None
    del emb
    freqs = np.outer(positions.astype(np.float64), rope_inv_freq(arch))
    cos = np.cos(np.concatenate([freqs, freqs], -1)).astype(np.float32)
    sin = np.sin(np.concatenate([freqs, freqs], -1)).astype(np.float32)
    eps = arch.rms_norm_eps
    for i in range(arch.num_layers):
        w = _layer_weights(weight, arch, i)
        h = h + _attention(_rms_norm(h, w["input_norm"], eps), w, arch, cos, sin, starts)
        h = h + _mlp(_rms_norm(h, w["post_norm"], eps), w)
        del w
    if head is None:
        head = weight("lm_head.weight")
    logits = _rms_norm(h, weight("model.norm.weight"), eps) @ head.T
    out = logits.argmax(-1) if keep_argmax else logits
    return [out[a:b] for a, b in zip(starts, starts[1:])]


def numpy_reference(weight: Weights, arch: Arch) -> Optional[Reference]:
    """The teacher-forced argmax reference, or None for an architecture this forward does not implement."""
    if arch.architecture not in ARCHITECTURES:
        return None
    return lambda prompts: forward_logits(weight, arch, prompts)
