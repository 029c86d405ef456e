"""What this machine is, for the records that figures come with and for the cache of measured
step costs: the same bundle on another CPU (machines in one fleet differ: AVX2 or AVX-512,
VNNI or not) costs something else, so costs measured on one must not be reused on another."""
from __future__ import annotations

import os
import platform
import re
from pathlib import Path

SIMD = {"avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx_vnni", "amx_int8",   # x86
        "asimddp", "i8mm", "sve", "bf16"}                                           # Arm


def describe() -> dict:
    """CPU model (with family and model numbers where /proc/cpuinfo has them), the SIMD
    features int8 and int4 kernels use, cores, versions."""
    import onnxruntime

    flags, model = set(), platform.processor() or platform.machine()
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        info = ""
    found = re.search(r"model name\s*:\s*(.*)", info)
    if found:
        model = found.group(1).strip()
        family, number = re.search(r"cpu family\s*:\s*(\d+)", info), re.search(r"\nmodel\s*:\s*(\d+)", info)
        if family and number:
            model += f" (family {family.group(1)}, model {number.group(1)})"
    found = re.search(r"(?:flags|Features)\s*:\s*(.*)", info)
    if found:
        flags = set(found.group(1).split())
    return {"cpu": model, "cores": os.cpu_count(), "simd": sorted(flags & SIMD),
            "onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
