"""Charts from real benchmark JSON (docs/results/main4.json): valid PNGs of the expected size."""
from __future__ import annotations

import copy
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from edge_ssd import charts
from edge_ssd.errors import EdgeSSDError

ROOT = Path(__file__).resolve().parent.parent
MAIN4 = ROOT / "docs" / "results" / "main4.json"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_size(path: Path) -> tuple:
    """(width, height) from the IHDR chunk, after checking the signature: a PNG or a failure."""
    head = path.read_bytes()[:24]
    assert head[:8] == PNG_MAGIC and head[12:16] == b"IHDR", f"{path} is not a PNG"
    return struct.unpack(">II", head[16:24])


def assert_charts(paths: list) -> None:
    assert [png_size(p) for p in paths] == list(charts.SIZE_PX)
    for p in paths:
        assert 20_000 < p.stat().st_size < 300_000, (p, p.stat().st_size)  # drawn, and small enough for docs


@pytest.fixture(scope="module")
def main4() -> dict:
    return json.loads(MAIN4.read_text())


def test_render_real_benchmark(main4, tmp_path):
    pytest.importorskip("matplotlib")
    paths = charts.render(main4, tmp_path / "out" / "main4.png")
    assert paths == [tmp_path / "out" / "main4.png", tmp_path / "out" / "main4-drafts.png"]
    assert_charts(paths)


def test_peer_modes_drawn(main4, tmp_path):
    """A peer's runs (tools/peer_bench.py's shape: listed in `peer_modes`, no K per round)."""
    pytest.importorskip("matplotlib")
    bench = copy.deepcopy(main4)
    peer = "llama.cpp/plain"
    bench["modes"].append(peer)
    bench["peer_modes"] = [peer]
    for cat, row in bench["summary"].items():
        if cat != "qa":   # a category the peer did not run: no bar, no error
            row[peer] = {"tokens_per_s": 10.6}
    for r in bench["results"]:
        r["modes"][peer] = {"decode_s": 1.0, "decode_tokens": 10}
    assert_charts(charts.render(bench, tmp_path / "c.png", baseline="ar"))
    bench["modes"].append("llama.cpp/never-ran")
    with pytest.raises(EdgeSSDError, match="no figures for mode"):
        charts.render(bench, tmp_path / "d.png")


def test_position_acceptance_weights_by_rounds():
    runs = [{"per_position_acceptance": [1.0, 0.5], "k_chosen": [2, 2, 0, 1]},   # pos 1: 3 rounds, pos 2: 2
            {"per_position_acceptance": [0.0], "k_chosen": [1]}]
    assert charts.position_acceptance(runs) == [0.75, 0.5]
    assert charts.position_acceptance(runs, min_proposed=3) == [0.75, None]
    assert charts.k_shares(runs) == {0: 0.2, 1: 0.4, 2: 0.4}


def test_bad_input_and_missing_matplotlib(main4, tmp_path, monkeypatch):
    with pytest.raises(EdgeSSDError, match="not an `edge-ssd bench --json` result"):
        charts.render({"results": []}, tmp_path / "x.png")
    with pytest.raises(EdgeSSDError, match="baseline 'nope'"):
        charts.render(main4, tmp_path / "x.png", baseline="nope")
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)   # import fails as if not installed
    with pytest.raises(EdgeSSDError, match=r"pip install 'edge-ssd\[charts\]'"):
        charts.render(main4, tmp_path / "x.png")
    assert not list(tmp_path.iterdir())


def test_bench_report_chart(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "r.png"
    p = subprocess.run([sys.executable, str(ROOT / "tools" / "bench_report.py"), str(MAIN4), "--chart", str(out)],
                       capture_output=True, text=True, timeout=120, cwd=ROOT,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert p.returncode == 0, p.stderr
    assert "| **ALL** | 39 |" in p.stdout
    assert_charts(charts.chart_paths(out))


def test_bench_cli_draws_its_charts(fp32_bundle, tmp_path):
    pytest.importorskip("matplotlib")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p, "category": c}) for p, c in
                                 [("def add(a, b):", "coding"), ("hello world", "qa")]) + "\n")
    out = tmp_path / "bench.png"
    p = subprocess.run([sys.executable, "-m", "edge_ssd.cli", "bench", "--bundle", str(fp32_bundle.path),
                        "--prompts", str(prompts), "--modes", "ar,spec", "--max-new-tokens", "10",
                        "--threads", "1", "--chart", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    paths = list(charts.chart_paths(out))
    assert all(f"chart {path}" in p.stdout for path in paths)
    assert [png_size(path) for path in paths] == list(charts.SIZE_PX)
