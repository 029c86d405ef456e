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

import dataclasses

import math
from typing import Callable, Optional

import numpy as np

from .graph import Arch, rope_inv_freq
from .weights import Weights

ARCHITECTURES = ("LlamaForCausalLM", "Qwen2ForCausalLM", "MistralForCausalLM")

Reference = Callable[[list], list]  # prompts (lists of ids) -> teacher-forced fp32 logits [S, V] per prompt


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


def _layer_names(arch: Arch, i: int) -> dict:
    """short name -> Hugging Face name of layer i's weights."""
    p = f"model.layers.{i}."
    names = {f"{n}_proj.weight": f"{p}self_attn.{n}_proj.weight" for n in "qkvo"}
    names.update({f"{n}_proj.weight": f"{p}mlp.{n}_proj.weight" for n in ("gate", "up", "down")})
    if arch.attention_bias:
        names.update({f"{n}_proj.bias": f"{p}self_attn.{n}_proj.bias" for n in "qkv"})
    names.update(input_norm=p + "input_layernorm.weight", post_norm=p + "post_attention_layernorm.weight")
    return names


class _Forward:
    """The forward as steps fed with weights (embedding, each layer, the head), so that it can
    run from weights it pulls itself or from weights pushed to it as a graph build reads them."""

    def __init__(self, arch: Arch, prompts: list):
        self.arch, self.prompts = arch, prompts
        self.starts = np.cumsum([0] + [len(p) for p in prompts]).tolist()
        positions = np.concatenate([np.arange(len(p)) for p in prompts]).astype(np.float64)
        freqs = np.outer(positions, rope_inv_freq(arch.head_dim, arch.rope_theta, arch.rope_scaling))
        self.cos = np.cos(np.concatenate([freqs, freqs], -1)).astype(np.float32)
        self.sin = np.sin(np.concatenate([freqs, freqs], -1)).astype(np.float32)
        self.h: Optional[np.ndarray] = None
        self.head: Optional[np.ndarray] = None
        self.done_layers = 0

    def embed(self, emb: np.ndarray) -> None:
        self.h = emb[np.concatenate([np.asarray(p, dtype=np.int64) for p in self.prompts])].astype(np.float32)
        if self.arch.tie_word_embeddings:
            self.head = emb

    def layer(self, w: dict) -> None:
        eps = self.arch.rms_norm_eps
        h = self.h + _attention(_rms_norm(self.h, w["input_norm"], eps), w, self.arch, self.cos, self.sin, self.starts)
        self.h = h + _mlp(_rms_norm(h, w["post_norm"], eps), w)
        self.done_layers += 1

    def logits(self, final_norm: np.ndarray, head: np.ndarray) -> list:
        out = _rms_norm(self.h, final_norm, self.arch.rms_norm_eps) @ head.T
        return [out[a:b] for a, b in zip(self.starts, self.starts[1:])]


def forward_logits(weight: Weights, arch: Arch, prompts: list, keep_argmax: bool = True) -> list:
    """Teacher-forced logits (or their argmax) of each prompt, weights read one layer at a time."""
    f = _Forward(arch, prompts)
    f.embed(weight("model.embed_tokens.weight"))
    for i in range(arch.num_layers):
        f.layer({k: weight(n) for k, n in _layer_names(arch, i).items()})
    head = f.head if f.head is not None else weight("lm_head.weight")
    out = f.logits(weight("model.norm.weight"), head)
    return [o.argmax(-1) for o in out] if keep_argmax else out


class ReferenceTap:
    """Wraps weight(): hands each tensor to the graph builder and to the numpy forward, so the
    reference costs no second read (for a GGUF, a second dequantization: ~17 s CPU for the 1.5B
    target here). Layers are run as soon as all of a layer's weights have passed; `result` is
    the teacher-forced argmax per prompt once the head has passed, else None (a builder that
    read other names or another order: the caller then runs numpy_reference); `logits` the
    teacher-forced logits behind it (validation's KL divergence)."""

    def __init__(self, weight: Weights, arch: Arch, prompts: list):
        self._weight, self._arch = weight, arch
        self._forward = _Forward(arch, prompts)
        self._wanted = {n: (i, k) for i in range(arch.num_layers) for k, n in _layer_names(arch, i).items()}
        self._held: dict = {}  # layer -> {short name: array}, until the layer runs
        self._final: dict = {}
        self.logits: Optional[list] = None

    @property
    def result(self) -> Optional[list]:
        return None if self.logits is None else [o.argmax(-1) for o in self.logits]

    def __call__(self, name: str) -> np.ndarray:
        w = self._weight(name)
        if name == "model.embed_tokens.weight":
            self._forward.embed(w)
        elif name in self._wanted and self._forward.h is not None:
            i, key = self._wanted[name]
            self._held.setdefault(i, {})[key] = w
            self._run_ready()
        elif name in ("model.norm.weight", "lm_head.weight"):
            self._final[name] = w
        self._finish()
        return w

    def _run_ready(self) -> None:
        f = self._forward
        while len(self._held.get(f.done_layers, {})) == len(_layer_names(self._arch, f.done_layers)):
            f.layer(self._held.pop(f.done_layers))
            if f.done_layers == self._arch.num_layers:
                break

    def _finish(self) -> None:
        f = self._forward
        head = f.head if f.head is not None else self._final.get("lm_head.weight")
        if self.logits is None and f.done_layers == self._arch.num_layers and head is not None \
                and "model.norm.weight" in self._final:
            self.logits = f.logits(self._final.pop("model.norm.weight"), head)
            self._final.clear()
            f.head = None


def implements(arch: Arch) -> bool:
    """The numpy forward is plain Llama / Qwen2 / Mistral attention and MLP (any rope scaling
    graph.rope_inv_freq knows): no family feature beyond that (export/families.py)."""
    family_defaults = {f.name: f.default for f in dataclasses.fields(Arch) if f.default is not dataclasses.MISSING}
    return arch.architecture in ARCHITECTURES and all(
        getattr(arch, name) == value for name, value in family_defaults.items())


def reference_tap(weight: Weights, arch: Arch, prompts: list) -> Optional[ReferenceTap]:
    """A tap for this architecture, or None where the numpy forward does not implement it."""
    return ReferenceTap(weight, arch, prompts) if implements(arch) else None


def numpy_reference(weight: Weights, arch: Arch) -> Optional[Reference]:
    """The teacher-forced logits reference, or None for an architecture this forward does not implement."""
    if not implements(arch):
        return None
    return lambda prompts: forward_logits(weight, arch, prompts, keep_argmax=False)
