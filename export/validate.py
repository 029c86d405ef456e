"""Checks an export must pass before its bundle is written.

* Tokenizers: draft and target must map the same ids to the same tokens over their shared
  range (a padded vocabulary such as 151,936 vs 152,064 rows is fine).
* Golden check: logits of K+1 tokens fed at once on top of a past must equal feeding them one
  at a time. Exporter bugs (a causal mask that ignores the past offset) break exactly this.
* Fidelity: top-1 agreement and KL divergence of the exported graph against the fp32 source
  model (for a GGUF: its own values, dequantized), teacher forced on a few prompts; low
  agreement or high divergence is reported as a warning. The reference is the numpy forward
  over the source's own weights (reference.py: no torch); torch runs the Hugging Face model
  only for an architecture that forward does not implement, and without torch the agreement
  is skipped and the report says so.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from edge_ssd.bundle import ModelEntry
from edge_ssd.model import OnnxLM, rows_invariant

from .errors import ExportError
from .graph import Arch
from .reference import Reference, numpy_reference
from .weights import open_weights

log = logging.getLogger("edge_ssd.export")

# Max |logit difference| allowed between K+1-at-once and one-at-a-time evaluation. fp32 kernels
# differ only by summation order; quantized kernels legitimately differ more (int8 activation
# quantization per row); a masking bug gives differences of the order of the logits themselves.
GOLDEN_TOLERANCE = {"fp32": 1e-3, "fp16": 5e-2, "int8": 2.0, "int4": 2.0}
LOW_AGREEMENT = 0.85
# Mean KL(source || graph) per position, in nats, above which the export warns. Measured on the
# default pair against its GGUFs (tools/fidelity.py, docs/benchmarks.md): target re-quantized
# int4 block 128 0.29 (88% top-1), kept (gguf_quant.py) 0.011 (100%); the draft (mostly Q5_0,
# re-quantized int4 block 32) 0.06-0.10. Above 0.15 a graph is about as far off as the first.
HIGH_KL = 0.15

PROMPTS = (
    "def fibonacci(n):\n    \"\"\"Return the n-th Fibonacci number.\"\"\"\n",
    "The capital of France is Paris. The capital of Germany is",
    "Speculative decoding lets a small draft model propose tokens that a large model verifies.",
    "import numpy as np\n\ndef softmax(x):\n",
)


class ValidationError(ExportError, ValueError):
    """The exported graph or the pair fails a check the bundle must pass."""


def check_tokenizers(draft_file: Path, target_file: Path) -> int:
    """Refuse a pair whose tokenizers differ over the shared id range; return that range's size."""
    from .tokenizer_meta import load_tokenizer  # it imports this module: import at call time

    a, b = load_tokenizer(draft_file), load_tokenizer(target_file)
    va = {i: t for t, i in a.get_vocab(with_added_tokens=True).items()}
    vb = {i: t for t, i in b.get_vocab(with_added_tokens=True).items()}
    shared = min(max(va) + 1, max(vb) + 1)
    for i in range(shared):
        if va.get(i) != vb.get(i):
            raise ValidationError(
                f"draft and target tokenizers differ at id {i}: draft {va.get(i)!r}, target {vb.get(i)!r}; "
                "speculative decoding needs the same tokenizer"
            )
    return shared


@dataclass
class GoldenResult:
    max_abs_diff: float
    argmax_equal: bool
    tolerance: float

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.tolerance


def golden_check(lm: OnnxLM, ids: list, past: int, k_plus_1: int, quant: str) -> GoldenResult:
    """Compare K+1 tokens at once with one at a time, both on top of `past` tokens of context."""
    lm.reset()
    lm.forward(ids[:past])
    at_once = lm.forward(ids[past:past + k_plus_1], keep=k_plus_1).copy()
    lm.truncate(past)
    one_by_one = np.stack([lm.forward([t])[0].copy() for t in ids[past:past + k_plus_1]])
    lm.reset()
    return GoldenResult(
        float(np.abs(at_once - one_by_one).max()),
        bool((at_once.argmax(-1) == one_by_one.argmax(-1)).all()),
        GOLDEN_TOLERANCE[quant],
    )


def teacher_forced_logits(lm: OnnxLM, ids: list) -> np.ndarray:
    lm.reset()
    out = lm.forward(ids, keep=len(ids)).copy()
    lm.reset()
    return out


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def kl_divergence(ref_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(ref) || softmax(logits)) per position, in nats, over the graph's vocabulary
    (a draft's limited vocabulary is compared on the ids it keeps)."""
    p_log, q_log = _log_softmax(ref_logits[..., :logits.shape[-1]]), _log_softmax(logits)
    return (np.exp(p_log) * (p_log - q_log)).sum(-1)


def fidelity(lm: OnnxLM, prompts: list, expected: list) -> dict:
    """Teacher-forced top-1 agreement and mean KL divergence of the graph against the reference."""
    got = [teacher_forced_logits(lm, p) for p in prompts]
    agree = [float((g.argmax(-1) == e.argmax(-1)).mean()) for g, e in zip(got, expected)]
    kl = np.concatenate([kl_divergence(e, g) for g, e in zip(got, expected)])
    return {"top1_agreement_vs_fp32": float(np.mean(agree)), "kl_vs_fp32": float(kl.mean())}


def validate_model(entry: ModelEntry, encode: Callable[[str], list], reference: Optional[Reference],
                   threads: int = 2, reference_name: str = "none") -> dict:
    """Run the golden check and (given a reference) the top-1 agreement for one exported graph.

    The reference runs first, before the graph's session exists: the two are never both in
    memory (the export's peak RSS).
    """
    quant = entry.quant["weights"]
    prompts = [encode(p) for p in PROMPTS]
    expected = reference(prompts) if reference is not None else None
    lm = OnnxLM(entry, threads=threads, max_context=512)
    longest = max(prompts, key=len)
    rng = np.random.default_rng(0)
    ids = longest + rng.integers(0, min(entry.vocab_size, 1000), max(0, 24 - len(longest))).tolist()
    golden = golden_check(lm, ids, past=len(ids) - 5, k_plus_1=5, quant=quant)
    report = {"golden_max_abs_diff": golden.max_abs_diff, "golden_argmax_equal": golden.argmax_equal,
              "golden_tolerance": golden.tolerance,
              "rows_invariant": rows_invariant(lm, ids + ids, past=len(ids) - 5),
              "reference": reference_name}
    if not golden.ok:
        # Gemma 3 270M from GGUF: 3.37 (int4) and 6.16 (int8) at accuracy level 4, 0.0005 at level 0
        hint = ("; or, with int8 activations (accuracy level 4), their rounding: export with --accuracy-level 0 "
                "to tell" if entry.quant.get("accuracy_level") == 4 else "")
        raise ValidationError(
            f"golden check failed for the {entry.role} graph: K+1 tokens at once differ from one at a time "
            f"by {golden.max_abs_diff:.3g} (tolerance {golden.tolerance:g}); the graph's causal mask or cache is "
            f"wrong{hint}"
        )
    if expected is not None:
        report.update(fidelity(lm, prompts, expected))
        if report["top1_agreement_vs_fp32"] < LOW_AGREEMENT:
            log.warning("the %s graph (%s) agrees with the fp32 model on only %.0f%% of top-1 tokens",
                        entry.role, quant, 100 * report["top1_agreement_vs_fp32"])
        if report["kl_vs_fp32"] > HIGH_KL:
            log.warning("the %s graph (%s) is %.3f nats per token (KL) from the fp32 model", entry.role, quant,
                        report["kl_vs_fp32"])
    return report


def torch_reference(hf_dir: Path) -> Reference:
    """Teacher-forced logits of the fp32 Hugging Face model, for the agreement and KL checks."""
    import torch
    from transformers import AutoModelForCausalLM

    def argmax(prompts: list) -> list:
        model = AutoModelForCausalLM.from_pretrained(str(hf_dir), dtype=torch.float32, low_cpu_mem_usage=True)
        model.eval()
        with torch.no_grad():
            return [model(torch.tensor([ids])).logits[0].numpy() for ids in prompts]

    return argmax


def choose_reference(hf_dir: Path, arch: Arch) -> tuple:
    """(reference or None, its name for the report): numpy over the source's weights when it
    implements the architecture, else the torch model when torch is installed, else none."""
    ref = numpy_reference(open_weights(hf_dir), arch)
    if ref is not None:
        return ref, "numpy-fp32"
    import importlib.util

    from .gguf_source import pointed_gguf

    if pointed_gguf(hf_dir) is not None:  # a GGUF read directly: no weights for transformers to load
        log.warning("no fp32 reference for %s read directly from GGUF: top-1 agreement not checked",
                    arch.architecture)
        return None, "none (no numpy forward for this architecture; a GGUF read directly has no torch model)"
    if importlib.util.find_spec("torch") and importlib.util.find_spec("transformers"):
        return torch_reference(hf_dir), "torch-fp32"
    log.warning("no fp32 reference for %s without torch: top-1 agreement not checked", arch.architecture)
    return None, "none (no numpy forward for this architecture, and torch is not installed)"


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
