"""Write a tiny Hugging Face model (tiny.py) as a GGUF file the way llama.cpp's
convert_hf_to_gguf.py does: its tensor names, Q/K rows permuted for `llama`, the byte-level
BPE vocabulary with merges and token types. Written independently of export/gguf_source.py
(names and permutation are spelled out here) so the tests compare two implementations.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# The Hugging Face Qwen2 tokenizer's pre-tokenizer and normalizer, as its tokenizer.json has them.
QWEN2_TOKENIZER_PARTS = json.loads(r'''{
 "normalizer": {"type": "NFC"},
 "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
  {"type": "Split", "pattern": {"Regex": "(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}| ?[^\\s\\p{L}\\p{N}]+[\\r\\n]*|\\s*[\\r\\n]+|\\s+(?!\\S)|\\s+"},
   "behavior": "Isolated", "invert": false},
  {"type": "ByteLevel", "add_prefix_space": false, "trim_offsets": true, "use_regex": false}]}
}''')

LLAMA_CPP_NAMES = {  # Hugging Face name (per layer) -> llama.cpp name
    "input_layernorm.weight": "attn_norm.weight", "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight", "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight", "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_proj.bias": "attn_q.bias", "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.bias": "attn_v.bias", "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight", "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, n_head: int, n_head_kv: int) -> np.ndarray:
    """convert_hf_to_gguf.py LlamaModel.permute, verbatim in numpy."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def qwen2_style_tokenizer(folder: Path) -> None:
    """Give the tiny folder's tokenizer the real Qwen2 normalizer and pre-tokenizer."""
    path = folder / "tokenizer.json"
    tok = json.loads(path.read_text())
    tok.update(QWEN2_TOKENIZER_PARTS)
    path.write_text(json.dumps(tok))


def _hf_tensors(folder: Path) -> dict:
    from safetensors.numpy import load_file

    return load_file(str(folder / "model.safetensors"))


def _gguf_tensor_name(name: str) -> str:
    glob = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}
    if name in glob:
        return glob[name]
    _, _, i, rest = name.split(".", 3)
    return f"blk.{i}.{LLAMA_CPP_NAMES[rest]}"


def _add_vocabulary(w, folder: Path, pre: str) -> None:
    tok = json.loads((folder / "tokenizer.json").read_text())
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    vocab = {i: t for t, i in tok["model"]["vocab"].items()}
    specials = {a["id"] for a in tok["added_tokens"] if a["special"]}
    tokens = [vocab[i] for i in range(len(vocab))]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types([3 if i in specials else 1 for i in range(len(tokens))])
    w.add_token_merges([" ".join(m) if isinstance(m, list) else m for m in tok["model"]["merges"]])
    w.add_eos_token_id(tokens.index(cfg["eos_token"]))
    w.add_bos_token_id(0)
    w.add_pad_token_id(tokens.index(cfg["pad_token"]))
    w.add_add_bos_token(False)
    w.add_chat_template(cfg["chat_template"])


def write_gguf(folder: Path, out: Path, pre: str = "qwen2", quant: dict = None) -> Path:
    """folder (tiny.make_model) -> out.gguf; `quant` maps GGUF tensor names to a GGML type."""
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    arch = cfg["model_type"]
    w = gguf.GGUFWriter(str(out), arch)
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_rope_freq_base(cfg.get("rope_theta", 10000.0))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    _add_vocabulary(w, folder, pre)
    for name, t in _hf_tensors(folder).items():
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = llama_cpp_permute(t, heads, heads)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = llama_cpp_permute(t, heads, kv)
        g = _gguf_tensor_name(name)
        qtype = (quant or {}).get(g)
        if qtype is not None:
            w.add_tensor(g, gguf.quants.quantize(t, qtype), raw_dtype=qtype)
        else:
            w.add_tensor(g, np.ascontiguousarray(t, dtype=np.float32))
    _write(w)
    return out


def _write(w) -> None:
    """Write a GGUFWriter's header, metadata and tensors to its file and close it."""
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


# A SentencePiece (BPE type) vocabulary shaped like Gemma's: control tokens, user-defined
# whitespace tokens, the 256 byte pieces, then pieces ranked by score (merges highest first).
SPM_CONTROL = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SPM_USER_DEFINED = ["\n", "\n\n", "\t"]
SPM_CHARS = list("▁etaohnsrdlic")
SPM_MERGED = ["▁t", "he", "▁the", "th", "in", "er", "an", "▁a", "▁▁", "▁▁▁▁", "re", "on", "at", "en",
              "nd", "▁s", "es", "and", "▁and", "ha", "ed", "▁o"]


def spm_vocabulary(size: int) -> tuple:
    """(tokens, scores, token types) of `size` entries (GGUF token types: 1 normal, 3 control,
    4 user-defined, 6 byte); merged pieces score -rank, characters below every merge."""
    tokens = SPM_CONTROL + SPM_USER_DEFINED + [f"<0x{b:02X}>" for b in range(256)]
    types = [3] * len(SPM_CONTROL) + [4] * len(SPM_USER_DEFINED) + [6] * 256
    scores = [-1000.0] * (len(SPM_CONTROL) + len(SPM_USER_DEFINED)) + [0.0] * 256
    pieces = (SPM_CHARS + SPM_MERGED)[:size - len(tokens)]
    for piece in pieces:
        tokens.append(piece)
        types.append(1)
        scores.append(-float(SPM_MERGED.index(piece)) if piece in SPM_MERGED else -100.0 - len(tokens))
    assert len(tokens) == size, (len(tokens), size)
    return tokens, scores, types


def add_spm_vocabulary(w, size: int) -> None:
    """tokenizer.ggml.* as llama.cpp's converter writes a Gemma 3 vocabulary."""
    tokens, scores, types = spm_vocabulary(size)
    w.add_tokenizer_model("llama")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_scores(scores)
    w.add_token_types(types)
    w.add_bos_token_id(2)
    w.add_eos_token_id(1)
    w.add_unk_token_id(3)
    w.add_pad_token_id(0)
    w.add_add_bos_token(True)
    w.add_add_eos_token(False)
    w.add_add_space_prefix(False)


def write_gemma3_gguf(folder: Path, out: Path, pattern: int = 2) -> Path:
    """A tiny Hugging Face Gemma 3 (tiny.make_family_model "gemma3") as llama.cpp's converter
    writes it (conversion/gemma.py): gguf's own tensor name map, 1 + w for every norm, no Q/K
    permutation; the window pattern and the sliding layers' rope base as the keys llama.cpp's
    loader reads (its converter leaves them to the loader's defaults, 6 and 10000)."""
    import gguf

    cfg = json.loads((folder / "config.json").read_text())
    n = cfg["num_hidden_layers"]
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.GEMMA3, n)
    w = gguf.GGUFWriter(str(out), "gemma3")
    w.add_block_count(n)
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_key_length(cfg["head_dim"])
    w.add_value_length(cfg["head_dim"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_float32("gemma3.rope.freq_base_swa", cfg["rope_local_base_freq"])
    if cfg.get("rope_scaling"):
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(cfg["rope_scaling"]["factor"])
    w.add_sliding_window(cfg["sliding_window"])
    w.add_uint32("gemma3.attention.sliding_window_pattern", pattern)
    add_spm_vocabulary(w, cfg["vocab_size"])
    for name, t in _hf_tensors(folder).items():
        if name.endswith("norm.weight"):
            t = t + np.float32(1.0)
        g = names.get_name(name, try_suffixes=(".weight", ".bias"))
        w.add_tensor(g, np.ascontiguousarray(t, dtype=np.float32))
    _write(w)
    return out


def write_vocabulary_gguf(out: Path, size: int = 300, **overrides) -> Path:
    """A GGUF with the SentencePiece vocabulary only (no tensors): enough for the tokenizer."""
    import gguf

    w = gguf.GGUFWriter(str(out), "gemma3")
    add_spm_vocabulary(w, size)
    for key, value in overrides.items():
        w.add_bool(key, value)
    _write(w)
    return out
