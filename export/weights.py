"""Read Hugging Face weights one tensor at a time, as fp32 numpy (safetensors or torch .bin).

Opening checks what is cheap to check (weights present, every safetensors header readable and
covering its file), so the export refuses a folder without weights or with a truncated file
in its first seconds, naming the file; a .bin checkpoint is unpickled only when first read.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np

from .sources import SourceError

Weights = Callable[[str], np.ndarray]


def _safe_open(path: Path):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(str(path), framework="pt")
    except (SafetensorError, OSError) as e:
        raise SourceError(f"{path}: not a readable safetensors file ({e})") from e


def _index(index: Path, folder: Path) -> dict:
    """tensor name -> file, from model.safetensors.index.json."""
    try:
        return {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise SourceError(f"{index}: not a readable safetensors index ({e!r})") from e


def _safetensors(folder: Path, index: Path, files: list) -> Weights:
    where = _index(index, folder) if index.exists() else {}
    handles = {f: _safe_open(f) for f in sorted(set(where.values()) or files)}
    if not where:
        where = {k: f for f, h in handles.items() for k in h.keys()}

    def weight(name: str) -> np.ndarray:
        if name not in where:
            raise SourceError(f"weight {name} not found in {folder}")
        return handles[where[name]].get_tensor(name).float().numpy()

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
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.exists() or files:
        return _safetensors(folder, index, files)
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise SourceError(f"{folder}: no weights (no *.safetensors or pytorch_model*.bin files)")
    return _torch_bin(folder, bins)
