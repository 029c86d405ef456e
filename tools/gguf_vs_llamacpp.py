#!/usr/bin/env python3
"""A bundle exported from a GGUF against llama.cpp running that GGUF, and both against the GGUF
dequantized to fp32 (transformers' GGUF loader, torch; this tool only, never the export).

    ../shared/tools/llama-cpp-peer.sh build        # once
    python tools/gguf_vs_llamacpp.py --bundle /work/models/gemma-270m-bundle \\
        --gguf /work/models/gguf/gemma-3-270m-q4_k_m.gguf --limit 10 -n 64 \\
        --json docs/results/gemma3-270m-vs-llamacpp.json

Per prompt (the first turn of a Spec-Bench question, as raw text: both sides add the GGUF's BOS
and no chat template), llama.cpp's llama-completion decodes greedily; its prompt ids come from
--verbose-prompt, and its continuation text is encoded with the bundle's tokenizer (llama.cpp
prints text, not ids; `round_trip` says whether those ids decode back to exactly that text).
Then, on prompt + llama.cpp's continuation, teacher-forced:

* edge vs llama.cpp: positions where the bundle's argmax is llama.cpp's next token;
* edge vs fp32 and llama.cpp vs fp32: argmax agreement with the fp32 model, the mean
  KL(fp32 || edge) over the continuation positions and the largest |logit difference|;
* greedy: the bundle's own greedy continuation (n tokens) and its common prefix with llama.cpp's.

`--tokenizer-goldens OUT` instead writes llama.cpp's ids (llama-tokenize, no BOS, special tokens
parsed) for tests/tokenizer_corpus.py's strings, the fixture tests/test_gguf.py checks against.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from edge_ssd.bench import read_prompts  # noqa: E402
from edge_ssd.bundle import load_bundle  # noqa: E402
from edge_ssd.model import OnnxLM  # noqa: E402
from edge_ssd.text import Tokenizer  # noqa: E402
from edge_ssd_export.validate import kl_divergence, teacher_forced_logits  # noqa: E402
from peer_bench import default_bin_dir, prompt_file_text  # noqa: E402

_VERBOSE_TOKEN = re.compile(r"^\S+ I +(\d+) -> '", re.M)  # llama-completion --verbose-prompt lines
_END_OF_TEXT = " [end of text]\n"  # what llama-completion prints for an end-of-generation token
_TRAILER = "\n\n"  # and after every generation (tools/completion/completion.cpp)


def _env(bin_dir: Path) -> dict:
    return {**os.environ, "LD_LIBRARY_PATH": str(bin_dir)}


def llama_greedy(bin_dir: Path, gguf: Path, text: str, n: int, workdir: Path) -> tuple:
    """(prompt ids, continuation text) of llama-completion, greedy, one thread."""
    prompt = workdir / "prompt.txt"
    prompt.write_text(prompt_file_text(text), encoding="utf-8")
    cmd = [str(bin_dir / "llama-completion"), "-m", str(gguf), "-f", str(prompt), "-n", str(n), "--temp", "0",
           "-t", "1", "-c", "4096", "-no-cnv", "--no-display-prompt", "--verbose-prompt", "--no-warmup"]
    proc = subprocess.run(cmd, capture_output=True, env=_env(bin_dir), timeout=600)
    if proc.returncode:
        raise RuntimeError(f"llama-completion failed: {proc.stderr.decode(errors='replace')[-800:]}")
    log = proc.stdout.decode(errors="replace") + proc.stderr.decode(errors="replace")
    ids = [int(i) for i in _VERBOSE_TOKEN.findall(proc.stderr.decode(errors="replace"))]
    out = proc.stdout.decode("utf-8", errors="replace")
    if not out.endswith(_TRAILER):
        raise RuntimeError(f"llama-completion's output does not end as expected: {out[-200:]!r}")
    out = out[:-len(_TRAILER)]
    if out.endswith(_END_OF_TEXT):  # an end-of-generation token: not text
        out = out[:-len(_END_OF_TEXT)]
    if not ids:
        raise RuntimeError(f"no --verbose-prompt token list in llama-completion's log: {log[-800:]}")
    return ids, out


def llama_tokenize(bin_dir: Path, gguf: Path, text: str) -> list:
    """llama-tokenize's ids of `text` (no BOS, special tokens parsed, bytes as given)."""
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False, encoding="utf-8") as f:
        f.write(text)
    cmd = [str(bin_dir / "llama-tokenize"), "-m", str(gguf), "-f", f.name, "--ids", "--no-escape", "--no-bos",
           "--log-disable"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=_env(bin_dir), check=True).stdout
    os.unlink(f.name)
    return json.loads(out.strip().splitlines()[-1])


def edge_greedy(lm: OnnxLM, prompt: list, n: int) -> list:
    lm.reset()
    out, logits = [], lm.forward(prompt)
    for _ in range(n):
        out.append(int(logits[-1].argmax()))
        logits = lm.forward([out[-1]])
    lm.reset()
    return out


def fp32_model(gguf: Path):
    """The GGUF dequantized to fp32 by transformers (an independent reader of the same file)."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32,
                                                 attn_implementation="eager")
    model.eval()

    def logits(ids: list) -> np.ndarray:
        with torch.no_grad():
            return model(torch.tensor([ids])).logits[0].float().numpy()

    return logits


def common_prefix(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare_prompt(question: str, args, tok: Tokenizer, lm: OnnxLM, fp32, workdir: Path) -> dict:
    """One prompt: llama.cpp's greedy run, then the teacher-forced and greedy comparisons."""
    prompt, text = llama_greedy(args.bin_dir, args.gguf, question, args.n, workdir)
    cont = tok.encode(text, bos=False)
    seq = prompt + cont
    start = len(prompt) - 1  # logits row predicting the first continuation token
    edge = teacher_forced_logits(lm, seq)[start:len(seq) - 1]
    ref = fp32(seq)[start:len(seq) - 1]
    e_arg, r_arg, nxt = edge.argmax(-1), ref.argmax(-1), np.asarray(cont)
    kl = float(kl_divergence(ref, edge).mean())
    greedy = edge_greedy(lm, prompt, args.n)
    return {
        "prompt_tokens": len(prompt), "prompt_ids_equal": tok.encode(question) == prompt,
        "llama_tokens": len(cont), "round_trip": tok.decode(cont) == text,
        "edge_vs_llama": int((e_arg == nxt).sum()), "fp32_vs_llama": int((r_arg == nxt).sum()),
        "edge_vs_fp32": int((e_arg == r_arg).sum()), "kl_fp32_edge": kl,
        "max_abs_logit_diff": float(np.abs(edge - ref).max()),
        "greedy_prefix": common_prefix(greedy, cont), "greedy_text_equal": tok.decode(greedy) == text,
    }


def summarize(rows: list) -> dict:
    n = sum(r["llama_tokens"] for r in rows)
    return {"prompts": len(rows), "positions": n,
            **{k: sum(r[k] for r in rows) / n for k in ("edge_vs_llama", "fp32_vs_llama", "edge_vs_fp32")},
            "mean_kl_fp32_edge": float(np.mean([r["kl_fp32_edge"] for r in rows])),
            "max_abs_logit_diff": max(r["max_abs_logit_diff"] for r in rows),
            "greedy_prefix_median": float(np.median([r["greedy_prefix"] for r in rows])),
            "greedy_full_match": sum(r["greedy_prefix"] >= r["llama_tokens"] for r in rows),
            "prompt_ids_equal": sum(r["prompt_ids_equal"] for r in rows),
            "round_trip": sum(r["round_trip"] for r in rows)}


def write_goldens(args) -> int:
    from tokenizer_corpus import TRICKY

    goldens = {t: llama_tokenize(args.bin_dir, args.gguf, t) for t in TRICKY if t}
    args.tokenizer_goldens.write_text(json.dumps({"gguf": args.gguf.name, "ids": goldens}, ensure_ascii=False)
                                      + "\n", encoding="utf-8")
    print(f"{len(goldens)} strings -> {args.tokenizer_goldens}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gguf", type=Path, required=True)
    ap.add_argument("--bundle", type=Path)
    ap.add_argument("--prompts", type=Path, default=REPO.parent / "shared" / "bench" / "spec_bench_questions.jsonl")
    ap.add_argument("--limit", type=int, default=10, help="prompts: the first of each category, in file order")
    ap.add_argument("-n", type=int, default=64, help="new tokens per prompt")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bin-dir", type=Path, default=default_bin_dir())
    ap.add_argument("--json", type=Path)
    ap.add_argument("--tokenizer-goldens", type=Path, help="write llama-tokenize's ids of the tricky corpus here")
    return ap


def main(argv: Optional[list] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.tokenizer_goldens:
        return write_goldens(args)
    bundle = load_bundle(args.bundle)
    tok = Tokenizer(bundle.tokenizer_file, bundle.tokenizer)
    lm = OnnxLM(bundle.target, threads=args.threads, max_context=1024)
    fp32 = fp32_model(args.gguf)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for p in read_prompts(args.prompts, limit=1)[:args.limit]:  # the first question of each category
            r = {"category": p.get("category"), **compare_prompt(p["prompt"], args, tok, lm, fp32, Path(tmp))}
            rows.append(r)
            print(json.dumps(r), flush=True)
    out = {"bundle": str(args.bundle), "gguf": str(args.gguf), "n": args.n, "summary": summarize(rows),
           "prompts": rows}
    print(json.dumps(out["summary"], indent=1))
    if args.json:
        args.json.write_text(json.dumps(out, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
