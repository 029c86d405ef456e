"""The model families the graph builder handles, and what each needs from config.json.

Every field follows the family's reference implementation in transformers 4.57
(`transformers/models/<family>/modeling_<family>.py`), and a key missing from config.json takes
the default of that family's config class (hub configs omit keys equal to the class default:
Gemma's `tie_word_embeddings`, `head_dim` and soft-caps, SmolLM3's `rope_theta`). A setting that
changes the computation in a way the builder does not reproduce is refused by name, so a model is
never exported subtly wrong.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from edge_ssd.checks import is_int

from .errors import ExportError

SLIDING, FULL = "sliding_attention", "full_attention"


class UnsupportedModelError(ExportError, ValueError):
    """The model, or a setting asked for, is one this builder does not handle."""


def _size(cfg: dict, key: str, default: Optional[int] = None) -> int:
    """A config.json size: a positive integer (a string or a bool would fail deep in the build).
    Missing (or null) means `default`; with no default, a KeyError naming the key."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    if not is_int(value) or value < 1:
        raise ValueError(f"{key} must be an integer >= 1, got {value!r}")
    return value


@dataclass(frozen=True)
class Arch:
    """What the graph needs from config.json. The fields after `tie_word_embeddings` are the
    family features; their defaults are plain Llama."""

    architecture: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: Optional[dict]
    max_position_embeddings: int
    attention_bias: bool
    tie_word_embeddings: bool
    o_proj_bias: bool = False
    activation: str = "silu"  # "silu" or "gelu_tanh" (Gemma's GeGLU)
    qk_norm: bool = False  # per-head RMSNorm of q and k before rope (Qwen3, Gemma 3)
    norm_offset: float = 0.0  # Gemma's RMSNorm scales by (1 + w)
    sandwich_norms: bool = False  # Gemma 2/3: a norm after each sublayer too (pre_feedforward_layernorm...)
    embed_scale: Optional[float] = None  # Gemma: embeddings times sqrt(hidden_size)
    attn_scale: Optional[float] = None  # None: 1 / sqrt(head_dim)
    attn_softcap: float = 0.0
    final_softcap: float = 0.0
    sliding_window: Optional[int] = None
    layer_types: tuple = ()  # SLIDING or FULL per layer; empty: all FULL
    rope_local_theta: Optional[float] = None  # Gemma 3: sliding layers' rope base (no scaling)
    partial_rotary_factor: float = 1.0  # Phi-4-mini: rope on the first 3/4 of each head
    rope_layers: tuple = ()  # per layer, does it apply rope (SmolLM3's NoPE layers); empty: all do
    fused_projections: bool = False  # Phi-3: qkv_proj and gate_up_proj are stored packed
    weight_prefix: str = ""  # before every weight name: "language_model." in Gemma 3's multimodal checkpoints

    @property
    def default_accuracy_level(self) -> int:
        """MatMulNBits compute when the user does not choose: int8 activations (4, the fast CPU
        kernels) except for Gemma, whose activations (embeddings times sqrt(hidden), sandwich
        norms) int8 rounding does not keep: measured on Gemma 3 270M, K+1 rows at once against
        one at a time differ by 3.4 logits (int4) and 6.2 (int8) at level 4, 0.0005 at level 0,
        and the export's golden check refuses level 4 (docs/architecture.md)."""
        return 0 if self.embed_scale is not None else 4

    @property
    def rotary_dim(self) -> int:
        return int(self.head_dim * self.partial_rotary_factor)

    def is_sliding(self, layer: int) -> bool:
        return bool(self.layer_types) and self.layer_types[layer] == SLIDING

    def rope_of(self, layer: int) -> Optional[tuple]:
        """(theta, scaling) of a layer's rotary embedding; None for a layer without rope."""
        if self.rope_layers and not self.rope_layers[layer]:
            return None
        if self.rope_local_theta is not None and self.is_sliding(layer):
            return self.rope_local_theta, None
        return self.rope_theta, self.rope_scaling

    @classmethod
    def from_config(cls, cfg: dict) -> "Arch":
        archs = cfg.get("architectures") or [cfg.get("model_type", "?")]
        arch = archs[0]
        if arch in TEXT_MODEL_OF:
            return _text_model(cls, arch, cfg)
        if arch not in FAMILIES:
            raise UnsupportedModelError(
                f"architecture {arch} is not supported (supported: {', '.join(SUPPORTED_ARCHITECTURES)})"
            )
        defaults, family = FAMILIES[arch]
        cfg = {**_BASE_DEFAULTS, **defaults, **cfg}
        _refuse_set(arch, cfg, "mlp_bias", "use_sliding_window", "use_bidirectional_attention")
        heads = _size(cfg, "num_attention_heads")
        fields = dict(
            architecture=arch,
            hidden_size=_size(cfg, "hidden_size"),
            num_layers=_size(cfg, "num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=_size(cfg, "num_key_value_heads", heads),
            head_dim=_size(cfg, "head_dim", _size(cfg, "hidden_size") // heads),
            intermediate_size=_size(cfg, "intermediate_size"),
            vocab_size=_size(cfg, "vocab_size"),
            rms_norm_eps=float(cfg["rms_norm_eps"]),
            rope_theta=float(cfg["rope_theta"]),
            rope_scaling=_rope_scaling(arch, cfg),
            max_position_embeddings=_size(cfg, "max_position_embeddings"),
            attention_bias=bool(cfg.get("attention_bias")),
            tie_word_embeddings=bool(cfg["tie_word_embeddings"]),
        )
        fields.update(family(arch, cfg, fields))
        return cls(**fields)


# --- config refusals -------------------------------------------------------------------------

def _refuse_set(arch: str, cfg: dict, *keys: str) -> None:
    """Refuse, by name, a config that turns on a feature the builder does not implement."""
    for key in keys:
        if cfg.get(key):
            raise UnsupportedModelError(f"{arch} with {key}={cfg[key]!r} is not supported")


def _activation(arch: str, cfg: dict, key: str, expected: str) -> None:
    if cfg.get(key) != expected:
        raise UnsupportedModelError(f"{arch} with {key}={cfg.get(key)!r} is not supported (only {expected})")


ROPE_TYPES = ("default", "linear", "llama3")


def _rope_scaling(arch: str, cfg: dict) -> Optional[dict]:
    """The rope scaling dict with its type under `rope_type`; refuses types not implemented.
    LongRoPE (Phi-3) gets its attention factor computed here, where the config's full
    max_position_embeddings is at hand (modeling_rope_utils._compute_longrope_parameters)."""
    sc = cfg.get("rope_scaling")
    if not sc:
        return None
    kind = sc.get("rope_type", sc.get("type", "default"))
    allowed = ROPE_TYPES + (("longrope", "su") if arch == "Phi3ForCausalLM" else ())
    if kind not in allowed:
        raise UnsupportedModelError(f"{arch} with rope scaling {kind!r} is not supported "
                                    f"(supported: {', '.join(allowed)})")
    if kind in ("longrope", "su"):
        return _longrope(cfg, sc)
    return {**sc, "rope_type": kind}


def _longrope(cfg: dict, sc: dict) -> dict:
    original = cfg.get("original_max_position_embeddings") or cfg["max_position_embeddings"]
    factor = cfg["max_position_embeddings"] / original if cfg.get("original_max_position_embeddings") \
        else sc.get("factor", 1.0)
    attention = sc.get("attention_factor")
    if attention is None:
        attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
    return {"rope_type": "longrope", "short_factor": list(sc["short_factor"]),
            "attention_factor": float(attention), "original_max_position_embeddings": int(original)}


# --- families ----------------------------------------------------------------------------------
# Each takes (architecture, config with defaults filled in, the common fields) and returns the
# fields it sets or overrides.

def _llama(arch: str, cfg: dict, f: dict) -> dict:
    """Llama 3.x and SmolLM2: q/k/v/o biases follow `attention_bias`."""
    _activation(arch, cfg, "hidden_act", "silu")
    return {"o_proj_bias": f["attention_bias"]}


def _window_on_every_layer(cfg: dict, f: dict) -> dict:
    """Mistral and Phi-3 pass config.sliding_window to every layer's attention (when set)."""
    if not cfg.get("sliding_window"):
        return {}
    return {"sliding_window": _size(cfg, "sliding_window"), "layer_types": (SLIDING,) * f["num_layers"]}


def _mistral(arch: str, cfg: dict, f: dict) -> dict:
    _activation(arch, cfg, "hidden_act", "silu")
    return {"attention_bias": False, **_window_on_every_layer(cfg, f)}


def _qwen2(arch: str, cfg: dict, f: dict) -> dict:
    """Qwen2Attention always has q/k/v biases and never an o bias, whatever the config says."""
    _activation(arch, cfg, "hidden_act", "silu")
    return {"attention_bias": True}


def _qwen3(arch: str, cfg: dict, f: dict) -> dict:
    _activation(arch, cfg, "hidden_act", "silu")
    return {"qk_norm": True, "o_proj_bias": f["attention_bias"]}


def _smollm3(arch: str, cfg: dict, f: dict) -> dict:
    """SmolLM3: every `no_rope_layer_interval`-th layer has no rope (no_rope_layers[i] == 0)."""
    _activation(arch, cfg, "hidden_act", "silu")
    n = f["num_layers"]
    flags = cfg.get("no_rope_layers") or [int((i + 1) % cfg["no_rope_layer_interval"] != 0) for i in range(n)]
    if len(flags) != n:
        raise ValueError(f"no_rope_layers has {len(flags)} entries for {n} layers")
    return {"o_proj_bias": f["attention_bias"], "rope_layers": tuple(bool(x) for x in flags)}


def _phi3(arch: str, cfg: dict, f: dict) -> dict:
    """Phi-3 / Phi-3.5 / Phi-4-mini: packed projections, partial rotary, a window on every layer.

    LongRoPE: the reference switches to the long factors only once a sequence passes
    original_max_position_embeddings, and then drops the cache and re-encodes everything
    (Phi3ForCausalLM.prepare_inputs_for_generation). A static cache cannot do that, so the
    graph serves up to original_max_position_embeddings tokens, with the short factors: there
    it is exactly the reference."""
    _activation(arch, cfg, "hidden_act", "silu")
    out: dict = {"attention_bias": False, "fused_projections": True,
                 "partial_rotary_factor": float(cfg["partial_rotary_factor"])}
    rotary = int(f["head_dim"] * out["partial_rotary_factor"])
    if rotary % 2 or not 0 < rotary <= f["head_dim"]:
        raise UnsupportedModelError(f"{arch} with a rotary dimension of {rotary} is not supported")
    out.update(_window_on_every_layer(cfg, f))
    sc = f["rope_scaling"]
    if sc and sc["rope_type"] == "longrope":
        if len(sc["short_factor"]) != rotary // 2:
            raise ValueError(f"rope_scaling.short_factor has {len(sc['short_factor'])} entries, not {rotary // 2}")
        out["max_position_embeddings"] = min(f["max_position_embeddings"], sc["original_max_position_embeddings"])
    return out


def _layer_types(cfg: dict, n: int, pattern: int) -> tuple:
    """Gemma's per-layer attention kinds: config's layer_types, else every `pattern`-th layer full."""
    types = cfg.get("layer_types") or [SLIDING if (i + 1) % pattern else FULL for i in range(n)]
    if len(types) != n or set(types) - {SLIDING, FULL}:
        raise UnsupportedModelError(f"layer_types {types!r} is not supported (one of {SLIDING}, {FULL} per layer)")
    return tuple(types)


def _gemma(arch: str, cfg: dict, f: dict, pattern: int) -> dict:
    """What Gemma 2 and 3 share: (1 + w) RMSNorms around each sublayer, scaled embeddings,
    GeGLU (tanh GELU), query_pre_attn_scalar, soft-caps where set, interleaved window layers."""
    _activation(arch, cfg, "hidden_activation", "gelu_pytorch_tanh")
    window = cfg.get("sliding_window")
    return {
        "o_proj_bias": f["attention_bias"], "activation": "gelu_tanh", "norm_offset": 1.0,
        "sandwich_norms": True, "embed_scale": math.sqrt(f["hidden_size"]),
        "attn_scale": float(cfg["query_pre_attn_scalar"]) ** -0.5,
        "attn_softcap": float(cfg.get("attn_logit_softcapping") or 0.0),
        "final_softcap": float(cfg.get("final_logit_softcapping") or 0.0),
        "sliding_window": _size(cfg, "sliding_window") if window else None,
        "layer_types": _layer_types(cfg, f["num_layers"], pattern) if window else (),
    }


def _gemma2(arch: str, cfg: dict, f: dict) -> dict:
    return _gemma(arch, cfg, f, pattern=2)


def _gemma3(arch: str, cfg: dict, f: dict) -> dict:
    """Gemma 3 adds (1 + w) q/k norms and a separate rope base for its sliding layers."""
    out = _gemma(arch, cfg, f, pattern=int(cfg.get("sliding_window_pattern", 6)))
    return {**out, "qk_norm": True, "rope_local_theta": float(cfg["rope_local_base_freq"])}


def _text_model(cls: type, arch: str, cfg: dict) -> Arch:
    """A multimodal checkpoint's language model alone (Gemma 3 4B and up): text prompts in, text
    out, exactly what the text-only class computes, from `text_config` and the weights under
    the checkpoint's language_model prefix. The vision tower is not exported."""
    text_arch, prefix = TEXT_MODEL_OF[arch]
    text = cfg.get("text_config")
    if not isinstance(text, dict):
        raise KeyError("text_config")
    inner = cls.from_config({**text, "architectures": [text_arch]})
    return dataclasses.replace(inner, architecture=arch, weight_prefix=prefix)


# Keys every family reads, with the default that most config classes share.
_BASE_DEFAULTS = {"rms_norm_eps": 1e-6, "rope_theta": 10000.0, "tie_word_embeddings": False,
                  "hidden_act": "silu"}
# architecture -> (config class defaults that differ from _BASE_DEFAULTS, family fields)
FAMILIES: dict = {
    "LlamaForCausalLM": ({"max_position_embeddings": 2048}, _llama),
    "MistralForCausalLM": ({"max_position_embeddings": 131072, "sliding_window": 4096}, _mistral),
    "Qwen2ForCausalLM": ({"max_position_embeddings": 32768}, _qwen2),
    "Qwen3ForCausalLM": ({"max_position_embeddings": 32768, "head_dim": 128}, _qwen3),
    "SmolLM3ForCausalLM": ({"max_position_embeddings": 32768, "rope_theta": 2000000.0,
                            "tie_word_embeddings": True, "no_rope_layer_interval": 4}, _smollm3),
    "Phi3ForCausalLM": ({"max_position_embeddings": 4096, "rms_norm_eps": 1e-5, "partial_rotary_factor": 1.0,
                         "original_max_position_embeddings": 4096}, _phi3),
    "Gemma2ForCausalLM": ({"max_position_embeddings": 8192, "head_dim": 256, "tie_word_embeddings": True,
                           "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                           "attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0,
                           "sliding_window": 4096}, _gemma2),
    "Gemma3ForCausalLM": ({"max_position_embeddings": 131072, "head_dim": 256, "tie_word_embeddings": True,
                           "rope_theta": 1000000.0, "hidden_activation": "gelu_pytorch_tanh",
                           "query_pre_attn_scalar": 256, "sliding_window": 4096,
                           "rope_local_base_freq": 10000.0}, _gemma3),
}
# multimodal architecture -> (the text-only architecture of its language model, weight prefix)
TEXT_MODEL_OF = {"Gemma3ForConditionalGeneration": ("Gemma3ForCausalLM", "language_model.")}
SUPPORTED_ARCHITECTURES = tuple(FAMILIES) + tuple(TEXT_MODEL_OF)
