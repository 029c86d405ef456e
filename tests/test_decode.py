"""Greedy speculative decoding returns exactly the target's own greedy output."""
from __future__ import annotations

import numpy as np
import pytest

from edge_ssd.costs import StepCosts
from edge_ssd.decode import DecodeConfig, decode
from edge_ssd.drafters import ModelDrafter
from edge_ssd.errors import RequestError
from edge_ssd.request import Request
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
        Request(**bad)


class FrozenCosts(StepCosts):
    """Device-like costs that the tiny models' steps (all overhead) do not move."""

    def observe_verify(self, rows, seconds):
        pass

    def observe_draft(self, seconds):
        pass

    def observe_catchup(self, tokens, seconds):
        pass


def test_ngram_and_auto_drafters_are_lossless(fp32_bundle):
    """Prompt lookup (a point-mass proposal) and the per-round choice keep greedy output exact."""
    from edge_ssd.drafters import AutoDrafter, NgramDrafter

    target = OnnxLM(fp32_bundle.target, threads=1)
    draft = OnnxLM(fp32_bundle.draft, threads=1)
    costs = FrozenCosts(draft_step=0.002, verify={1: 0.010, 2: 0.011, 3: 0.012, 5: 0.014, 9: 0.018},
                        catchup_token=0.0005)  # a draft that can pay: both sources get rounds
    repetitive = [7, 8, 9, 10, 11] * 6
    used = set()
    for prompt in PROMPTS + [repetitive]:
        ar, _ = run(target, None, prompt, max_new_tokens=40)
        for d, k in ((NgramDrafter(), 4), (AutoDrafter(ModelDrafter(draft, 300), [NgramDrafter()]), None),
                     (AutoDrafter(None, [NgramDrafter()]), None)):
            stats = Stats("spec")
            cfg = DecodeConfig(max_new_tokens=40, k=k)
            spec = [t for chunk in decode(target, d, prompt, cfg, stats, costs) for t in chunk]
            assert spec == ar, (type(d).__name__, prompt)
            used |= set(stats.sources)
    assert used == {"model", "ngram"}


def test_ngram_lookup_prefers_longest_most_recent_match():
    from edge_ssd.drafters import NgramDrafter

    d = NgramDrafter(n_max=3, n_min=1)
    d.start([1, 2, 3, 9, 1, 2, 3, 4, 5, 2, 3])
    assert d.lookup([1, 2, 3, 9, 1, 2, 3, 4, 5, 2, 3], 3) == [4, 5, 2]   # "2 3" -> after its latest match
    assert d.lookup([1, 2, 3, 9, 1, 2, 3, 4, 5, 2, 3, 77], 3) == []      # 77 never seen before
    assert d.lookup([1, 2, 3, 9, 1, 2, 3, 4, 5, 2, 3, 77, 1, 2], 2) == [3, 4]


def test_auto_k_adapts_to_acceptance(fp32_bundle):
    """With a perfect draft auto K drafts long; with a useless one it falls back to plain steps.

    Costs are frozen at device-like values: the tiny models' real step times are all overhead.
    """
    target = OnnxLM(fp32_bundle.target, threads=1)
    costs = FrozenCosts(draft_step=0.002, verify={1: 0.010, 2: 0.011, 3: 0.012, 5: 0.014, 9: 0.018})
    self_draft = ModelDrafter(OnnxLM(fp32_bundle.target, threads=1), 300)
    ar, _ = run(target, None, [5, 6, 7], max_new_tokens=150)
    stats = Stats("spec")
    out = [t for c in decode(target, self_draft, [5, 6, 7], DecodeConfig(max_new_tokens=150, k=None), stats,
                             costs) for t in c]
    assert out == ar and stats.acceptance_rate == 1.0
    ks = stats.k_chosen[:-2]  # the last rounds are cut by the token budget
    assert max(ks) >= 6 and np.mean(ks[len(ks) // 2:]) > 2 * np.mean(ks[: len(ks) // 4]), ks
    ar, _ = run(target, None, [5, 6, 7], max_new_tokens=60)

    pricey = FrozenCosts(draft_step=0.009, verify={1: 0.010, 2: 0.019, 3: 0.028, 5: 0.046, 9: 0.082})
    other = OnnxLM(fp32_bundle.draft, threads=1)
    stats = Stats("spec")
    out = [t for c in decode(target, ModelDrafter(other, 300), [5, 6, 7], DecodeConfig(max_new_tokens=60, k=None),
                             stats, pricey) for t in c]
    assert out == ar
    assert stats.k_chosen.count(0) > len(stats.k_chosen) // 2   # mostly plain steps: drafting cannot pay


def test_acceptance_estimates_carry_over_between_requests(fp32_bundle):
    target = OnnxLM(fp32_bundle.target, threads=1)
    self_draft = ModelDrafter(OnnxLM(fp32_bundle.target, threads=1), 300)
    costs = StepCosts(draft_step=0.002, verify={1: 0.010, 2: 0.011, 3: 0.012, 5: 0.014, 9: 0.018})
    learned: dict = {}
    out = [t for c in decode(target, self_draft, [5, 6, 7], DecodeConfig(max_new_tokens=30, k=None), Stats("spec"),
                             costs, learned=learned) for t in c]
    assert len(out) == 30
    hits, seen = learned["rate"]
    assert hits / seen > 0.9 and seen <= 8.0 + 1e-9   # a perfect draft, scaled to a light prior


def test_pruned_draft_vocabulary_stays_lossless(tiny_sources, tmp_path):
    """A draft whose LM head keeps only the first 256 ids proposes only those; output unchanged."""
    from edge_ssd_export.graph import QuantConfig
    from edge_ssd_export.pipeline import ExportPlan, ModelPlan, export_pair

    q = QuantConfig(weights="fp32")
    b = export_pair(ExportPlan(target=ModelPlan("target", str(tiny_sources["target"]), q),
                               draft=ModelPlan("draft", str(tiny_sources["draft"]),
                                               QuantConfig(weights="fp32", vocab_limit=256)),
                               out=tmp_path / "b", cache=tmp_path / ".cache"))
    assert b.draft.vocab_size == 256 and b.target.vocab_size == 300
    target = OnnxLM(b.target, threads=1)
    draft = ModelDrafter(OnnxLM(b.draft, threads=1), target.entry.vocab_size)
    proposed = []
    original = draft.propose

    def spy(*a, **k):
        p = original(*a, **k)
        proposed.extend(p.tokens)
        return p

    draft.propose = spy
    for prompt in PROMPTS[:6]:
        ar, _ = run(target, None, prompt, max_new_tokens=30)
        spec, _ = run(target, draft, prompt, max_new_tokens=30, k=3)
        assert spec == ar
    assert proposed and max(proposed) < 256
