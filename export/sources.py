"""Resolve a model source (Hugging Face id, local Hugging Face folder, GGUF file) to a local
Hugging Face folder (config.json, weights, tokenizer) that the graph builder reads.

A GGUF file is read directly (gguf_source.py): its folder is a *light* one in the cache
(config.json and tokenizer files from the GGUF's metadata, a pointer to the file; the weights
are dequantized from the GGUF tensor by tensor), no torch involved. Only a GGUF the direct
reader does not map (another architecture, a SentencePiece vocabulary) is converted the old
way, once, with transformers (dequantized to fp32 safetensors) into a cache folder keyed by the
file's path, size and mtime; the conversion is written to a temporary folder and renamed when
complete, so an interrupted conversion is redone, never half-reused.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from edge_ssd.progress import stage

from .errors import ExportError
from .registry import CACHE


GGUF_MAGIC = b"GGUF"


class SourceError(ExportError):
    """A source that cannot be read: missing, not a model folder, not a GGUF file, bad weights."""


def _gguf_cache_dir(gguf: Path, cache: Path) -> Path:
    st = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache / "hf" / f"{gguf.stem}-{key}"


def _check_gguf_magic(gguf: Path) -> None:
    """Refuse a file that is not GGUF before transformers tries it (its error names no file)."""
    try:
        with open(gguf, "rb") as f:
            magic = f.read(4)
    except OSError as e:
        raise SourceError(f"{gguf}: cannot be read: {e.strerror}") from e
    if magic != GGUF_MAGIC:
        raise SourceError(f"{gguf}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")


def convert_gguf(gguf: Path, cache: Path = CACHE) -> Path:
    """Dequantize a GGUF file into a cached Hugging Face folder (fp32 safetensors + tokenizer)."""
    _check_gguf_magic(gguf)
    out = _gguf_cache_dir(gguf, cache)
    if (out / "config.json").exists():
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    with stage(f"convert {gguf.name} (GGUF -> Hugging Face, fp32)"):
        try:
            tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(gguf.parent), gguf_file=gguf.name, torch_dtype=torch.float32, low_cpu_mem_usage=True
            )
        except Exception as e:  # gguf and transformers raise many types for a damaged or unknown file
            raise SourceError(f"{gguf}: transformers could not read this GGUF file: {e}") from e
        model.save_pretrained(str(tmp), safe_serialization=True)
        tok.save_pretrained(str(tmp))
        del model
    os.replace(tmp, out)
    return out


def _gguf_folder(gguf: Path, cache: Path) -> Path:
    """The direct reader's light folder; the transformers conversion for what it does not map."""
    from .gguf_source import UnsupportedGGUF, light_folder  # it imports this module

    _check_gguf_magic(gguf)
    try:
        return light_folder(gguf, cache)
    except UnsupportedGGUF as e:
        print(f"    {e}: converting it with transformers instead (needs torch, fp32 in memory)")
        return convert_gguf(gguf, cache)


def _looks_local(src: str) -> bool:
    """A path, not a hub id: hub ids are NAME or OWNER/NAME, never relative or with more parts."""
    return (src.startswith((".", "/", "~")) or "\\" in src or src.count("/") > 1
            or Path(src).suffix.lower() in (".gguf", ".safetensors", ".bin"))


def resolve_source(src: str, cache: Path = CACHE) -> Path:
    """Return a local Hugging Face folder for `src`, converting or downloading as needed."""
    path = Path(src).expanduser()
    if path.is_file():
        if path.suffix.lower() != ".gguf":
            raise SourceError(f"{src}: a model file must be a .gguf file")
        return _gguf_folder(path, cache)
    if path.is_dir():
        if not (path / "config.json").exists():
            raise SourceError(f"{src}: folder has no config.json (not a Hugging Face model folder)")
        return path
    if _looks_local(src):
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
        raise SourceError(f"{src}: no such file or folder, and as a Hugging Face id it could not be "
                          f"downloaded: {e}") from e
