"""Type checks shared by every place that validates user input (request, sampling, server)."""
from __future__ import annotations

import math
from typing import Any

from .errors import RequestError


def is_int(v: Any) -> bool:
    """An integer that is not a bool: JSON `true` must not pass as 1."""
    return isinstance(v, int) and not isinstance(v, bool)


def is_number(v: Any) -> bool:
    """A finite int or float that is not a bool."""
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def check_text(value: Any, param: str, what: str = "") -> str:
    """A str that can be encoded as UTF-8 (no lone surrogates such as "\\ud800", which JSON and
    Python strings can carry but no tokenizer can encode)."""
    label = what or param
    if not isinstance(value, str):
        raise RequestError(f"{label} must be a string, got {type(value).__name__}", param=param)
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise RequestError(f"{label} is not valid Unicode text ({e.reason} at character {e.start})",
                           param=param) from None
    return value
