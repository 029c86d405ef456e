"""The registry of known draft/target pairs (`models/registry.json`)."""
from __future__ import annotations

import json
from pathlib import Path

from .errors import ExportError

REPO_ROOT = Path(__file__).resolve().parent.parent
REGISTRY = REPO_ROOT / "models" / "registry.json"
CACHE = REPO_ROOT / ".cache"


def load_registry(path: Path = REGISTRY) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def pair_entry(name: str, path: Path = REGISTRY) -> dict:
    reg = load_registry(path)
    if name not in reg:
        raise ExportError(f"unknown pair {name!r}; known pairs: {', '.join(sorted(reg))}")
    return reg[name]
