"""Read a GGUF file directly: metadata -> config.json, tensors -> fp32 Hugging Face arrays one
at a time, vocabulary -> tokenizer.json. No torch, no transformers.

Why not the transformers conversion (sources.convert_gguf): it materializes the whole model in
fp32 through torch (8.8 GiB RSS for the 1.5B target) and writes it to disk again. Here a GGUF
becomes a *light folder* in the cache (config.json, tokenizer files and a pointer to the GGUF,
no weights), and `weight(name)` reads and dequantizes one tensor when the graph builder asks.

Why our own header parser rather than `gguf.GGUFReader`: the reader builds numpy views for
every vocabulary string (150k tokens + 150k merges), which took 17.6 s and 0.5 GB per file
here; parsing the same header with `struct` takes well under a second. The `gguf` package still
supplies the format's constants and the dequantization kernels (`gguf.quants`).

Layout notes, checked numerically against the transformers conversion (tests, and the report
in docs/architecture.md): GGUF lists dims fastest-first, so a tensor read as
numpy has the Hugging Face [out, in] layout as is. llama.cpp permutes the rows of Q and K for
the `llama` architecture (rotary on interleaved pairs); `qwen2` and `gemma3` are stored
unpermuted (rotary on halves, as Hugging Face). For `gemma3` llama.cpp's converter stores every
RMSNorm weight as 1 + w (Gemma3RMSNorm's scale; conversion/gemma.py `norm_shift`), and its
loader (src/models/gemma3.cpp) fills in what the metadata leaves out: one full-attention layer
in 6, a 10000 rope base on sliding layers, the attention scale. The mapping here follows that
loader, so the config is what llama.cpp runs, not what a converter might have meant.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .sources import SourceError
from .weights import Weights, bf16_to_f32

GGUF_MAGIC = b"GGUF"
DIRECT_VERSION = 1  # bump when the light folder's contents change: invalidates cached folders
POINTER = "gguf-source.json"  # in a light folder: which GGUF serves the weights

_GLOBAL_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_LAYER_RE = re.compile(r"model\.layers\.(\d+)\.(.+)")
# Gemma 3's sandwich norms and q/k norms (gguf's TensorNameMap for MODEL_ARCH.GEMMA3): the norm
# before the MLP is llama.cpp's ffn_norm, so post_attention_layernorm gets a name of its own.
_GEMMA3_LAYER_NAMES = {
    "post_attention_layernorm.weight": "post_attention_norm.weight",
    "pre_feedforward_layernorm.weight": "ffn_norm.weight",
    "post_feedforward_layernorm.weight": "post_ffw_norm.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
}

# The Hugging Face Qwen2 tokenizer's pre-tokenizer split (tokenizer.ggml.pre = "qwen2").
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4  # tokenizer.ggml.token_type values


class UnsupportedGGUF(SourceError):
    """A GGUF this reader does not map (architecture, tokenizer, rope scaling): the caller may
    fall back to the transformers conversion."""


@dataclass(frozen=True)
class TensorInfo:
    shape: tuple  # numpy order (slowest first): the Hugging Face layout
    qtype: int
    offset: int  # absolute, in the file
    n_bytes: int


@dataclass
class GGUFHeader:
    path: Path
    metadata: dict
    tensors: dict  # name -> TensorInfo


# ---------------------------------------------------------------------------- header parsing

class _Cursor:
    """Little-endian reads from a buffer, advancing an offset."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def scalar(self, fmt: str):
        try:
            (v,) = struct.unpack_from("<" + fmt, self.buf, self.pos)
        except struct.error as e:
            raise SourceError(f"{self.path}: truncated GGUF header") from e
        self.pos += struct.calcsize(fmt)
        return v

    def skip_strings(self, count: int) -> None:
        for _ in range(count):
            n = self.scalar("Q")  # read first: `self.pos += self.scalar(...)` adds to the old pos
            self.pos += n

    def string(self) -> str:
        n = self.scalar("Q")
        raw = self.buf[self.pos:self.pos + n]
        if len(raw) != n:
            raise SourceError(f"{self.path}: truncated GGUF header")
        self.pos += n
        return raw.decode("utf-8", errors="surrogateescape")

    def array(self, dtype: np.dtype, count: int) -> np.ndarray:
        end = self.pos + count * dtype.itemsize
        if end > len(self.buf):
            raise SourceError(f"{self.path}: truncated GGUF header")
        out = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).copy()
        self.pos = end
        return out


def _value_formats() -> dict:
    from gguf import GGUFValueType as V

    return {V.UINT8: "B", V.INT8: "b", V.UINT16: "H", V.INT16: "h", V.UINT32: "I", V.INT32: "i",
            V.FLOAT32: "f", V.BOOL: "?", V.UINT64: "Q", V.INT64: "q", V.FLOAT64: "d"}


def _value(cur: _Cursor, vtype: int, formats: dict, strings: bool = True):
    """One metadata value; with strings=False an array of strings is skipped (None)."""
    from gguf import GGUFValueType as V

    if vtype == V.STRING:
        return cur.string()
    if vtype == V.ARRAY:
        etype, count = cur.scalar("I"), cur.scalar("Q")
        if etype in formats and etype != V.BOOL:
            return cur.array(np.dtype("<" + formats[etype]), count).tolist()
        if etype == V.STRING and not strings:
            return cur.skip_strings(count)
        return [_value(cur, etype, formats) for _ in range(count)]
    if vtype not in formats:
        raise SourceError(f"{cur.path}: unknown GGUF value type {vtype}")
    return cur.scalar(formats[vtype])


def read_header(path: Path, vocabulary: bool = True) -> GGUFHeader:
    """Metadata and tensor table of a GGUF (v2/v3, little-endian) file; tensors are not read.
    vocabulary=False skips string arrays (tokens, merges: 300k strings), which reading
    weights does not need."""
    from gguf import GGML_QUANT_SIZES

    try:
        with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            return _parse(_Cursor(buf, path), path, GGML_QUANT_SIZES, vocabulary)
    except (OSError, ValueError) as e:  # mmap of an empty file raises ValueError
        raise SourceError(f"{path}: cannot be read as GGUF ({e})") from e


def _parse(cur: _Cursor, path: Path, quant_sizes: dict, vocabulary: bool) -> GGUFHeader:
    if bytes(cur.buf[:4]) != GGUF_MAGIC:
        raise SourceError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")
    cur.pos = 4
    version = cur.scalar("I")
    if version not in (2, 3):
        raise SourceError(f"{path}: GGUF version {version} is not supported (2 or 3, little-endian)")
    n_tensors, n_kv = cur.scalar("Q"), cur.scalar("Q")
    formats = _value_formats()
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = _value(cur, cur.scalar("I"), formats, vocabulary)
    table = []
    for _ in range(n_tensors):
        name = cur.string()
        dims = [cur.scalar("Q") for _ in range(cur.scalar("I"))]
        table.append((name, dims, cur.scalar("I"), cur.scalar("Q")))
    align = int(metadata.get("general.alignment", 32))
    start = cur.pos + (-cur.pos) % align
    tensors = {}
    for name, dims, qtype, offset in table:
        if qtype not in quant_sizes:
            raise UnsupportedGGUF(f"{path}: tensor {name} has GGML type {qtype}, unknown to the gguf package")
        block, type_size = quant_sizes[qtype]
        n = int(np.prod(dims)) if dims else 1
        tensors[name] = TensorInfo(tuple(int(d) for d in reversed(dims)), qtype, start + offset,
                                   n // block * type_size)
    end = max((t.offset + t.n_bytes for t in tensors.values()), default=start)
    if end > len(cur.buf):
        raise SourceError(f"{path}: truncated GGUF file ({len(cur.buf)} bytes, its tensors need {end})")
    return GGUFHeader(path, metadata, tensors)


# ---------------------------------------------------------------------------- tensors

def _dequantizer(qtype: int):
    """gguf.quants' class for a quantized type (the package has no public lookup by type)."""
    from gguf import quants

    for obj in vars(quants).values():
        if isinstance(obj, type) and getattr(obj, "qtype", None) == qtype and hasattr(obj, "dequantize_rows"):
            if hasattr(obj, "init_grid"):
                obj.init_grid()
            return obj
    raise UnsupportedGGUF(f"the gguf package cannot dequantize GGML type {qtype}")


# Values per gguf.quants call: its intermediates then stay in cache. Measured on the 1.5B
# target's Q4_K/Q6_K tensors: ~2.5 ns per value at 64k; 3-4x slower at 4M (a whole layer
# tensor) and with gguf.quants.dequantize's own 16-row groups; and chunks bound the memory
# of the intermediates (a whole 151,936-row LM head peaked at 2.7 GB).
DEQUANT_CHUNK = 1 << 16


def read_tensor(header: GGUFHeader, name: str) -> np.ndarray:
    """One tensor as fp32 in numpy order. Read with a file read, not the memory map, so its
    bytes do not stay resident in the process after the array is freed (RSS budget)."""
    from gguf import GGMLQuantizationType as Q

    t = header.tensors[name]
    rows = read_blocks(header, name)
    if t.qtype == Q.F32:
        return rows.view(np.float32).reshape(t.shape)
    if t.qtype == Q.F16:
        return rows.view(np.float16).astype(np.float32).reshape(t.shape)
    if t.qtype == Q.BF16:
        return bf16_to_f32(rows.view(np.uint16)).reshape(t.shape)
    quant = _dequantizer(t.qtype)
    out = np.empty((rows.shape[0], t.shape[-1]), dtype=np.float32)
    step = max(1, DEQUANT_CHUNK // t.shape[-1])
    for i in range(0, rows.shape[0], step):
        out[i:i + step] = quant.dequantize_rows(rows[i:i + step])
    return out.reshape(t.shape)


def read_blocks(header: GGUFHeader, name: str) -> np.ndarray:
    """One tensor's bytes as stored, [rows, bytes per row] (a GGML block never spans rows)."""
    t = header.tensors[name]
    raw = np.fromfile(header.path, dtype=np.uint8, count=t.n_bytes, offset=t.offset)
    if raw.size != t.n_bytes:
        raise SourceError(f"{header.path}: truncated at tensor {name}")
    return raw.reshape(max(1, int(np.prod(t.shape[:-1]))), -1)


def gguf_name(hf_name: str, arch: str = "llama") -> Optional[str]:
    """The GGUF tensor name of a Hugging Face parameter name (None: not a name we map)."""
    if hf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[hf_name]
    m, names = _LAYER_RE.fullmatch(hf_name), FAMILIES[arch].layer_names
    if m and m.group(2) in names:
        return f"blk.{m.group(1)}.{names[m.group(2)]}"
    return None


def unpermute_rows(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's `permute` of Q/K rows (convert_hf_to_gguf.py, LlamaModel.permute): per
    head it interleaves the two rotary halves; this restores Hugging Face's half-split order."""
    rest = w.shape[1:]
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(w.shape)


def open_gguf_weights(path: Path) -> Weights:
    """weight(hf_name) -> fp32 array in Hugging Face layout, dequantized on demand, with what
    llama.cpp's converter did to it undone (Q/K permutation, Gemma's 1 + w norms)."""
    header = read_header(path, vocabulary=False)
    arch = _arch_name(header)
    family, unpermute = FAMILIES[arch], _row_order(header, arch)

    def weight(name: str) -> np.ndarray:
        g = gguf_name(name, arch)
        if g is None or g not in header.tensors:
            raise SourceError(f"weight {name} not found in {path}" + (f" (as {g})" if g else ""))
        w = unpermute(g, read_tensor(header, g))
        if family.norm_shift and g.endswith("norm.weight"):
            w = w - np.float32(family.norm_shift)  # exact: 1 + w was rounded where it was stored
        return w

    return weight


@dataclass(frozen=True)
class Blocks:
    """A tensor as the GGUF stores it: its GGML type and its bytes, [rows, bytes per row], rows
    in Hugging Face order (graph.py keeps a quantized tensor's own encoding from these)."""

    qtype: int
    rows: np.ndarray


def open_gguf_blocks(path: Path) -> Callable[[str], Optional[Blocks]]:
    """blocks(hf_name) -> the stored Blocks of a Hugging Face parameter, None where not stored."""
    header = read_header(path, vocabulary=False)
    arch = _arch_name(header)
    unpermute = _row_order(header, arch)

    def blocks(name: str) -> Optional[Blocks]:
        g = gguf_name(name, arch)
        if g is None or g not in header.tensors:
            return None
        return Blocks(header.tensors[g].qtype, unpermute(g, read_blocks(header, g)))

    return blocks


def _row_order(header: GGUFHeader, arch: str) -> Callable[[str, np.ndarray], np.ndarray]:
    """(gguf name, rows) -> the rows in Hugging Face order: Q and K un-permuted where llama.cpp
    permuted them (the same for dequantized values and for stored blocks: a block is in a row)."""
    md = header.metadata
    heads = int(md[f"{arch}.attention.head_count"])
    kv_heads = int(md.get(f"{arch}.attention.head_count_kv", heads))

    def order(g: str, rows: np.ndarray) -> np.ndarray:
        if FAMILIES[arch].permuted and (".attn_q." in g or ".attn_k." in g):
            return unpermute_rows(rows, heads if ".attn_q." in g else kv_heads)
        return rows
    return order


# ---------------------------------------------------------------------------- config

MetaKey = Callable[..., object]  # key(name, default) -> the value of `<arch>.<name>`; no default: required


@dataclass(frozen=True)
class Family:
    """How llama.cpp stores one architecture, and what its config.json gets beyond the common
    fields (`extra_config(key, header, cfg)`)."""

    architecture: str  # the Hugging Face class
    model_type: str
    permuted: bool = False  # Q/K rows permuted by the converter
    norm_shift: float = 0.0  # added by the converter to every *norm.weight
    layer_names: dict = field(default_factory=lambda: dict(_LAYER_NAMES))
    extra_config: Optional[Callable[[MetaKey, GGUFHeader, dict], dict]] = None


def _gemma3_layer_types(key: MetaKey, n_layers: int) -> list:
    """Per layer, sliding or full attention, as llama.cpp's load_swa_pattern reads them: a
    per-layer array (true: sliding), else a period (default 6) whose last layer is full."""
    pattern = key("attention.sliding_window_pattern", 6)
    if isinstance(pattern, list):
        if len(pattern) != n_layers:
            raise UnsupportedGGUF(f"attention.sliding_window_pattern has {len(pattern)} entries for {n_layers} layers")
        return ["sliding_attention" if p else "full_attention" for p in pattern]
    return ["sliding_attention" if i % int(pattern) < int(pattern) - 1 else "full_attention" for i in range(n_layers)]


def _gemma3_config(key: MetaKey, header: GGUFHeader, cfg: dict) -> dict:
    """Gemma 3's fields, from what llama.cpp's loader (src/models/gemma3.cpp) reads.

    query_pre_attn_scalar: llama.cpp scales queries by 1/sqrt(head_dim), except for the 62-layer
    27B, whose scalar is hidden/heads (gemma_pytorch's config, which it cites). Gemma 3 has no
    attention soft-cap (its converter asserts so); a final soft-cap only where the GGUF has one.
    Without a sliding window every layer is full attention (llama.cpp's LLAMA_SWA_TYPE_NONE).
    """
    if key("attention.value_length", cfg["head_dim"]) != cfg["head_dim"]:
        raise UnsupportedGGUF(f"{header.path}: gemma3 with value_length != key_length is not read directly")
    layers, window = cfg["num_hidden_layers"], int(key("attention.sliding_window", 0))
    big = layers == 62
    out = {
        "hidden_act": "gelu_pytorch_tanh", "hidden_activation": "gelu_pytorch_tanh",
        "query_pre_attn_scalar": cfg["hidden_size"] // cfg["num_attention_heads"] if big else cfg["head_dim"],
        "rope_local_base_freq": float(key("rope.freq_base_swa", 10000.0)),
        "attn_logit_softcapping": None,
        "final_logit_softcapping": key("final_logit_softcapping", 0.0) or None,
        "sliding_window": window or None,
    }
    if window:
        out["layer_types"] = _gemma3_layer_types(key, layers)
    return out


FAMILIES = {  # general.architecture -> how it is read
    "qwen2": Family("Qwen2ForCausalLM", "qwen2"),
    "llama": Family("LlamaForCausalLM", "llama", permuted=True),
    "gemma3": Family("Gemma3ForCausalLM", "gemma3_text", norm_shift=1.0,
                     layer_names={**_LAYER_NAMES, **_GEMMA3_LAYER_NAMES}, extra_config=_gemma3_config),
}


def _arch_name(header: GGUFHeader) -> str:
    arch = header.metadata.get("general.architecture")
    if arch not in FAMILIES:
        raise UnsupportedGGUF(f"{header.path}: GGUF architecture {arch!r} is not read directly "
                              f"(read directly: {', '.join(FAMILIES)})")
    return arch


def _meta_key(header: GGUFHeader, arch: str) -> MetaKey:
    """key(name, default): metadata `<arch>.<name>`; missing with no default is UnsupportedGGUF."""
    def key(name: str, default=None):
        value = header.metadata.get(f"{arch}.{name}", default)
        if value is None:
            raise UnsupportedGGUF(f"{header.path}: GGUF metadata has no {arch}.{name}")
        return value

    return key


def _rope_scaling(key: MetaKey, header: GGUFHeader) -> Optional[dict]:
    """Linear rope scaling as llama.cpp reads it (type defaults to linear; the factor's old key
    is rope.scale_linear); other types, or per-dimension factors, are refused by name."""
    kind = key("rope.scaling.type", "linear")
    if "rope_freqs.weight" in header.tensors:
        raise UnsupportedGGUF(f"{header.path}: per-dimension rope factors (rope_freqs.weight) are not read directly")
    if kind not in ("none", "linear"):
        raise UnsupportedGGUF(f"{header.path}: rope scaling {kind!r} is not read directly (only linear)")
    factor = float(key("rope.scaling.factor", key("rope.scale_linear", 0.0)))
    if kind == "none" or factor in (0.0, 1.0):
        return None
    return {"rope_type": "linear", "factor": factor}


def gguf_config(header: GGUFHeader) -> dict:
    """The config.json a Hugging Face folder of this model would have (what `Arch` reads)."""
    md, arch = header.metadata, _arch_name(header)
    family, key = FAMILIES[arch], _meta_key(header, arch)
    heads = int(key("attention.head_count"))
    hidden = int(key("embedding_length"))
    emb = header.tensors.get("token_embd.weight")
    if emb is None:
        raise SourceError(f"{header.path}: GGUF has no token_embd.weight")
    cfg = {
        "architectures": [family.architecture],
        "model_type": family.model_type,
        "hidden_size": hidden,
        "num_hidden_layers": int(key("block_count")),
        "intermediate_size": int(key("feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(key("attention.head_count_kv", heads)),
        "head_dim": int(key("attention.key_length", hidden // heads)),
        "rms_norm_eps": float(key("attention.layer_norm_rms_epsilon")),
        "rope_theta": float(key("rope.freq_base", 10000.0)),
        "rope_scaling": _rope_scaling(key, header),
        "max_position_embeddings": int(key("context_length")),
        "vocab_size": int(emb.shape[0]),
        "tie_word_embeddings": "output.weight" not in header.tensors,
        "attention_bias": "blk.0.attn_q.bias" in header.tensors,
        "hidden_act": "silu",
        "bos_token_id": md.get("tokenizer.ggml.bos_token_id"),
        "eos_token_id": md.get("tokenizer.ggml.eos_token_id"),
    }
    if family.extra_config:
        cfg.update(family.extra_config(key, header, cfg))
    return cfg


# ---------------------------------------------------------------------------- tokenizer

def _pre_tokenizer(pre: str, path: Path) -> tuple:
    """(normalizer, pre_tokenizer) of the Hugging Face tokenizer llama.cpp names `pre`."""
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True}
    if pre == "qwen2":
        split = {"type": "Split", "pattern": {"Regex": QWEN2_SPLIT}, "behavior": "Isolated", "invert": False}
        return {"type": "NFC"}, {"type": "Sequence", "pretokenizers": [split, {**byte_level, "use_regex": False}]}
    if pre in ("gpt-2", "default"):
        return None, {**byte_level, "use_regex": True}
    raise UnsupportedGGUF(f"{path}: GGUF pre-tokenizer {pre!r} is not rebuilt directly (qwen2, gpt-2)")


def gguf_tokenizer_json(header: GGUFHeader) -> dict:
    """A `tokenizers` JSON for the GGUF's vocabulary: byte-level BPE (tokenizer.ggml.model =
    gpt2) or SentencePiece (llama).

    Every GGUF token is in the model's vocabulary at its id; control tokens become special added
    tokens and user-defined ones plain added tokens (both matched before the model), as
    llama.cpp treats them.
    """
    model = header.metadata.get("tokenizer.ggml.model")
    if model == "gpt2":
        return _bpe_tokenizer_json(header)
    if model == "llama":
        return _spm_tokenizer_json(header)
    raise UnsupportedGGUF(f"{header.path}: GGUF tokenizer {model!r} is not rebuilt directly "
                          "(byte-level BPE gpt2, SentencePiece llama)")


def _added_tokens(tokens: list, types: list) -> list:
    return [{"id": i, "content": tokens[i], "single_word": False, "lstrip": False, "rstrip": False,
             "normalized": False, "special": t == TOKEN_CONTROL}
            for i, t in enumerate(types) if t in (TOKEN_CONTROL, TOKEN_USER_DEFINED)]


def _bpe_tokenizer_json(header: GGUFHeader) -> dict:
    """Byte-level BPE with the GGUF's merges, pre-tokenized as tokenizer.ggml.pre names."""
    md = header.metadata
    normalizer, pre = _pre_tokenizer(md.get("tokenizer.ggml.pre", "default"), header.path)
    tokens = md["tokenizer.ggml.tokens"]
    types = md.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    byte_level = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
        "normalizer": normalizer, "pre_tokenizer": pre,
        "post_processor": byte_level, "decoder": {**byte_level, "trim_offsets": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": "",
                  "end_of_word_suffix": "", "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)},
                  "merges": [m.split(" ", 1) for m in md.get("tokenizer.ggml.merges", [])]},
    }


def spm_merges(tokens: list, scores: list, types: list) -> list:
    """BPE merges that reproduce llama.cpp's SentencePiece tokenizer (llm_tokenizer_spm).

    llama.cpp starts from characters and repeatedly joins the adjacent pair whose joined text is
    the vocabulary piece with the highest score. A BPE whose merges are every split (a, b) of
    every normal piece a+b, ranked by that piece's score, makes the same choices (the merges of
    transformers' GGUFLlamaConverter; its Gemma converter builds a Unigram model instead, which
    picks the best-scoring segmentation overall and can differ). Control and user-defined pieces
    are not merge results: they are matched whole before the model, and a special token's text
    typed in a message must stay text; nor are byte pieces (<0x41> is the byte, not the text).
    """
    index = {t: i for i, t in enumerate(tokens)}
    ranked = []
    for i, piece in enumerate(tokens):
        if types[i] != TOKEN_NORMAL:
            continue
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in index and right in index:
                ranked.append((-scores[i], i, index[left], left, right))
    ranked.sort()
    return [[left, right] for *_, left, right in ranked]


def _spm_tokenizer_json(header: GGUFHeader) -> dict:
    """SentencePiece (BPE type) as llama.cpp runs it: spaces become U+2581, no pre-tokenizer
    (llama.cpp does not split on whitespace), pieces merged by score (spm_merges), characters
    outside the vocabulary as <0xXX> byte pieces. A vocabulary that asks for a prefix space
    (add_space_prefix, llama.cpp's default for SentencePiece) is refused: llama.cpp adds it only
    at the text's start and after special tokens, which a normalizer cannot say."""
    md = header.metadata
    if md.get("tokenizer.ggml.add_space_prefix", True):
        raise UnsupportedGGUF(f"{header.path}: SentencePiece GGUF tokenizer with add_space_prefix is not "
                              "rebuilt directly (only add_space_prefix = false, as Gemma)")
    tokens, scores = md["tokenizer.ggml.tokens"], md.get("tokenizer.ggml.scores")
    types = md.get("tokenizer.ggml.token_type")
    if scores is None or types is None:
        raise UnsupportedGGUF(f"{header.path}: SentencePiece GGUF tokenizer without scores or token types")
    unk = md.get("tokenizer.ggml.unknown_token_id")
    return {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": _added_tokens(tokens, types),
        "normalizer": {"type": "Replace", "pattern": {"String": " "}, "content": "\u2581"},
        "pre_tokenizer": None, "post_processor": None,
        "decoder": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"}]},
        "model": {"type": "BPE", "dropout": None, "unk_token": tokens[unk] if unk is not None else None,
                  "continuing_subword_prefix": None, "end_of_word_suffix": None, "fuse_unk": True,
                  "byte_fallback": True, "ignore_merges": False,
                  "vocab": {t: i for i, t in enumerate(tokens)}, "merges": spm_merges(tokens, scores, types)},
    }


def gguf_tokenizer_config(header: GGUFHeader) -> tuple:
    """(tokenizer_config.json, generation_config.json) dicts: special tokens, BOS, chat template."""
    md = header.metadata
    tokens = md["tokenizer.ggml.tokens"]

    def token(kind: str) -> Optional[str]:
        i = md.get(f"tokenizer.ggml.{kind}_token_id")
        return tokens[i] if i is not None and 0 <= i < len(tokens) else None

    add_bos = bool(md.get("tokenizer.ggml.add_bos_token", False))
    tok_cfg = {"eos_token": token("eos"), "bos_token": token("bos") if add_bos else None,
               "pad_token": token("padding"), "add_bos_token": add_bos,
               "chat_template": md.get("tokenizer.chat_template")}
    gen = {k: md[f"tokenizer.ggml.{k}"] for k in ("bos_token_id", "eos_token_id") if f"tokenizer.ggml.{k}" in md}
    return tok_cfg, gen


# ---------------------------------------------------------------------------- light folder

def _file_key(path: Path) -> str:
    st = path.stat()
    return f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}|{DIRECT_VERSION}"


def light_folder(gguf: Path, cache: Path) -> Path:
    """A cached folder with config.json, tokenizer.json, tokenizer_config.json,
    generation_config.json and a pointer to the GGUF (no weights); built once per file.

    Raises UnsupportedGGUF for what this reader does not map (the caller falls back).
    """
    key = hashlib.sha256(_file_key(gguf).encode()).hexdigest()[:16]
    out = cache / "gguf-direct" / f"{gguf.stem}-{key}"
    if (out / POINTER).exists():
        return out
    header = read_header(gguf)
    files = {"config.json": gguf_config(header), "tokenizer.json": gguf_tokenizer_json(header)}
    files["tokenizer_config.json"], files["generation_config.json"] = gguf_tokenizer_config(header)
    files[POINTER] = {"gguf": str(gguf.resolve()), "key": _file_key(gguf)}  # written last: complete
    out.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        (out / name).write_text(json.dumps(content, ensure_ascii=False, indent=1 if name != "tokenizer.json" else None))
    return out


def pointed_gguf(folder: Path) -> Optional[Path]:
    """The GGUF a light folder points to (None for an ordinary folder); refuses a stale pointer."""
    pointer = folder / POINTER
    if not pointer.exists():
        return None
    try:
        info = json.loads(pointer.read_text())
        gguf = Path(info["gguf"])
        fresh = _file_key(gguf) == info["key"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SourceError(f"{pointer}: unreadable GGUF pointer ({e}); delete {folder}") from e
    if not fresh:
        raise SourceError(f"{gguf} changed since {folder} was made from it; delete that folder")
    return gguf

