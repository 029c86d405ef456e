"""Files the CLI writes for the user: checked before the work starts, replaced only when done.

A results file is written beside its destination under a temporary name and renamed over it
at the end, so a crash or Ctrl-C never leaves the user's old file half overwritten, and the
destination is checked first (not a folder, not one of the inputs, its folder writable), so
an hour of generation is never lost to a bad path at the end.
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator, Sequence

from .errors import EdgeSSDError


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def check_output(path: Path, inputs: Sequence[Path] = (), flag: str = "--output") -> Path:
    """Refuse, with one clear line, an output that cannot be written or would destroy an input."""
    path = Path(path)
    if path.is_dir():
        raise EdgeSSDError(f"{flag} {path} is a folder; give a file path")
    for inp in inputs:
        if inp is not None and path.exists() and _same_file(path, Path(inp)):
            raise EdgeSSDError(f"{flag} {path} is the input file {inp}; write the results elsewhere")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise EdgeSSDError(f"{flag} {path}: folder {parent} does not exist")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise EdgeSSDError(f"{flag} {path}: folder {parent} is not writable")
    if path.exists() and not os.access(path, os.W_OK):
        raise EdgeSSDError(f"{flag} {path} exists and is not writable")
    return path


@contextmanager
def replace_when_done(path: Path) -> Iterator[IO[str]]:
    """A text file that becomes `path` when the block ends, with whatever was written (every
    line written is a finished result worth keeping, also when the block is interrupted)."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent or ".")
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~umask)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            yield f
        os.replace(tmp, path)
    except BaseException:
        with_results = os.path.getsize(tmp) > 0 if os.path.exists(tmp) else False
        if with_results:
            os.replace(tmp, path)
        elif os.path.exists(tmp):
            os.unlink(tmp)
        raise
