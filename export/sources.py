"""Resolve a model source (Hugging Face id, local Hugging Face folder, GGUF file) to a local
Hugging Face folder (config.json, weights, tokenizer) that the graph builder reads.

GGUF files are converted once with transformers (dequantized to fp32 safetensors) into a cache
folder keyed by the file's path, size and mtime; the conversion is written to a temporary folder
and renamed when complete, so an interrupted conversion is redone, never half-reused.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from edge_ssd.progress import stage

from .registry import CACHE


class SourceError(RuntimeError):
    pass


def _gguf_cache_dir(gguf: Path, cache: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache / "hf" / f"{gguf.stem}-{key}"


def convert_gguf(gguf: Path, cache: Path = CACHE) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face folder (fp32 safetensors + tokenizer)."""
    out = _gguf_cache_dir(gguf, cache)
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with stage(f"convert {gguf.name} (GGUF -> Hugging Face, fp32)"):
        tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(
            str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32, low_cpu_mem_usage=True
        )
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        del model
    os.replace(tmp, out)
    return out


def resolve_source(src: str, cache: Path = CACHE) -> Path:
    """Return a local Hugging Face folder for `src`, converting or downloading as needed."""
    path = Path(src).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"{src}: a model file must be a .gguf file")
        return convert_gguf(path, cache)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SourceError(f"{src}: folder has no config.json (not a Hugging Face model folder)")
        return path
    if path.suffix.lower() == ".gguf" or src.startswith((".", "/", "~")):
        raise SourceError(f"{src}: no such file or folder")
    try:
        from huggingface_hub import snapshot_download

        with stage(f"download {src} from the Hugging Face hub"):
            return Path(
                snapshot_download(
                    src,
                    allow_patterns=["*.json", "*.safetensors", "*.txt", "tokenizer*", "*.model"],
                )
            )
    except Exception as e:  # hub errors come in many types; the message is what matters
        raise SourceError(f"{src}: not a local path, and the hub download failed: {e}") from e
