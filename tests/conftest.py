"""Fixtures: tiny models exported to real bundles once per test session."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from tiny import make_model  # noqa: E402


@pytest.fixture(scope="session")
def tiny_sources(tmp_path_factory) -> dict:
    """HF folders: a Qwen2 target, a noisy copy as its draft, and a Llama model."""
    pytest.importorskip("torch")
    root = tmp_path_factory.mktemp("hf")
    target = make_model(root / "qwen2-target", "qwen2", seed=1)
    draft = make_model(root / "qwen2-draft", noise_from=target, noise=0.35, seed=2)
    llama = make_model(root / "llama", "llama", seed=3)
    return {"target": target, "draft": draft, "llama": llama}


def export_bundle(sources: dict, out: Path, quant: str = "fp32", draft: bool = True, target_key="target",
                  validate: bool = True, cache: Path = None):
    from edge_ssd_export.graph import QuantConfig
    from edge_ssd_export.pipeline import ExportPlan, ModelPlan, export_pair

    q = QuantConfig(weights=quant, block_size=32, accuracy_level=4 if quant in ("int4", "int8") else 0)
    plan = ExportPlan(
        target=ModelPlan("target", str(sources[target_key]), q),
        draft=ModelPlan("draft", str(sources["draft"]), q) if draft else None,
        out=out, validate=validate, cache=cache or out.parent / ".cache", force=True,
    )
    return export_pair(plan)


@pytest.fixture(scope="session")
def fp32_bundle(tiny_sources, tmp_path_factory):
    return export_bundle(tiny_sources, tmp_path_factory.mktemp("b") / "pair-fp32")


@pytest.fixture(scope="session")
def int4_bundle(tiny_sources, tmp_path_factory):
    return export_bundle(tiny_sources, tmp_path_factory.mktemp("b") / "pair-int4", quant="int4")
