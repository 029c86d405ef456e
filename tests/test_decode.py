"""Greedy speculative decoding returns exactly the target's own greedy output."""
from __future__ import annotations

import numpy as np
import pytest

from edge_ssd.decode import DecodeConfig, decode
from edge_ssd.drafters import ModelDrafter
from edge_ssd.errors import RequestError
from edge_ssd.model import OnnxLM
from edge_ssd.stats import Stats

PROMPTS = [[5], [7, 8, 9], list(range(10, 40)), [200, 3, 77, 150, 12, 9, 250, 31]] + [
    np.random.default_rng(s).integers(3, 290, 3 + 5 * s).tolist() for s in range(8)
]


def run(target, drafter, prompt, **cfg):
    stats = Stats(mode="spec" if drafter else "ar")
    out = [t for chunk in decode(target, drafter, prompt, DecodeConfig(**cfg), stats) for t in chunk]
    return out, stats


@pytest.fixture(scope="module")
def models(fp32_bundle):
    return OnnxLM(fp32_bundle.target, threads=1), OnnxLM(fp32_bundle.draft, threads=1)


@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_spec_equals_ar(models, k):
    target, draft = models
    drafter = ModelDrafter(draft, target.entry.vocab_size)
    accepted = drafted = 0
    for prompt in PROMPTS:
        ar, _ = run(target, None, prompt, max_new_tokens=40)
        spec, st = run(target, drafter, prompt, max_new_tokens=40, k=k)
        assert spec == ar, (k, prompt)
        assert st.new_tokens == len(spec) == 40
        accepted, drafted = accepted + st.accepted, drafted + st.drafted
    assert 0 < accepted < drafted  # the noisy draft is partly right: both paths are exercised


def test_exact_mode_is_bit_identical_for_int4(int4_bundle):
    """int4 kernels compute a lone row differently; --exact pads to two rows like verification."""
    target = OnnxLM(int4_bundle.target, threads=1, min_rows=2)
    drafter = ModelDrafter(OnnxLM(int4_bundle.draft, threads=1), target.entry.vocab_size)
    for prompt in PROMPTS:
        ar, _ = run(target, None, prompt, max_new_tokens=30)
        for k in (1, 3, 6):
            spec, _ = run(target, drafter, prompt, max_new_tokens=30, k=k)
            assert spec == ar, (k, prompt)


def test_eos_inside_an_accepted_run(fp32_bundle):
    """Self-drafting accepts every token; an EOS in the middle of a run must end the output there."""
    target = OnnxLM(fp32_bundle.target, threads=1)
    drafter = ModelDrafter(OnnxLM(fp32_bundle.target, threads=1), target.entry.vocab_size)
    prompt = [11, 12, 13]
    ar, _ = run(target, None, prompt, max_new_tokens=30)
    eos = ar[6]
    cut = ar.index(eos)
    spec, st = run(target, drafter, prompt, max_new_tokens=30, k=5, eos_ids=frozenset({eos}))
    assert spec == ar[:cut]
    assert st.finish_reason == "stop"
    assert st.acceptance_rate == 1.0


def test_context_limit_inside_a_round(fp32_bundle):
    prompt = list(range(20, 30))
    limit = len(prompt) + 9
    target = OnnxLM(fp32_bundle.target, threads=1, max_context=limit)
    drafter = ModelDrafter(OnnxLM(fp32_bundle.draft, threads=1, max_context=limit), target.entry.vocab_size)
    ar, st_ar = run(target, None, prompt, max_new_tokens=50)
    spec, st = run(target, drafter, prompt, max_new_tokens=50, k=4)
    assert spec == ar and len(ar) == limit - len(prompt) + 1  # the last token is never fed back
    assert st.finish_reason == st_ar.finish_reason == "context"


def test_max_new_tokens_cuts_a_round(models):
    target, draft = models
    drafter = ModelDrafter(draft, target.entry.vocab_size)
    for n in (1, 2, 7):
        spec, st = run(target, drafter, [5, 6], max_new_tokens=n, k=8)
        assert len(spec) == n and st.finish_reason == "length"


def test_prompt_over_the_context_is_refused_up_front(fp32_bundle):
    target = OnnxLM(fp32_bundle.target, threads=1, max_context=16)
    with pytest.raises(RequestError, match="context limit is 16"):
        run(target, None, list(range(3, 30)), max_new_tokens=4)


@pytest.mark.parametrize("bad", [dict(max_new_tokens=0), dict(k=-1), dict(k=99), dict(max_new_tokens=1.5)])
def test_bad_decode_parameters(bad):
    with pytest.raises(RequestError):
        DecodeConfig(**bad)
