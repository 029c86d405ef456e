"""Where a bundle is written: never over what is not a bundle, never a moment without one.

`--force` replaces a bundle, so the destination is checked before any work: it must not be (or
hold, or lie inside) a source or the cache, and an existing non-empty folder is replaced only
when it is a bundle (has pair.json) and --force was given. The bundle is built in a hidden
`.NAME.partial-PID` folder beside the destination (which also proves, before the long work,
that the destination's folder is writable), then swapped in: the old bundle renamed aside to
`.NAME.old-PID`, the new one renamed in, the old one deleted. An export that was killed leaves
its partial (or old) folder behind; the next export to the same destination removes partials
whose process is gone, and puts back an old bundle that a kill left aside.
"""
from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import psutil

from edge_ssd.bundle import MANIFEST

from .errors import ExportError

PARTIAL, OLD = "partial", "old"


class OutputError(ExportError):
    """The destination cannot or must not receive the bundle."""


def resolve_out(out: Path) -> Path:
    """The destination as an absolute path with symlinks resolved, so that comparisons with the
    sources compare real folders ("./m", "m/", a symlink to m are all m)."""
    try:
        return out.expanduser().resolve()
    except (OSError, RuntimeError) as e:  # a symlink loop, a name too long
        raise OutputError(f"--out {out} cannot be resolved: {e}") from e


def check_not_source(out: Path, protected: dict) -> None:
    """Refuse a destination that is, holds, or lies inside what the export reads (protected:
    description -> path, e.g. "the target source"): replacing it would delete that, and writing
    into it would change it."""
    for what, p in protected.items():
        p = p.resolve()
        if out == p:
            raise OutputError(f"--out {out} is {what}; replacing it would delete it: choose another --out")
        if p.is_relative_to(out):
            raise OutputError(f"--out {out} contains {what} ({p}); replacing it would delete it: "
                              "choose another --out")
        if out.is_relative_to(p):
            raise OutputError(f"--out {out} is inside {what} ({p}); choose a folder outside it")


def check_destination(out: Path, force: bool) -> None:
    """Refuse, before any work, a destination the export may not replace."""
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} exists and is not a folder")
    try:
        if not out.exists() or not any(out.iterdir()):
            return
    except OSError as e:
        raise OutputError(f"--out {out} cannot be read: {e.strerror}") from e
    if not (out / MANIFEST).is_file():
        raise OutputError(f"--out {out} is not empty and is not a bundle (it has no {MANIFEST}); the export "
                          "replaces only a bundle folder (with --force): choose a new or empty folder")
    if not force:
        raise OutputError(f"--out {out} already holds a bundle; pass --force to replace it")


def _sibling(out: Path, kind: str, pid: int) -> Path:
    return out.parent / f".{out.name}.{kind}-{pid}"


def _left_by_dead_export(out: Path) -> list:
    """(kind, path) of this destination's partial and old folders whose export is not running."""
    pattern = re.compile(rf"\.{re.escape(out.name)}\.({PARTIAL}|{OLD})-(\d+)")
    found = []
    for p in out.parent.iterdir():
        m = pattern.fullmatch(p.name)
        if m and p.is_dir() and not p.is_symlink():
            pid = int(m.group(2))
            if pid == os.getpid() or not psutil.pid_exists(pid):
                found.append((m.group(1), p))
    return found


def clean_stale(out: Path) -> None:
    """Delete what killed exports left beside `out`; an old bundle left aside when `out` is
    missing (killed between the two renames of a swap) is put back instead."""
    if not out.parent.is_dir():
        return
    try:
        for kind, p in _left_by_dead_export(out):
            if kind == OLD and not out.exists():
                os.replace(p, out)
                print(f"note: put back the bundle that an interrupted export had left in {p}", file=sys.stderr)
            else:
                shutil.rmtree(p, ignore_errors=True)
    except OSError as e:
        raise OutputError(f"cannot clean up beside --out {out}: {e.strerror} ({e.filename})") from e


def begin(out: Path) -> Path:
    """Create and return the partial folder the bundle is built in, beside `out`."""
    tmp = _sibling(out, PARTIAL, os.getpid())
    blocker = next((p for p in out.parents if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise OutputError(f"cannot write the bundle to {out}: {blocker} is a file, not a folder")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp.mkdir()
    except OSError as e:
        raise OutputError(f"cannot write the bundle to {out}: {e.strerror} ({e.filename})") from e
    return tmp


def commit(tmp: Path, out: Path) -> None:
    """Swap the finished bundle in. Between the two renames only, `out` is missing; a kill
    there leaves the old bundle in `.NAME.old-PID`, which the next export puts back."""
    if not out.exists():
        os.replace(tmp, out)
        return
    old = _sibling(out, OLD, os.getpid())
    os.replace(out, old)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(old, out)
        raise
    shutil.rmtree(old, ignore_errors=True)


def discard(tmp: Path) -> None:
    shutil.rmtree(tmp, ignore_errors=True)
