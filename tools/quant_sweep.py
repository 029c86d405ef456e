#!/usr/bin/env python3
"""Sweep quantization settings for one model: step cost, verify cost, one-row vs several-row
drift and top-1 agreement with the fp32 model. Graphs are built into the export cache.

    python tools/quant_sweep.py --source .cache/gguf/qwen2.5-coder-0.5b-1.5b-target.gguf \
        [--configs int4:32:4,int4:64:4,int4:128:4,int4:32:1,int8:32:4] [--threads 2] [--json OUT]

A config is WEIGHTS:BLOCK:ACCURACY_LEVEL[:LM_HEAD]. Agreement needs torch (the export extra).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step_costs import measure  # noqa: E402

from edge_ssd.bundle import ModelEntry  # noqa: E402
from edge_ssd_export.graph import Arch, GraphIO, QuantConfig  # noqa: E402
from edge_ssd_export.pipeline import build_graph_cached  # noqa: E402
from edge_ssd_export.registry import CACHE  # noqa: E402
from edge_ssd_export.sources import resolve_source  # noqa: E402
from edge_ssd_export.validate import PROMPTS, choose_reference, read_json, teacher_forced_argmax  # noqa: E402


def entry_for(folder: Path, arch: Arch, q: QuantConfig, max_ctx: int) -> ModelEntry:
    io = GraphIO()
    size = sum(p.stat().st_size for p in folder.iterdir())
    return ModelEntry("sweep", folder / "model.onnx", arch.architecture, arch.num_layers, arch.num_heads,
                      arch.num_kv_heads, arch.head_dim, arch.hidden_size, arch.vocab_size, q.act_dtype,
                      max_ctx, q.to_json(), {"inputs": io.inputs, "outputs": io.outputs}, size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--source", required=True)
    ap.add_argument("--configs", default="int4:32:4,int4:64:4,int4:128:4,int4:32:1,int8:32:4,int4:32:4:int8")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-agreement", action="store_true")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    hf = resolve_source(args.source, CACHE)
    arch = Arch.from_config(read_json(hf / "config.json"))
    ref = None if args.no_agreement else choose_reference(hf, arch)[0]
    from tokenizers import Tokenizer

    from edge_ssd.model import OnnxLM

    tok = Tokenizer.from_file(str(hf / "tokenizer.json"))
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    expected = ref(prompts) if ref else None
    rows = []
    for spec in args.configs.split(","):
        w, bs, acc, *head = spec.split(":")
        q = QuantConfig(weights=w, block_size=int(bs), accuracy_level=int(acc), lm_head=head[0] if head else None)
        folder = build_graph_cached(hf, arch, q, 4096, CACHE, "sweep")
        e = entry_for(folder, arch, q, 4096)
        m = measure(e, args.threads)
        if expected:
            lm = OnnxLM(e, threads=args.threads, max_context=512)
            m["top1_agreement"] = float(sum((teacher_forced_argmax(lm, p) == x).mean()
                                            for p, x in zip(prompts, expected)) / len(prompts))
        m["config"], m["size_mb"] = spec, e.weight_bytes / 1e6
        rows.append(m)
        print(f"{spec:<18} {m['size_mb']:7.0f} MB  decode@200 {m['decode_ms'][200]:6.1f} ms  "
              f"decode@1000 {m['decode_ms'][1000]:6.1f}  verify5 {m['rows_ms'][5]:6.1f} "
              f"({m['rows_ms'][5] / m['rows_ms'][1]:.2f}x)  verify9 {m['rows_ms'][9]:6.1f}  "
              f"drift {m['row_drift']:.3g}  top1 {m.get('top1_agreement', float('nan')):.3f}", flush=True)
    if args.json:
        args.json.write_text(json.dumps({"source": args.source, "threads": args.threads, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
