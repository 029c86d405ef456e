"""This machine's memory as the runtime sees it: what is available, what this process holds.

One reading function (`read_memory`) that tests replace, the cgroup limit that systemd or a
container may set below the machine's memory, and the sizes users write ("1.5GiB", "60%").
"""
from __future__ import annotations

import re
import sys
from dataclasses import dataclass
from typing import Optional

import psutil

from .errors import MemoryBudgetError


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux ru_maxrss), falling back to current RSS."""
    try:
        import resource

        kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return int(kib) * 1024 if sys.platform != "darwin" else int(kib)
    except (ImportError, OSError):
        return psutil.Process().memory_info().rss


def release_free_heap() -> None:
    """Hand back to the system the heap memory that loading left free (ONNX Runtime's buffers
    from reading and prepacking the weights): measured 95 MB less resident for the default
    pair. glibc only; elsewhere nothing to do."""
    try:
        import ctypes

        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.1f} {unit}" if unit != "B" else f"{int(n)} B"
        n /= 1024
    return f"{n:.1f} TiB"


@dataclass(frozen=True)
class Reading:
    available: int   # system memory available to new allocations (psutil)
    rss: int         # this process's resident set


CGROUP_FILES = (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),                 # v2
                ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"))


def cgroup_headroom(files=CGROUP_FILES) -> Optional[int]:
    """Bytes left under this process's cgroup memory limit (systemd MemoryMax, docker -m), if any."""
    for limit_file, usage_file in files:
        try:
            with open(limit_file) as f:
                limit = f.read().strip()
            with open(usage_file) as f:
                usage = int(f.read().strip())
        except (OSError, ValueError):
            continue
        if limit.isdigit() and int(limit) < (1 << 60):  # "max" or a huge number: no limit
            return max(0, int(limit) - usage)
    return None


def read_memory() -> Reading:
    """Available memory is the smaller of the system's and the cgroup limit's headroom."""
    available = psutil.virtual_memory().available
    headroom = cgroup_headroom()
    if headroom is not None:
        available = min(available, headroom)
    return Reading(available, psutil.Process().memory_info().rss)


def parse_size(text: "str | int | None", available: int) -> Optional[int]:
    """'1.5GiB', '800MB', '2G', '60%' (of available memory), or bytes -> bytes."""
    if text is None or isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(%|[KMGT]i?B?|B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise MemoryBudgetError(f"cannot read memory size {text!r} (try 1.5GiB, 800MB or 60%)")
    value, unit = float(m.group(1)), (m.group(2) or "B").upper()
    if unit == "%":
        if not 0 < value <= 100:
            raise MemoryBudgetError(f"memory budget share must be in (0, 100]%, got {text!r}")
        return int(available * value / 100)
    power = "BKMGT".index(unit[0])
    base = 1024 if "I" in unit or len(unit) == 1 else 1000
    return int(value * base ** power)
