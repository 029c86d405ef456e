"""The models' weights on transparent huge pages (Linux with glibc): a decode step streams every
weight once, and on 4 KiB pages that is a TLB miss per 4 KiB (a two-level page walk in a VM).

ONNX Runtime holds the weights in memory from malloc, and where the kernel gives huge pages
only on request (`transparent_hugepage/enabled` = madvise, the common default) glibc requests
them only when the process starts with `GLIBC_TUNABLES=glibc.malloc.hugetlb=1`: tunables are
read once, at startup. So the command line re-executes itself with that setting before it
loads a model (`reexec_with_hugepages`); an embedding service sets it in its own environment
(README, "Python"). Measured on the 2-core AVX-512 machine (docs/benchmarks.md, "Huge pages
for the weights"): one-row steps 10-15% faster (target 35.4 -> 30.1 ms, draft 17.0 -> 15.0),
~200 MB more resident. llama.cpp gets the same from the page cache by mapping its GGUF file.
"""
from __future__ import annotations

import ctypes
import os
import platform
import re
import sys
from pathlib import Path
from typing import Mapping, Optional

TUNABLE = "glibc.malloc.hugetlb=1"
OPT_OUT = "EDGE_SSD_HUGEPAGES"        # "0": the system's default pages; "1": huge pages whatever is free
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
MIN_GLIBC = (2, 35)                   # the first glibc with glibc.malloc.hugetlb
# Below this much available memory the command stays on small pages: there the ~15% more
# resident memory (measured: +200 MB on 1.4 GB for the default pair) weighs more than ~10% speed.
# EDGE_SSD_HUGEPAGES=1 asks for huge pages anyway.
MIN_AVAILABLE = 4 << 30
MADV_NOHUGEPAGE = 15                  # linux/mman.h
HUGE_PAGE = 2 << 20


def thp_mode(setting: Path = THP_SETTING) -> str:
    """The kernel's transparent huge page mode: always, madvise, never, or '' (not Linux)."""
    try:
        m = re.search(r"\[(\w+)\]", setting.read_text())
    except OSError:
        return ""
    return m.group(1) if m else ""


def glibc_version() -> Optional[tuple]:
    lib, version = platform.libc_ver()
    if lib != "glibc" or not version:
        return None
    try:
        return tuple(int(x) for x in version.split(".")[:2])
    except ValueError:
        return None


def hugepage_env(environ: Mapping[str, str], mode: str, glibc: Optional[tuple],
                 available: int) -> Optional[dict]:
    """The environment to re-execute with, or None when that would change nothing (THP off or
    already on for all memory, no glibc that knows the tunable, already set), when opted out,
    or when memory is short: huge pages keep ~200 MB more resident for the default pair."""
    if mode != "madvise" or glibc is None or glibc < MIN_GLIBC or environ.get(OPT_OUT) == "0":
        return None
    if available < MIN_AVAILABLE and environ.get(OPT_OUT) != "1":
        return None
    tunables = environ.get("GLIBC_TUNABLES", "")
    if "glibc.malloc.hugetlb=" in tunables:
        return None  # the user's own choice stands
    env = dict(environ)
    env["GLIBC_TUNABLES"] = f"{tunables}:{TUNABLE}" if tunables else TUNABLE
    return env


def reexec_with_hugepages() -> None:
    """Replace this process by the same command with huge pages requested, when that helps.
    Call it before loading anything heavy; it returns only when no re-execution is needed (or
    in a frozen executable, whose restart would unpack it again)."""
    if getattr(sys, "frozen", False) or not getattr(sys, "orig_argv", None):
        return
    import psutil

    env = hugepage_env(os.environ, thp_mode(), glibc_version(), psutil.virtual_memory().available)
    if env is None:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    try:
        os.execve(sys.executable, sys.orig_argv, env)
    except OSError:
        return  # keep running as we are: huge pages are a speed-up, not a requirement


def huge_page_bytes() -> int:
    """This process's memory on transparent huge pages (AnonHugePages), 0 where unknown."""
    try:
        m = re.search(r"AnonHugePages:\s+(\d+) kB", Path("/proc/self/smaps_rollup").read_text())
    except OSError:
        return 0
    return int(m.group(1)) * 1024 if m else 0


def keep_small_pages(address: int, size: int) -> bool:
    """Leave a buffer on 4 KiB pages: a KV cache is written a position at a time, and on huge
    pages its first token would make 2 MiB of every layer's buffer resident at once (measured:
    +160 MB for the default pair's 4,096-token caches). Whole huge pages inside the buffer only;
    False where the call is unavailable (the buffer stays as it is)."""
    lo = -(-address // HUGE_PAGE) * HUGE_PAGE
    hi = (address + size) // HUGE_PAGE * HUGE_PAGE
    if hi <= lo or not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.madvise(ctypes.c_void_p(lo), ctypes.c_size_t(hi - lo), MADV_NOHUGEPAGE) == 0
    except (OSError, AttributeError):
        return False
