"""The device scripts in tools/: fast checks only (no network, no root, no GPU).

tools/rootfs_check.sh and tools/build_exe.sh are run by hand (docs/devices.md has their
results); here their syntax and usage, and the GPU check's dry run on the CPU provider.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = ["tools/rootfs_check.sh", "tools/build_exe.sh", "tools/gpu_check.sh", "tools/quickstart.sh"]


@pytest.mark.parametrize("script", SCRIPTS)
def test_shell_scripts_parse_and_are_strict(script):
    path = REPO / script
    subprocess.run(["bash", "-n", str(path)], check=True)
    text = path.read_text()
    assert "set -euo pipefail" in text
    if shutil.which("shellcheck"):
        subprocess.run(["shellcheck", "-S", "error", str(path)], check=True)


@pytest.mark.parametrize("script", ["tools/rootfs_check.sh", "tools/build_exe.sh", "tools/gpu_check.sh"])
def test_usage_and_bad_arguments(script):
    p = subprocess.run(["bash", str(REPO / script), "--help"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 0 and "bash tools/" in p.stdout
    p = subprocess.run(["bash", str(REPO / script), "--no-such-flag"], capture_output=True, text=True, timeout=30)
    assert p.returncode == 2 and "unknown argument" in p.stderr


def test_exe_entry_refuses_export_and_dumps_modules(tmp_path):
    """The executable's entry point: no exporter, and the module list a test can check."""
    env = dict(os.environ, PYTHONPATH=str(REPO), EDGE_SSD_EXE_MODULES=str(tmp_path / "mods.txt"))
    p = subprocess.run([sys.executable, str(REPO / "tools/exe_entry.py"), "export", "--pair", "x"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 2 and "device runtime" in p.stderr
    p = subprocess.run([sys.executable, str(REPO / "tools/exe_entry.py"), "info"],
                       capture_output=True, text=True, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    mods = (tmp_path / "mods.txt").read_text().split()
    assert "edge_ssd.cli" in mods and "onnxruntime" in mods
    assert not [m for m in mods if m.split(".")[0] in ("torch", "onnx", "edge_ssd_export", "transformers")]


def test_gpu_check_dry_run_on_cpu(tmp_path):
    """The GPU script end to end on the CPU provider: tiny fp16 bundle, both placements, all modes."""
    pytest.importorskip("torch")
    out = tmp_path / "gpu.json"
    env = dict(os.environ, EDGE_SSD_CACHE=str(tmp_path / "cache"), TMPDIR=str(tmp_path))
    p = subprocess.run(["bash", str(REPO / "tools/gpu_check.sh"), "--dry-run", "--max-new-tokens", "16",
                        "--time-budget", "120", "--json", str(out)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert p.returncode == 0, p.stderr + p.stdout
    assert "step costs" in p.stdout and "identical to ar" in p.stdout
    res = json.loads(out.read_text())
    assert res["provider"] == "cpu" and len(res["placements"]) == 2
    for place in res["placements"]:
        assert place["providers"]["target"] == ["CPUExecutionProvider"]
        assert {"draft_step", "verify_1", "verify_5"} <= set(place["step_costs_ms"])
        assert place["prompts"] and set(place["summary"]) == {"ar", "spec", "parallel"}
        for rec in place["prompts"]:
            assert all(m["new_tokens"] > 0 for m in rec["modes"].values())
    assert not [q for q in tmp_path.iterdir() if q.name.startswith("edge-ssd-gpu.")]  # its temp dir is gone


def test_rows_invariant_tool_agrees_with_the_export_here(tmp_path):
    """tools/rows_invariant.py re-measures on this machine what the exporter recorded on it."""
    pytest.importorskip("torch")
    env = dict(os.environ, PYTHONPATH=str(REPO), EDGE_SSD_CACHE=str(tmp_path / "cache"))
    bundle = tmp_path / "tiny-int4"
    subprocess.run([sys.executable, str(REPO / "tools/tiny_bundle.py"), str(bundle), "--quant", "int4"],
                   check=True, capture_output=True, env=env, timeout=300)
    p = subprocess.run([sys.executable, str(REPO / "tools/rows_invariant.py"), "--bundle", str(bundle)],
                       capture_output=True, text=True, env=env, timeout=120)
    res = json.loads(p.stdout)
    assert set(res) == {"target", "draft"}
    for v in res.values():
        assert v["rows_invariant_here"] == v["recorded_at_export"]   # exported and checked on one machine
    assert p.returncode == 0
