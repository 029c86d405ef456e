"""Read Hugging Face weights one tensor at a time, as fp32 numpy (safetensors or torch .bin)."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import numpy as np


def open_weights(folder: Path) -> Callable[[str], np.ndarray]:
    """Return weight(name) -> fp32 array; safetensors are read lazily, tensor by tensor."""
    index = folder / "model.safetensors.index.json"
    files = sorted(folder.glob("*.safetensors"))
    if index.exists() or files:
        from safetensors import safe_open

        if index.exists():
            where = {k: folder / v for k, v in json.loads(index.read_text())["weight_map"].items()}
        else:
            where = {}
            for f in files:
                with safe_open(str(f), framework="pt") as st:
                    where.update({k: f for k in st.keys()})
        handles: dict = {}

        def weight(name: str) -> np.ndarray:
            if name not in where:
                raise KeyError(f"weight {name} not found in {folder}")
            f = where[name]
            if f not in handles:
                handles[f] = safe_open(str(f), framework="pt")
            return handles[f].get_tensor(name).float().numpy()

        return weight
    bins = sorted(folder.glob("pytorch_model*.bin"))
    if not bins:
        raise FileNotFoundError(f"{folder}: no *.safetensors or pytorch_model*.bin weights")
    import torch

    state: dict = {}
    for b in bins:
        state.update(torch.load(str(b), map_location="cpu", mmap=True, weights_only=True))

    def weight_bin(name: str) -> np.ndarray:
        if name not in state:
            raise KeyError(f"weight {name} not found in {folder}")
        return state[name].float().numpy()

    return weight_bin
