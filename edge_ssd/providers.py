"""Execution-provider choice: what the user asked for, what is installed, what really runs."""
from __future__ import annotations

import logging

import onnxruntime as ort

from .errors import ProviderError

log = logging.getLogger("edge_ssd")

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider", "dml": "DmlExecutionProvider"}
AUTO_ORDER = ("cuda", "dml", "cpu")
DEVICE_OF = {"cpu": "cpu", "cuda": "cuda", "dml": "dml"}


def available() -> list:
    """Short names of the providers this onnxruntime build offers."""
    have = set(ort.get_available_providers())
    return [k for k, v in PROVIDERS.items() if v in have]


def resolve(asked: str, strict: bool = False) -> str:
    """Map cpu|cuda|dml|auto to an available provider's short name, falling back to CPU.

    With strict, a missing provider is an error instead of a warning and a CPU fallback.
    """
    asked = asked.lower()
    if asked == "auto":
        have = available()
        return next(p for p in AUTO_ORDER if p in have)
    if asked not in PROVIDERS:
        raise ProviderError(f"unknown provider {asked!r} (choose cpu, cuda, dml or auto)")
    if asked in available():
        return asked
    msg = f"execution provider {asked} is not available in this onnxruntime build (have: {', '.join(available())})"
    if strict:
        raise ProviderError(msg)
    log.warning("%s; falling back to cpu", msg)
    return "cpu"
