"""Huge pages for the weights: when the command re-executes itself with glibc's setting, and
that it really does (a subprocess), keeping the user's own tunables and honouring the opt-out."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from edge_ssd.hugepages import MIN_AVAILABLE, OPT_OUT, TUNABLE, glibc_version, hugepage_env, thp_mode

NEW = (2, 36)
PLENTY = 16 << 30


@pytest.mark.parametrize("environ, mode, glibc, tunables, available", [
    ({}, "madvise", NEW, TUNABLE, PLENTY),                                                # the common case
    ({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"}, "madvise", NEW,
     "glibc.malloc.trim_threshold=1:" + TUNABLE, PLENTY),                                 # theirs kept
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", NEW, None, PLENTY),         # their choice stands
    ({"GLIBC_TUNABLES": TUNABLE}, "madvise", NEW, None, PLENTY),                          # already re-executed
    ({OPT_OUT: "0"}, "madvise", NEW, None, PLENTY),                                       # opted out
    ({}, "always", NEW, None, PLENTY),                                                    # THP for all memory already
    ({}, "never", NEW, None, PLENTY),                                                     # no THP at all
    ({}, "", NEW, None, PLENTY),                                                          # not Linux
    ({}, "madvise", (2, 31), None, PLENTY),                                               # glibc without the tunable
    ({}, "madvise", None, None, PLENTY),                                                  # musl, or no libc found
    ({}, "madvise", NEW, None, 2 << 30),                                                  # memory is short
    ({OPT_OUT: "1"}, "madvise", NEW, TUNABLE, 2 << 30),                                   # ... asked for anyway
])
def test_when_to_reexecute(environ, mode, glibc, tunables, available):
    env = hugepage_env(environ, mode, glibc, available)
    assert (env["GLIBC_TUNABLES"] if env else None) == tunables
    if env:
        assert {k: v for k, v in env.items() if k != "GLIBC_TUNABLES"} == \
            {k: v for k, v in environ.items() if k != "GLIBC_TUNABLES"}


def test_thp_mode_reads_the_bracketed_word(tmp_path):
    f = tmp_path / "enabled"
    f.write_text("always [madvise] never\n")
    assert thp_mode(f) == "madvise"
    assert thp_mode(tmp_path / "missing") == ""


CAN = thp_mode() == "madvise" and (glibc_version() or (0,)) >= (2, 35) and \
    __import__("psutil").virtual_memory().available >= MIN_AVAILABLE


def _info(extra_env: dict) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", OPT_OUT)}
    out = subprocess.run([sys.executable, "-c", "import sys; from edge_ssd.cli import main; sys.exit(main())",
                          "info"], env={**env, **extra_env}, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


@pytest.mark.skipif(not CAN, reason="needs Linux THP in madvise mode and glibc >= 2.35")
def test_the_command_reexecutes_with_huge_pages():
    assert _info({})["glibc_tunables"] == TUNABLE
    assert _info({"GLIBC_TUNABLES": "glibc.malloc.trim_threshold=1"})["glibc_tunables"] == \
        "glibc.malloc.trim_threshold=1:" + TUNABLE
    assert _info({OPT_OUT: "0"})["glibc_tunables"] == ""


def test_a_call_with_its_own_argv_runs_in_this_process(capsys, monkeypatch):
    from edge_ssd import cli

    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.setattr(os, "execve", lambda *a: pytest.fail("main(argv) must not replace the caller's process"))
    assert cli.main(["info"]) == 0
    assert json.loads(capsys.readouterr().out)["glibc_tunables"] == ""
