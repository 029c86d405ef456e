"""The memory governor: every branch driven by injected psutil readings, plus one real budget."""
from __future__ import annotations

import subprocess
import sys

import pytest

from edge_ssd.api import Engine
from edge_ssd.errors import MemoryBudgetError
from edge_ssd.governor import Governor
from edge_ssd.memory import Reading, parse_size

GiB = 1 << 30
MiB = 1 << 20


def fixed(available, rss=100 * MiB):
    return lambda: Reading(available, rss)


def test_parse_size():
    assert parse_size("1.5GiB", 0) == int(1.5 * GiB)
    assert parse_size("800MB", 0) == 800_000_000
    assert parse_size("60%", 10 * GiB) == 6 * GiB
    assert parse_size("2G", 0) == 2 * GiB
    for bad in ("lots", "0%", "150%", "-1GB"):
        with pytest.raises(MemoryBudgetError):
            parse_size(bad, GiB)


WEIGHTS = {"target": 1500 * MiB, "draft": 600 * MiB}
KV = {"target": 57 * 1024, "draft": 24 * 1024}


@pytest.mark.parametrize("budget,slots,context,note", [
    ("3.7GiB", 4, 4096, ""),                                   # 4 caches of 4096 tokens fit
    ("3.0GiB", 2, 4096, "4 slots of 4096 tokens do not fit"),  # halved until they fit whole
    ("2.4GiB", 1, None, "only one request at a time"),         # one slot, and a shorter context
])
def test_plan_gives_up_slots_before_context(budget, slots, context, note):
    p = Governor(budget, fixed(16 * GiB)).plan(WEIGHTS, KV, 151936, 4096, 8, 32768, slots=4)
    assert p.slots == slots and p.use_draft and note in p.note
    assert p.max_context == context if context else 256 <= p.max_context < 4096
    assert p.to_json()["slots"] == slots


def test_plan_fits_caps_drops_and_refuses():
    g = Governor("8GiB", fixed(16 * GiB))
    p = g.plan(WEIGHTS, KV, 151936, 4096, 8, 32768)
    assert (p.max_context, p.use_draft, p.k_max) == (4096, True, 8)
    p = Governor("2.3GiB", fixed(16 * GiB)).plan(WEIGHTS, KV, 151936, 32768, 8, 32768)  # cap the context
    assert 256 <= p.max_context < 32768 and p.use_draft
    p = Governor("1.7GiB", fixed(16 * GiB)).plan(WEIGHTS, KV, 151936, 4096, 8, 32768)  # only the target fits
    assert not p.use_draft and p.k_max == 0 and "draft does not fit" in p.note
    with pytest.raises(MemoryBudgetError, match="smaller quantization"):
        Governor("1GiB", fixed(16 * GiB)).plan(WEIGHTS, KV, 151936, 4096, 8, 32768, "int8")
    with pytest.raises(MemoryBudgetError, match="shorter --max-context") as e:
        Governor("1GiB", fixed(16 * GiB)).plan(WEIGHTS, KV, 151936, 4096, 8, 32768, "int4")
    assert "quantization" not in str(e.value)


def test_cgroup_limit_is_seen(tmp_path):
    from edge_ssd.memory import cgroup_headroom

    (tmp_path / "max").write_text("2147483648\n")
    (tmp_path / "cur").write_text("536870912\n")
    (tmp_path / "nolimit").write_text("max\n")
    assert cgroup_headroom([(str(tmp_path / "max"), str(tmp_path / "cur"))]) == 1536 * MiB
    assert cgroup_headroom([(str(tmp_path / "nolimit"), str(tmp_path / "cur"))]) is None
    assert cgroup_headroom([(str(tmp_path / "missing"), str(tmp_path / "cur"))]) is None


def test_default_budget_is_a_share_of_available():
    g = Governor(None, fixed(10 * GiB, rss=0))
    assert g.budget == 8 * GiB


def test_check_branches():
    readings = iter([Reading(8 * GiB, GiB), Reading(100 * MiB, GiB), Reading(100 * MiB, GiB),
                     Reading(20 * MiB, GiB), Reading(20 * MiB, 5 * GiB), Reading(100 * MiB, GiB)])
    g = Governor("4GiB", lambda: Reading(8 * GiB, GiB), margin=64 * MiB)
    g.reader = lambda: next(readings)
    assert g.check(8, True) == "ok"
    assert g.check(8, True) == "lower_k" and g.k_cap == 4      # low available memory: halve K
    assert g.check(1, True) == "drop_draft"                     # K cannot go lower: drop the draft
    assert g.check(4, True) == "drop_draft"                     # another running request drops it too
    g.draft_dropped = False                                     # (the engine took the draft back)
    assert g.check(4, True) == "drop_draft"                     # critical: straight to dropping
    assert g.check(0, False) == "abort"                         # over budget with no draft left
    assert g.check(0, False) == "ok"                            # low but not critical, not over budget
    assert [e["action"] for e in g.events] == ["lower_k", "drop_draft", "drop_draft", "abort"]


class Script:
    """Plenty of memory while loading; then pressure after `calm` readings of generation."""

    def __init__(self, calm: int, pressure: Reading):
        self.n, self.calm, self.pressure = 0, calm, pressure

    def __call__(self) -> Reading:
        self.n += 1
        return Reading(8 * GiB, 200 * MiB) if self.n <= self.calm else self.pressure


def test_pressure_lowers_k_then_drops_draft_losslessly(fp32_bundle):
    ref = Engine.load(fp32_bundle.path, provider="cpu", threads=1).generate("def add", raw=True, mode="ar",
                                                                            max_new_tokens=40)
    script = Script(calm=8, pressure=Reading(100 * MiB, 200 * MiB))
    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1, memory_reader=script, memory_budget="4GiB")
    assert e.draft is not None and e.plan.use_draft
    r = e.generate("def add", raw=True, mode="spec", drafter="model", k=4, max_new_tokens=40)
    assert r.token_ids == ref.token_ids and not r.error            # lossless through it all
    ev = r.stats["memory_events"]
    assert ev[0] == "lower_k" and "drop_draft" in ev and set(ev[: ev.index("drop_draft")]) == {"lower_k"}
    assert e.draft is None                                          # the draft was freed
    assert e.generate("def add", raw=True, mode="spec", max_new_tokens=5).stats["new_tokens"] == 5


def test_critical_pressure_ends_request_with_text_so_far(fp32_bundle):
    script = Script(calm=7, pressure=Reading(10 * MiB, 5 * GiB))
    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1, memory_reader=script, memory_budget="4GiB",
                    load_draft=False)
    r = e.generate("def add", raw=True, mode="ar", max_new_tokens=40)
    assert r.finish_reason == "memory" and "memory pressure" in r.error
    assert 0 < len(r.token_ids) < 40 and r.text


def test_budget_too_small_refuses_at_load_and_in_a_real_process(fp32_bundle):
    with pytest.raises(MemoryBudgetError):
        Engine.load(fp32_bundle.path, provider="cpu", memory_budget="1MB")
    p = subprocess.run([sys.executable, "-m", "edge_ssd.cli", "generate", "--bundle", str(fp32_bundle.path),
                        "--prompt", "hello", "--memory-budget", "20MB"], capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" not in p.stderr
    assert "memory budget is" in p.stderr and "larger --memory-budget" in p.stderr


def test_plan_is_reported(fp32_bundle):
    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1, max_context=128)
    r = e.generate("def add", raw=True, max_new_tokens=4)
    assert r.stats["memory"]["max_context"] == 128 and r.stats["memory"]["use_draft"]
