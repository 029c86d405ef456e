"""Check the direct GGUF reader against the transformers conversion of the same file.

    python tools/gguf_direct_check.py GGUF HF_FOLDER [--tokenizer TOKENIZER_JSON] [--cache DIR]

HF_FOLDER is what `sources.convert_gguf` made from GGUF (the old path). Prints, per tensor,
the max |difference| between the direct reader's weight(name) and the folder's safetensors
(both fp32), then the tokenizer agreement of the GGUF-built tokenizer.json with TOKENIZER_JSON
(default: the folder's) on tests/tokenizer_corpus.py's tricky strings. No torch is imported.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

from edge_ssd_export.gguf_source import light_folder  # noqa: E402
from edge_ssd_export.tokenizer_meta import load_tokenizer  # noqa: E402
from edge_ssd_export.weights import _safetensors_header, open_weights  # noqa: E402
from tokenizer_corpus import TRICKY, tokenizer_disagreements  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("gguf", type=Path)
    ap.add_argument("hf", type=Path)
    ap.add_argument("--tokenizer", type=Path)
    ap.add_argument("--cache", type=Path, default=Path(tempfile.mkdtemp(prefix="gguf-check-")))
    args = ap.parse_args()
    folder = light_folder(args.gguf, args.cache)
    ours, theirs = open_weights(folder), open_weights(args.hf)
    names = sorted({k for f in args.hf.glob("*.safetensors") for k in _safetensors_header(f)})
    worst = 0.0
    for name in names:
        a, b = ours(name), theirs(name)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        d = float(np.abs(a - b).max())
        worst = max(worst, d)
        if d:
            print(f"{name}: max |diff| {d:.3g}")
    print(f"weights: {len(names)} tensors, max |diff| over all {worst:.3g}")
    bad = tokenizer_disagreements(load_tokenizer(folder / "tokenizer.json"),
                                  load_tokenizer(args.tokenizer or args.hf / "tokenizer.json"), TRICKY)
    print(f"tokenizer: {len(TRICKY) - len(bad)}/{len(TRICKY)} tricky strings encode identically")
    for text, a, b in bad:
        print(f"  {text!r}: direct {a[:12]} vs reference {b[:12]}")
    print("torch imported:", "torch" in sys.modules)
    return 0


if __name__ == "__main__":
    sys.exit(main())
