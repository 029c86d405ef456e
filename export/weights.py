"""Read weights one tensor at a time, as fp32 numpy: safetensors (numpy only), a GGUF behind a
light folder (gguf_source.py, numpy only), or torch .bin (the one reader that needs torch).

Opening checks what is cheap to check (weights present, every safetensors header readable and
covering its file), so the export refuses a folder without weights or with a truncated file
in its first seconds, naming the file; a .bin checkpoint is unpickled only when first read.
"""
from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from .sources import SourceError

Weights = Callable[[str], np.ndarray]


SAFETENSORS_DTYPES = {"F64": "<f8", "F32": "<f4", "F16": "<f2", "BF16": "<u2", "I64": "<i8", "I32": "<i4",
                      "I16": "<i2", "I8": "i1", "U8": "u1", "BOOL": "?"}


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bfloat16 (as uint16 bit patterns) -> float32: bf16 is the top half of an fp32, exactly."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


@dataclass(frozen=True)
class _Entry:
    file: Path
    dtype: str
    shape: tuple
    offset: int  # absolute, in the file
    n_bytes: int


def _safetensors_header(path: Path) -> dict:
    """name -> _Entry from a safetensors file's JSON header, checked to cover the file exactly.

    Read with numpy rather than safetensors' torch or numpy frameworks: no torch, and bf16
    (which numpy has no dtype for) is converted here by a bit shift.
    """
    def bad(why: str) -> SourceError:
        return SourceError(f"{path}: not a readable safetensors file ({why})")

    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8)) if size >= 8 else (size,)
            if n > size - 8:
                raise bad("header longer than the file")
            header = json.loads(f.read(n))
    except (OSError, ValueError, struct.error) as e:
        raise bad(str(e)) from e
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    entries, end = {}, 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            a, b = (int(x) for x in info["data_offsets"])
            entries[name] = _Entry(path, info["dtype"], tuple(int(d) for d in info["shape"]), 8 + n + a, b - a)
        except (KeyError, TypeError, ValueError) as e:
            raise bad(f"tensor {name}: {e!r}") from e
        if entries[name].dtype not in SAFETENSORS_DTYPES:
            raise bad(f"tensor {name} has dtype {entries[name].dtype}")
        end = max(end, b)
    if 8 + n + end != size:
        raise bad(f"tensors end at byte {8 + n + end}, the file has {size}")
    return entries


def _read_entry(e: _Entry) -> np.ndarray:
    """One tensor as fp32 (a file read, not a memory map: freed bytes leave the RSS)."""
    raw = np.fromfile(e.file, dtype=SAFETENSORS_DTYPES[e.dtype], count=e.n_bytes // np.dtype(
        SAFETENSORS_DTYPES[e.dtype]).itemsize, offset=e.offset)
    arr = bf16_to_f32(raw) if e.dtype == "BF16" else raw.astype(np.float32, copy=False)
    return arr.reshape(e.shape)


def _index(index: Path, folder: Path) -> dict:
    """tensor name -> file, from model.safetensors.index.json."""
    try:
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(f"{index}: not a readable safetensors index ({e!r})") from e


def _safetensors(folder: Path, index: Path, files: list) -> Weights:
    where = _index(index, folder) if index.exists() else {}
    entries = {k: e for f in sorted(set(where.values()) or files) for k, e in _safetensors_header(f).items()}

    def weight(name: str) -> np.ndarray:
        if name not in entries:
            raise SourceError(f"weight {name} not found in {folder}")
        return _read_entry(entries[name])

    return weight


def _torch_bin(folder: Path, bins: list) -> Weights:
    state: dict = {}

    def load() -> None:
        import pickle

        import torch

        for b in bins:
            try:
                state.update(torch.load(str(b), map_location="cpu", mmap=True, weights_only=True))
            except (RuntimeError, OSError, EOFError, ValueError, pickle.UnpicklingError) as e:
                raise SourceError(f"{b}: not a readable torch checkpoint ({e})") from e

    def weight(name: str) -> np.ndarray:
        if not state:
            load()
        if name not in state:
            raise SourceError(f"weight {name} not found in {folder}")
        return state[name].float().numpy()

    return weight


def open_weights(folder: Path) -> Weights:
    """Return weight(name) -> fp32 array; safetensors are read lazily, tensor by tensor.

    Raises SourceError for a folder without weights or with an unreadable safetensors file.
    """
    from .gguf_source import open_gguf_weights, pointed_gguf  # it imports this module

    gguf = pointed_gguf(folder)
    if gguf is not None:
        return open_gguf_weights(gguf)
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.exists() or files:
        return _safetensors(folder, index, files)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise SourceError(f"{folder}: no weights (no *.safetensors or pytorch_model*.bin files)")
    return _torch_bin(folder, bins)
