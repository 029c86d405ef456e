"""Collect what the runtime needs to know about a tokenizer from a Hugging Face folder."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

from .sources import SourceError
from .validate import read_json

# Tokens that end a turn or a document in the model families we export. They are added to the
# EOS set only when the tokenizer really has them as special tokens.
END_TOKENS = ("<|endoftext|>", "<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>", "<|end|>", "<end_of_turn>")


def load_tokenizer(path: Path):
    """A `tokenizers` Tokenizer; a file it cannot parse is a SourceError naming the file."""
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for any file it cannot parse
        raise SourceError(f"{path}: not a usable tokenizer file ({e})") from e


def ensure_tokenizer_json(hf_dir: Path, cache: Path) -> Path:
    """hf_dir/tokenizer.json, or one built from its slow tokenizer with transformers into the
    export cache: the source folder is the user's, so nothing is written there. The cache entry
    is keyed by the folder and its tokenizer files' sizes and times, so an edited source is
    built again."""
    tj = hf_dir / "tokenizer.json"
    if tj.exists():
        return tj
    stamp = [str(hf_dir.resolve())] + [f"{f.name}:{f.stat().st_size}:{f.stat().st_mtime_ns}"
                                      for f in sorted(hf_dir.glob("*")) if f.is_file() and "token" in f.name]
    out = cache / "tokenizers" / hashlib.sha256("\n".join(stamp).encode()).hexdigest()[:16] / "tokenizer.json"
    if out.exists():
        return out
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), use_fast=True)
    except Exception as e:  # transformers raises many types for a missing or unreadable tokenizer
        raise SourceError(f"{hf_dir}: no tokenizer.json, and transformers could not build one ({e})") from e
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    tok.backend_tokenizer.save(str(partial))
    os.replace(partial, out)  # a reader never sees half a file
    return out


def _token_ids(value) -> list:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_meta(hf_dir: Path, tokenizer_file: Path) -> dict:
    """EOS ids, BOS, special tokens and chat template for the manifest; tokenizer_file is the
    folder's tokenizer.json or the one ensure_tokenizer_json built for it."""
    tok = load_tokenizer(tokenizer_file)
    cfg = read_json(hf_dir / "tokenizer_config.json")
    gen = read_json(hf_dir / "generation_config.json")
    model_cfg = read_json(hf_dir / "config.json")
    specials = {t.content: i for i, t in tok.get_added_tokens_decoder().items() if t.special}
    specials = {k: v for k, v in sorted(specials.items(), key=lambda kv: kv[1])}
    eos = set(_token_ids(gen.get("eos_token_id")) + _token_ids(model_cfg.get("eos_token_id")))
    for key in ("eos_token",):
        text = _token_text(cfg.get(key))
        if text is not None and tok.token_to_id(text) is not None:
            eos.add(tok.token_to_id(text))
    eos.update(specials[t] for t in END_TOKENS if t in specials)
    template = cfg.get("chat_template")
    if template is None and (hf_dir / "chat_template.jinja").exists():
        template = (hf_dir / "chat_template.jinja").read_text()
    if template is None and (hf_dir / "chat_template.json").exists():
        template = json.loads((hf_dir / "chat_template.json").read_text()).get("chat_template")
    bos_text = _token_text(cfg.get("bos_token"))
    return {
        "vocab_size": tok.get_vocab_size(with_added_tokens=True),
        "eos_ids": sorted(eos),
        "bos_token": bos_text,
        "add_bos": bool(cfg.get("add_bos_token", False)) and bos_text is not None,
        "special_tokens": specials,
        "chat_template": template,
    }
