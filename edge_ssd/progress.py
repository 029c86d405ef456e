"""Progress reporting for long work (export stages, conversion, benchmarks).

Plain stderr output, no dependency: a stage line with elapsed time and peak RSS when it ends,
and an in-place bar for counted work when stderr is a terminal (one line per 10% otherwise,
so CI logs stay readable).
"""
from __future__ import annotations

import sys
import time
from contextlib import contextmanager
from typing import Iterator, Optional, TextIO

from .memory import fmt_bytes, peak_rss_bytes


class Bar:
    """A counted progress bar: `update(n)` adds n units; `close()` prints the final line."""

    def __init__(self, label: str, total: Optional[float], unit: str = "", stream: TextIO = sys.stderr):
        self.label, self.total, self.unit, self.stream = label, total, unit, stream
        self.done = 0.0
        self.t0 = time.perf_counter()
        self.tty = stream.isatty()
        self._last_decile = -1

    def _line(self) -> str:
        el = time.perf_counter() - self.t0
        if self.total:
            frac = min(1.0, self.done / self.total)
            bar = "#" * int(frac * 24)
            return f"{self.label} [{bar:<24}] {frac * 100:5.1f}% {self._amount()} {el:6.1f}s"
        return f"{self.label} {self._amount()} {el:6.1f}s"

    def _amount(self) -> str:
        if self.unit == "B":
            tot = f"/{fmt_bytes(self.total)}" if self.total else ""
            return f"{fmt_bytes(self.done)}{tot}"
        tot = f"/{self.total:g}" if self.total else ""
        return f"{self.done:g}{tot}{(' ' + self.unit) if self.unit else ''}"

    def update(self, n: float = 1) -> None:
        self.done += n
        if self.tty:
            self.stream.write("\r" + self._line())
            self.stream.flush()
        elif self.total:
            decile = int(10 * min(1.0, self.done / self.total))
            if decile != self._last_decile:
                self._last_decile = decile
                self.stream.write(self._line() + "\n")
                self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\r" + self._line() + "\n")
            self.stream.flush()


@contextmanager
def stage(name: str, stream: TextIO = sys.stderr) -> Iterator[None]:
    """Announce a long stage and report its wall time and the process's peak RSS when it ends."""
    t0 = time.perf_counter()
    stream.write(f"==> {name} ...\n")
    stream.flush()
    yield
    stream.write(
        f"    {name}: done in {time.perf_counter() - t0:.1f}s (peak RSS {fmt_bytes(peak_rss_bytes())})\n"
    )
    stream.flush()
