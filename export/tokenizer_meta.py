"""Collect what the runtime needs to know about a tokenizer from a Hugging Face folder."""
from __future__ import annotations

import json
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


def ensure_tokenizer_json(hf_dir: Path) -> Path:
    """Return hf_dir/tokenizer.json, producing it from a slow tokenizer with transformers if needed."""
    tj = hf_dir / "tokenizer.json"
    if tj.exists():
        return tj
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(str(hf_dir), use_fast=True)
    except Exception as e:  # transformers raises many types for a missing or unreadable tokenizer
        raise SourceError(f"{hf_dir}: no tokenizer.json, and transformers could not build one ({e})") from e
    tok.backend_tokenizer.save(str(tj))
    return tj


def _token_ids(value) -> list:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, list) else [value])]


def _token_text(value):
    return value.get("content") if isinstance(value, dict) else value


def tokenizer_meta(hf_dir: Path) -> dict:
    """EOS ids, BOS, special tokens and chat template for the manifest."""
    tok = load_tokenizer(ensure_tokenizer_json(hf_dir))
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
