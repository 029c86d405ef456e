"""Build a fused ONNX decoder graph straight from Hugging Face weights (the families of families.py).

Why our own graph rather than optimum's: the generic export is unfused (about 6,000 nodes, a
KV cache grown by Concat, Expand for grouped-query attention), so verifying K+1 tokens costs
2.35x one decode and decode slows 50% from 200 to 1,000 tokens of context. This builder emits
what ONNX Runtime's own GenAI builder emits for these models:

* one `GroupQueryAttention` (com.microsoft) per layer over a static KV buffer that serves as
  both past and present (bound to the same memory by the runtime: no copy, rollback is free),
  with rotary embedding inside the op and the causal mask offset by the past length;
* packed QKV and gate/up projections (fewer, larger MatMuls), `MatMulNBits` for int4/int8;
* `SkipSimplifiedLayerNormalization` for residual-add + RMSNorm, `QuickGelu(alpha=1)` for SiLU;
* the LM head applied only to the last `logits_to_keep` positions (prefill needs 1 row, a
  verification K+1), so a long prompt does not pay for S x vocab logits.
* family features (families.py) as the op's own attributes where it has them (`scale`,
  `softcap`, `local_window_size`, `do_rotary=0` for NoPE layers, a narrower cos/sin cache for
  partial rotary, one cache per rope base) and a few plain nodes where it has not (per-head q/k
  RMSNorm, Gemma's post-sublayer norms, embedding scale, FastGelu, the final-logit soft-cap).

One graph serves prefill, one-token decode and K+1-token verification on a non-empty past.
Weights stream into one external-data file tensor by tensor: the 1.5B target builds in a few
GB of RAM instead of the 15 GB that a torch-traced export peaks at.
"""
from __future__ import annotations

import dataclasses

import itertools
import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import onnx
from onnx import TensorProto, helper

from edge_ssd.bundle import WEIGHT_QUANTS

from .families import SUPPORTED_ARCHITECTURES, Arch, UnsupportedModelError  # noqa: F401 (re-exported)
from .gguf_quant import INT8, Q4K, Q4K_SUB_BLOCK, int8_block, int8_parts, kept_encoding, q4k_parts
from .gguf_source import Blocks

BUILDER_VERSION = 6  # bump when the emitted graph changes: invalidates cached graphs
ORT_DOMAIN = "com.microsoft"


@dataclass(frozen=True)
class QuantConfig:
    """How weights are stored. `lm_head` None means: like the other weights."""

    weights: str = "int4"
    block_size: int = 32
    # MatMulNBits compute: 4 = int8 activations (fast on CPU), 0/1 = fp32. None: the family's
    # default (Arch.default_accuracy_level), resolved by the pipeline once the source is read.
    accuracy_level: Optional[int] = None
    lm_head: Optional[str] = None
    # The LM head's own int4/int8 block (None: block_size). On the 0.5B draft the head is 28% of
    # the weight bytes and block 32 costs ~1.8x block 128 per step (one row, AVX-512), while
    # the head's coarser blocks cost less agreement than the layers' (docs/benchmarks.md).
    lm_head_block_size: Optional[int] = None
    # Keep only the first N rows of the LM head (a draft's logits over the N lowest token ids:
    # for byte-level BPE the earliest, most frequent merges). The target still verifies over
    # the full vocabulary, so this stays lossless; the draft just cannot propose rarer tokens.
    vocab_limit: Optional[int] = None
    # For a GGUF source with int4/int8 weights: keep its Q4_K tensors exact and its Q6_K/Q8_0
    # ones exact in 8 bits (gguf_quant.py) rather than re-quantizing their dequantized values; the
    # pipeline clears it for sources that have no GGUF blocks, so the manifest says what ran.
    # Off by default: on the default pair it lifts the target's top-1 agreement with its GGUF
    # from 88% to 100%, but streams 1.7x the weight bytes per step, and a CPU step is bandwidth-
    # bound (plain decoding ~0.5x; docs/benchmarks.md, "Keeping the GGUF's quantization").
    keep_source_quant: bool = False

    def __post_init__(self) -> None:
        for q in (self.weights, self.lm_head or self.weights):
            if q not in WEIGHT_QUANTS:
                raise UnsupportedModelError(f"unknown quantization {q!r} (choose from {', '.join(WEIGHT_QUANTS)})")
        for block in (self.block_size, self.lm_head_block_size or self.block_size):
            if block not in (16, 32, 64, 128, 256):
                raise UnsupportedModelError(f"block size must be 16, 32, 64, 128 or 256, not {block}")
        if self.accuracy_level not in (None, 0, 1, 2, 3, 4):
            raise UnsupportedModelError(f"accuracy level must be 0..4, not {self.accuracy_level}")
        if self.vocab_limit is not None and self.vocab_limit < 256:
            raise UnsupportedModelError(f"vocabulary limit must be at least 256, not {self.vocab_limit}")

    def for_arch(self, arch: Arch) -> "QuantConfig":
        """This config with the family's accuracy level where none was given."""
        if self.accuracy_level is not None:
            return self
        return dataclasses.replace(self, accuracy_level=arch.default_accuracy_level)

    @property
    def act_dtype(self) -> str:
        """Activation / KV dtype: fp16 graphs compute in fp16 (CUDA, DirectML); the rest in fp32."""
        return "float16" if self.weights == "fp16" else "float32"

    def to_json(self) -> dict:
        d = asdict(self)
        d["lm_head"] = self.lm_head or self.weights
        d["lm_head_block_size"] = self.lm_head_block_size or self.block_size
        d["act_dtype"] = self.act_dtype
        return d


def logits_width(arch: Arch, quant: QuantConfig) -> int:
    return min(arch.vocab_size, quant.vocab_limit or arch.vocab_size)


def rope_inv_freq(dim: int, theta: float, scaling: Optional[dict]) -> np.ndarray:
    """Inverse frequencies over the rotary dims as transformers computes them (modeling_rope_utils:
    default, linear, llama3, and longrope's short factors: see families._phi3)."""
    inv = 1.0 / (theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim))
    sc = scaling or {}
    kind = sc.get("rope_type", "default")
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / float(sc["factor"])
    if kind == "longrope":
        return inv / np.asarray(sc["short_factor"], np.float64)
    if kind == "llama3":
        factor, lo, hi = float(sc["factor"]), float(sc["low_freq_factor"]), float(sc["high_freq_factor"])
        old_ctx = float(sc["original_max_position_embeddings"])
        wavelen = 2 * math.pi / inv
        smooth = (old_ctx / wavelen - lo) / (hi - lo)
        scaled = np.where(wavelen > old_ctx / lo, inv / factor, inv)
        mid = (wavelen <= old_ctx / lo) & (wavelen >= old_ctx / hi)
        return np.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)
    raise UnsupportedModelError(f"rope scaling {kind!r} is not supported")


def rope_cos_sin(dim: int, theta: float, scaling: Optional[dict], positions: int) -> tuple:
    """cos and sin caches [positions, dim / 2], times the scaling's attention factor (longrope)."""
    freqs = np.outer(np.arange(positions, dtype=np.float64), rope_inv_freq(dim, theta, scaling))
    factor = float((scaling or {}).get("attention_factor", 1.0))
    return np.cos(freqs) * factor, np.sin(freqs) * factor


class TensorWriter:
    """Appends initializers to one external-data file and returns TensorProtos pointing into it."""

    ALIGN = 64
    INLINE_BYTES = 1024

    def __init__(self, data_path: Path):
        self.path = data_path
        self.f = open(data_path, "wb")
        self.offset = 0

    def tensor(self, name: str, arr: np.ndarray) -> TensorProto:
        arr = np.ascontiguousarray(arr)
        if arr.nbytes < self.INLINE_BYTES:
            return onnx.numpy_helper.from_array(arr, name)
        pad = (-self.offset) % self.ALIGN
        self.f.write(b"\0" * pad)
        self.offset += pad
        t = TensorProto(name=name, dims=list(arr.shape), data_type=helper.np_dtype_to_tensor_dtype(arr.dtype))
        t.data_location = TensorProto.EXTERNAL
        for k, v in (("location", self.path.name), ("offset", str(self.offset)), ("length", str(arr.nbytes))):
            t.external_data.add(key=k, value=v)
        self.f.write(memoryview(arr).cast("B"))
        self.offset += arr.nbytes
        return t

    def close(self) -> None:
        self.f.close()


def quantize_blockwise(w_in_out: np.ndarray, bits: int, block_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric block-wise quantization of a [K, N] fp32 weight into MatMulNBits layout.

    Uses ONNX Runtime's own C++ packer, so the layout is exactly what the kernel reads.
    Returns (packed [N, K/bs, bs*bits/8] uint8, scales [N, K/bs] fp32).
    """
    from onnxruntime.capi._pybind_state import quantize_matmul_4bits, quantize_matmul_8bits

    k, n = w_in_out.shape
    k_blocks = (k + block_size - 1) // block_size
    if k_blocks * block_size != k:
        w_in_out = np.pad(w_in_out, ((0, k_blocks * block_size - k), (0, 0)))
    w_in_out = np.ascontiguousarray(w_in_out, dtype=np.float32)
    packed = np.zeros((n, k_blocks, block_size * bits // 8), dtype=np.uint8)
    scales = np.zeros((n, k_blocks), dtype=np.float32)
    zero_points = np.zeros((n, (k_blocks + 1) // 2 if bits == 4 else k_blocks), dtype=np.uint8)
    fn = quantize_matmul_4bits if bits == 4 else quantize_matmul_8bits
    fn(packed, w_in_out, scales, zero_points, block_size, n, k, True)
    return packed, scales


@dataclass
class GraphIO:
    """Names the runtime binds; recorded in the manifest."""

    inputs: dict = field(default_factory=lambda: {
        "input_ids": "input_ids",
        "seqlens_k": "seqlens_k",
        "total_sequence_length": "total_sequence_length",
        "logits_to_keep": "logits_to_keep",
        "past_key": "past_key_values.{i}.key",
        "past_value": "past_key_values.{i}.value",
    })
    outputs: dict = field(default_factory=lambda: {
        "logits": "logits",
        "present_key": "present.{i}.key",
        "present_value": "present.{i}.value",
    })


class _Graph:
    def __init__(self, writer: TensorWriter):
        self.writer = writer
        self.nodes: list = []
        self.inits: list = []
        self._n = 0

    def init(self, name: str, arr: np.ndarray) -> str:
        self.inits.append(self.writer.tensor(name, arr))
        return name

    def op(self, op_type: str, inputs: Iterable[str], n_out: int = 1, domain: str = "", name: str = "",
           outputs: Optional[list] = None, **attrs) -> list:
        self._n += 1
        name = name or f"{op_type}_{self._n}"
        outs = outputs or [f"{name}/out{j}" for j in range(n_out)]
        self.nodes.append(helper.make_node(op_type, list(inputs), outs, name=name, domain=domain, **attrs))
        return outs


BlockReader = Callable[[str], Optional[Blocks]]  # Hugging Face name -> its GGUF blocks, if any
Part = tuple  # (fp32 weight [out, in], its GGUF Blocks or None): some rows of a linear
Encoding = tuple  # (one of WEIGHT_QUANTS or Q4K, MatMulNBits block size or None)


def _stacked(arrays: list) -> np.ndarray:
    """The arrays' rows stacked; a lone array as is (not copied: the LM head is ~1 GB in fp32)."""
    return arrays[0] if len(arrays) == 1 else np.concatenate(arrays)


class _Decoder:
    """The decoder's nodes, one method per part of a layer; families differ only by Arch fields."""

    def __init__(self, arch: Arch, weight: Callable[[str], np.ndarray], quant: QuantConfig, g: _Graph,
                 max_pos: int, blocks: Optional[BlockReader] = None):
        self.arch, self.quant, self.g, self.max_pos = arch, quant, g, max_pos
        self.weight = lambda name: weight(arch.weight_prefix + name)
        self.blocks = lambda name: blocks(arch.weight_prefix + name) if blocks else None
        self.act = np.float16 if quant.act_dtype == "float16" else np.float32
        self.act_t = helper.np_dtype_to_tensor_dtype(np.dtype(self.act))
        self.io = GraphIO()
        self.residual = ""
        self._rope: dict = {}  # (theta, scaling) -> (cos, sin) initializer names
        self._block_sums: dict = {}  # input name -> its 32-value block sums (shared by its Q4_K linears)

    def const(self, name: str, arr: np.ndarray) -> str:
        return self.g.init(name, np.asarray(arr).astype(self.act))

    def part(self, hf_name: str) -> Part:
        """A weight with its GGUF blocks. The fp32 values are read even when the blocks are kept:
        the reference tap (reference.py) computes the export's fp32 reference from them."""
        return self.weight(hf_name), self.blocks(hf_name)

    def encoding(self, blocks: Optional[Blocks], q: str, block: Optional[int] = None) -> Encoding:
        """How to store rows configured as q: the GGUF's own encoding where one keeps it (for
        integer quants only: a float graph asked for floats), else q at `block` (default: the
        configured block size)."""
        kept = kept_encoding(blocks.qtype) if blocks is not None and self.quant.keep_source_quant \
            and q in ("int4", "int8") else None
        if kept == Q4K:
            return Q4K, Q4K_SUB_BLOCK
        if kept == INT8:
            return INT8, int8_block(blocks.qtype)
        return q, (block or self.quant.block_size) if q in ("int4", "int8") else None

    def linear(self, x: str, parts: list, name: str, q: str, bias: Optional[np.ndarray] = None,
               block: Optional[int] = None) -> str:
        """y = x W^T (+ bias), W the rows of `parts` stacked (q, k, v; gate, up). Consecutive parts
        with one encoding are packed into one node; several runs (a Q6_K v beside Q4_K q and k)
        are concatenated."""
        runs = [(enc, list(group)) for enc, group in
                itertools.groupby(parts, lambda p: self.encoding(p[1], q, block))]
        ys = [self.encoded(x, group, name if len(runs) == 1 else f"{name}.{j}", enc)
              for j, (enc, group) in enumerate(runs)]
        (y,) = ys if len(ys) == 1 else self.g.op("Concat", ys, axis=-1)
        if bias is not None:
            (y,) = self.g.op("Add", [y, self.const(f"{name}.bias", bias)])
        return y

    def encoded(self, x: str, parts: list, name: str, enc: Encoding) -> str:
        """One node (or the Q4_K triple) for parts that share an encoding."""
        kind, block = enc
        if kind == Q4K:
            return self.q4k_linear(x, _stacked([b.rows for _, b in parts]), name)
        if kind == INT8:  # one block size, maybe several GGML types (Q5_0 q and k beside a Q8_0 v)
            return self.int8_linear(x, [b for _, b in parts], name)
        w = np.ascontiguousarray(_stacked([w for w, _ in parts]).T)  # [K=in, N=out]
        if kind in ("int4", "int8"):
            return self.nbits_linear(x, w, name, 4 if kind == "int4" else 8, block)
        g = self.g
        wdt = np.float16 if kind == "fp16" else np.float32
        wname = g.init(f"{name}.weight", w.astype(wdt))
        if wdt != self.act:  # e.g. an fp16-stored LM head in an fp32 graph: compute in fp32
            (wname,) = g.op("Cast", [wname], to=self.act_t)
        (y,) = g.op("MatMul", [x, wname], name=name)
        return y

    def nbits_linear(self, x: str, w_in_out: np.ndarray, name: str, bits: int, block: int) -> str:
        """MatMulNBits over a [K, N] weight quantized symmetrically here."""
        k, n = w_in_out.shape
        packed, scales = quantize_blockwise(w_in_out, bits, block)
        ins = [x, self.g.init(f"{name}.qweight", packed), self.const(f"{name}.scales", scales)]
        (y,) = self.g.op("MatMulNBits", ins, domain=ORT_DOMAIN, name=name, K=k, N=n, bits=bits,
                         block_size=block, accuracy_level=self.quant.accuracy_level)
        return y

    def int8_linear(self, x: str, parts: list, name: str) -> str:
        """Q6_K / Q8_0 / Q5_0 rows (Blocks of one 8-bit block size) kept exact as one 8-bit
        MatMulNBits (gguf_quant.py)."""
        ps = [int8_parts(b.qtype, b.rows) for b in parts]
        packed, scales, block = _stacked([p.packed for p in ps]), _stacked([p.scales for p in ps]), ps[0].block
        n, blocks = scales.shape
        ins = [x, self.g.init(f"{name}.qweight", packed), self.const(f"{name}.scales", scales)]
        (y,) = self.g.op("MatMulNBits", ins, domain=ORT_DOMAIN, name=name, K=blocks * block, N=n, bits=8,
                         block_size=block, accuracy_level=self.quant.accuracy_level)
        return y

    def q4k_linear(self, x: str, rows: np.ndarray, name: str) -> str:
        """Q4_K rows kept exact (gguf_quant.py): MatMulNBits (its implicit zero point 8), minus
        the 32-value block sums of x times the offsets."""
        g, p = self.g, q4k_parts(rows)
        n, blocks = p.scales.shape
        ins = [x, g.init(f"{name}.qweight", p.packed), self.const(f"{name}.scales", p.scales)]
        (y,) = g.op("MatMulNBits", ins, domain=ORT_DOMAIN, name=name, K=blocks * Q4K_SUB_BLOCK, N=n, bits=4,
                    block_size=Q4K_SUB_BLOCK, accuracy_level=self.quant.accuracy_level)
        offsets = self.const(f"{name}.offsets", np.ascontiguousarray(p.offsets.T))  # [K/32, N]
        (correction,) = g.op("MatMul", [self.block_sums(x, blocks), offsets], name=f"{name}.offsets_matmul")
        (y,) = g.op("Sub", [y, correction])
        return y

    def block_sums(self, x: str, blocks: int) -> str:
        """x summed over each 32 values of its last axis, [B, S, K/32]; built once per input."""
        if x not in self._block_sums:
            g = self.g
            (xb,) = g.op("Reshape", [x, g.init(f"{x}.blocks_shape", np.array([0, 0, blocks, Q4K_SUB_BLOCK], np.int64))])
            (self._block_sums[x],) = g.op("ReduceSum", [xb, g.init(f"{x}.blocks_axis", np.array([-1], np.int64))],
                                          keepdims=0)
        return self._block_sums[x]

    def gamma(self, hf_name: str, name: str) -> str:
        """An RMSNorm weight; Gemma's norms scale by (1 + w), folded in here (in fp32, as it computes)."""
        return self.const(f"{name}.weight", self.weight(hf_name) + self.arch.norm_offset)

    def rms(self, x: str, hf_name: str, name: str) -> str:
        """A plain RMSNorm of x over its last axis (not touching the residual stream)."""
        (y,) = self.g.op("SimplifiedLayerNormalization", [x, self.gamma(hf_name, name)], name=name, axis=-1,
                         epsilon=self.arch.rms_norm_eps)
        return y

    def norm(self, pending: Optional[str], hf_name: str, name: str) -> str:
        """residual += pending (a sublayer's output), then RMSNorm of the residual: one fused node."""
        if pending is None:
            return self.rms(self.residual, hf_name, name)
        y, _, _, s = self.g.op("SkipSimplifiedLayerNormalization", [pending, self.residual,
                               self.gamma(hf_name, name)], n_out=4, domain=ORT_DOMAIN, name=name,
                               epsilon=self.arch.rms_norm_eps)
        self.residual = s
        return y

    def embed(self) -> Optional[np.ndarray]:
        """The embedding gather, stored fp16 unless the graph is fp32 end to end (a row gather, not
        bandwidth); Gemma multiplies by sqrt(hidden). Returns the table for a tied LM head."""
        g, emb = self.g, self.weight("model.embed_tokens.weight")
        emb_dt = np.float32 if self.quant.weights == "fp32" else np.float16
        (h,) = g.op("Gather", [g.init("embed_tokens", emb.astype(emb_dt)), "input_ids"], name="embed")
        if emb_dt != self.act:
            (h,) = g.op("Cast", [h], to=self.act_t)
        if self.arch.embed_scale is not None:
            (h,) = g.op("Mul", [h, self.const("embed_scale", np.array(self.arch.embed_scale, np.float32))])
        self.residual = h
        return emb if self.arch.tie_word_embeddings else None

    def rope(self, theta: float, scaling: Optional[dict]) -> tuple:
        """cos/sin cache initializers for one rope setting, built once (Gemma 3 has two)."""
        key = json.dumps([theta, scaling], sort_keys=True)
        if key not in self._rope:
            cos, sin = rope_cos_sin(self.arch.rotary_dim, theta, scaling, self.max_pos)
            tag = f"_{len(self._rope)}" if self._rope else ""
            self._rope[key] = (self.const(f"cos_cache{tag}", cos), self.const(f"sin_cache{tag}", sin))
        return self._rope[key]

    def qkv(self, i: int, x: str) -> list:
        """The packed q/k/v projection: one tensor, or q, k, v apart when they are normed per head."""
        a, w, p = self.arch, self.weight, f"model.layers.{i}.self_attn."
        names = ["qkv_proj.weight"] if a.fused_projections else [f"{n}_proj.weight" for n in "qkv"]
        bqkv = np.concatenate([w(p + f"{n}_proj.bias") for n in "qkv"]) if a.attention_bias else None
        qkv = self.linear(x, [self.part(p + n) for n in names], f"L{i}.qkv_proj", self.quant.weights, bqkv)
        if not a.qk_norm:
            return [qkv, "", ""]
        sizes = [a.num_heads * a.head_dim] + [a.num_kv_heads * a.head_dim] * 2
        q, k, v = self.g.op("Split", [qkv, self.g.init(f"L{i}.qkv_split", np.array(sizes, np.int64))],
                            n_out=3, axis=-1)
        return [self.head_norm(q, p + "q_norm.weight", f"L{i}.q_norm"),
                self.head_norm(k, p + "k_norm.weight", f"L{i}.k_norm"), v]

    def head_norm(self, x: str, hf_name: str, name: str) -> str:
        """RMSNorm over each head's own dims (Qwen3, Gemma 3): [B, S, H*D] -> [B, S, H, D] and back.
        GroupQueryAttention's q_norm_weight input would fold this, but its CPU kernel rejects it."""
        g, hd = self.g, self.arch.head_dim
        (y,) = g.op("Reshape", [x, g.init(f"{name}.split_heads", np.array([0, 0, -1, hd], np.int64))])
        y = self.rms(y, hf_name, name)
        (y,) = g.op("Reshape", [y, g.init(f"{name}.merge_heads", np.array([0, 0, -1], np.int64))])
        return y

    def attention(self, i: int, x: str) -> str:
        a, io = self.arch, self.io
        pk, pv = io.inputs["past_key"].format(i=i), io.inputs["past_value"].format(i=i)
        ok, ov = io.outputs["present_key"].format(i=i), io.outputs["present_value"].format(i=i)
        ins = self.qkv(i, x) + [pk, pv, "seqlens_k", "total_sequence_length"]
        attrs: dict = {"num_heads": a.num_heads, "kv_num_heads": a.num_kv_heads,
                       "scale": a.attn_scale or 1.0 / math.sqrt(a.head_dim), "do_rotary": 0}
        rope = a.rope_of(i)
        if rope is not None:  # rotary inside the op, over the first cos-cache-width * 2 dims
            ins += list(self.rope(*rope))
            attrs.update(do_rotary=1, rotary_interleaved=0)
        if a.attn_softcap:
            attrs["softcap"] = a.attn_softcap
        if a.is_sliding(i):
            # the same W keys as transformers' window (q - k < W): measured against it in tests
            attrs["local_window_size"] = a.sliding_window
        attn = self.g.op("GroupQueryAttention", ins, domain=ORT_DOMAIN, name=f"L{i}.attn",
                         outputs=[f"L{i}.attn/out", ok, ov], **attrs)[0]
        bias = self.weight(f"model.layers.{i}.self_attn.o_proj.bias") if a.o_proj_bias else None
        return self.linear(attn, [self.part(f"model.layers.{i}.self_attn.o_proj.weight")], f"L{i}.o_proj",
                           self.quant.weights, bias)

    def mlp(self, i: int, x: str) -> str:
        """down(act(gate(x)) * up(x)) with gate and up packed: SwiGLU, or Gemma's tanh-GELU GeGLU."""
        a, g, p = self.arch, self.g, f"model.layers.{i}.mlp."
        names = ["gate_up_proj.weight"] if a.fused_projections else ["gate_proj.weight", "up_proj.weight"]
        gu = self.linear(x, [self.part(p + n) for n in names], f"L{i}.gate_up_proj", self.quant.weights)
        gate, up = g.op("Split", [gu, g.init(f"L{i}.split", np.array([a.intermediate_size] * 2, np.int64))],
                        n_out=2, axis=-1)
        if a.activation == "gelu_tanh":
            (act,) = g.op("FastGelu", [gate], domain=ORT_DOMAIN)
        else:
            (act,) = g.op("QuickGelu", [gate], domain=ORT_DOMAIN, alpha=1.0)
        (act,) = g.op("Mul", [act, up])
        return self.linear(act, [self.part(p + "down_proj.weight")], f"L{i}.down_proj", self.quant.weights)

    def layer(self, i: int, pending: Optional[str]) -> str:
        """One decoder layer; returns its MLP output, added to the residual by the next norm.
        Gemma's sandwich: the post-attention norm applies to the attention output itself, and a
        pre- and a post-feedforward norm wrap the MLP."""
        p = f"model.layers.{i}."
        x = self.norm(pending, p + "input_layernorm.weight", f"L{i}.input_norm")
        o = self.attention(i, x)
        if self.arch.sandwich_norms:
            o = self.rms(o, p + "post_attention_layernorm.weight", f"L{i}.post_attn_norm")
            x = self.norm(o, p + "pre_feedforward_layernorm.weight", f"L{i}.pre_ff_norm")
            return self.rms(self.mlp(i, x), p + "post_feedforward_layernorm.weight", f"L{i}.post_ff_norm")
        x = self.norm(o, p + "post_attention_layernorm.weight", f"L{i}.post_attn_norm")
        return self.mlp(i, x)

    def lm_head(self, pending: str, tied: Optional[np.ndarray]) -> None:
        """Final norm, the last logits_to_keep rows only, the LM head, Gemma 2's final soft-cap."""
        g, a, quant = self.g, self.arch, self.quant
        x = self.norm(pending, "model.norm.weight", "final_norm")
        (neg,) = g.op("Neg", ["logits_to_keep"])
        (x,) = g.op("Slice", [x, neg, g.init("slice_end", np.array([np.iinfo(np.int64).max], np.int64)),
                              g.init("slice_axis", np.array([1], np.int64))])
        width = logits_width(a, quant)
        lm_w, blocks = self.part("lm_head.weight") if tied is None else (tied, self.blocks("model.embed_tokens.weight"))
        kept = None if blocks is None else Blocks(blocks.qtype, blocks.rows[:width])
        logits = self.linear(x, [(lm_w[:width], kept)], "lm_head", quant.lm_head or quant.weights,
                             block=quant.lm_head_block_size)
        del lm_w
        if self.act != np.float32:
            (logits,) = g.op("Cast", [logits], to=TensorProto.FLOAT)
        if a.final_softcap:  # cap * tanh(logits / cap)
            cap = g.init("final_softcap", np.array(a.final_softcap, np.float32))
            (logits,) = g.op("Div", [logits, cap])
            (logits,) = g.op("Tanh", [logits])
            (logits,) = g.op("Mul", [logits, cap])
        g.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="logits_out"))


def _graph_io(arch: Arch, quant: QuantConfig, io: GraphIO, act_t: int) -> tuple:
    """The graph's inputs and outputs: the names the runtime binds, with the KV buffers."""
    kv_shape = ["batch", arch.num_kv_heads, "max_context", arch.head_dim]
    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch", "sequence"]),
        helper.make_tensor_value_info("seqlens_k", TensorProto.INT32, ["batch"]),
        helper.make_tensor_value_info("total_sequence_length", TensorProto.INT32, []),
        helper.make_tensor_value_info("logits_to_keep", TensorProto.INT64, [1]),
    ]
    outputs = [helper.make_tensor_value_info("logits", TensorProto.FLOAT,
                                             ["batch", "kept", logits_width(arch, quant)])]
    for i in range(arch.num_layers):
        for kind in ("key", "value"):
            inputs.append(helper.make_tensor_value_info(io.inputs[f"past_{kind}"].format(i=i), act_t, kv_shape))
            outputs.append(helper.make_tensor_value_info(io.outputs[f"present_{kind}"].format(i=i), act_t, kv_shape))
    return inputs, outputs


def build_decoder(
    arch: Arch,
    weight: Callable[[str], np.ndarray],
    quant: QuantConfig,
    out_dir: Path,
    max_context: Optional[int] = None,
    progress: Optional[Callable[[int], None]] = None,
    blocks: Optional[BlockReader] = None,
) -> GraphIO:
    """Write `model.onnx` + `model.onnx.data` into out_dir.

    weight(name) returns the fp32 numpy array of a Hugging Face parameter; it is called once per
    tensor so the caller can stream from safetensors. progress(i) is called after each layer.
    blocks(name), for a GGUF source, returns a tensor's stored blocks, whose encoding the graph
    keeps where quant.keep_source_quant says so (gguf_quant.py).
    """
    quant = quant.for_arch(arch)
    out_dir.mkdir(parents=True, exist_ok=True)
    writer = TensorWriter(out_dir / "model.onnx.data")
    max_pos = min(arch.max_position_embeddings, max_context or arch.max_position_embeddings)
    d = _Decoder(arch, weight, quant, _Graph(writer), max_pos, blocks)
    tied = d.embed()
    pending: Optional[str] = None  # output of the previous sublayer, not yet added to residual
    for i in range(arch.num_layers):
        pending = d.layer(i, pending)
        if progress:
            progress(i)
    d.lm_head(pending, tied)
    writer.close()
    inputs, outputs = _graph_io(arch, quant, d.io, d.act_t)
    graph = helper.make_graph(d.g.nodes, "edge_ssd_decoder", inputs, outputs, initializer=d.g.inits)
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(ORT_DOMAIN, 1)],
        producer_name="edge-ssd",
    )
    model.ir_version = 9
    onnx.save_model(model, str(out_dir / "model.onnx"))
    return d.io
