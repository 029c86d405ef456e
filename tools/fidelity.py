"""Teacher-forced top-1 agreement and KL divergence of an existing bundle's models against their
fp32 source, as the export's validation computes them (export/validate.py `fidelity`, same prompts).

    python tools/fidelity.py --bundle models/qwen2.5-coder-0.5b-1.5b [--role target]
        [--source GGUF_OR_FOLDER] [--cache .cache]

The source defaults to the one the bundle's provenance names; --source points elsewhere (the
same file moved). Bundles exported before validation reported KL get the figure this way.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from edge_ssd.bundle import load_bundle  # noqa: E402
from edge_ssd.model import OnnxLM  # noqa: E402
from edge_ssd_export.pipeline import _arch_of  # noqa: E402
from edge_ssd_export.registry import CACHE  # noqa: E402
from edge_ssd_export.sources import resolve_source  # noqa: E402
from edge_ssd_export.tokenizer_meta import load_tokenizer  # noqa: E402
from edge_ssd_export.validate import PROMPTS, choose_reference, fidelity  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", type=Path, required=True)
    ap.add_argument("--role", choices=["target", "draft"], action="append")
    ap.add_argument("--source", help="the model's source (default: the bundle's provenance)")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    b = load_bundle(args.bundle)
    tok = load_tokenizer(b.path / "tokenizer.json")
    prompts = [tok.encode(p, add_special_tokens=False).ids for p in PROMPTS]
    out = {}
    for role in args.role or ["target", "draft"]:
        entry = b.target if role == "target" else b.draft
        if entry is None:
            continue
        hf = resolve_source(args.source or b.manifest["provenance"]["sources"][role], args.cache)
        reference, name = choose_reference(hf, _arch_of(hf))
        expected = reference(prompts)  # before the session: the two are never both in memory
        out[role] = {"reference": name, **fidelity(OnnxLM(entry, threads=args.threads, max_context=512),
                                                   prompts, expected)}
        print(f"{role}: {json.dumps(out[role])}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
