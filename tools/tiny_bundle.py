#!/usr/bin/env python3
"""Export a tiny random pair bundle (the tests' Qwen2 target and its noisy draft, tests/tiny.py)
for smoke checks of a device build: seconds, no model hub, needs torch (workstation side).

    PYTHONPATH=$PWD python3 tools/tiny_bundle.py OUT_DIR [--quant fp32|fp16|int8|int4] [--no-validate]

Prints the bundle folder. An existing bundle at OUT_DIR is replaced (export is atomic).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))


def export_tiny(out: Path, quant: str = "fp32", validate: bool = True) -> Path:
    from tiny import make_model
    from edge_ssd_export.graph import QuantConfig
    from edge_ssd_export.pipeline import ExportPlan, ModelPlan, export_pair

    out = out.resolve()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="tiny-hf-") as tmp:
        root = Path(tmp)
        target = make_model(root / "qwen2-target", "qwen2", seed=1)       # as tests/conftest.py
        draft = make_model(root / "qwen2-draft", noise_from=target, noise=0.35, seed=2)
        q = QuantConfig(weights=quant, block_size=32, accuracy_level=4 if quant in ("int4", "int8") else 0)
        plan = ExportPlan(target=ModelPlan("target", str(target), q), draft=ModelPlan("draft", str(draft), q),
                          out=out, validate=validate, cache=root / ".cache", force=True)
        export_pair(plan)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out", type=Path)
    ap.add_argument("--quant", default="fp32", choices=["fp32", "fp16", "int8", "int4"])
    ap.add_argument("--no-validate", action="store_true")
    a = ap.parse_args()
    print(export_tiny(a.out, a.quant, validate=not a.no_validate))


if __name__ == "__main__":
    main()
