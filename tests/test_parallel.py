"""Parallel speculation (the Saguaro-style speculation cache) stays lossless and really hits."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from test_decode import PROMPTS, run
from test_sampling import chi2_pvalue, exact_joint, spec_samples

from edge_ssd.api import Engine, EngineOptions, placement
from edge_ssd.costs import StepCosts
from edge_ssd.decode import DecodeConfig, decode
from edge_ssd.drafters import AutoDrafter, ModelDrafter, NgramDrafter
from edge_ssd.memory import Reading
from edge_ssd.model import OnnxLM
from edge_ssd.parallel import ParallelDrafter
from edge_ssd.sampling import SamplingParams
from edge_ssd.stats import Stats

GiB, MiB = 1 << 30, 1 << 20
GPU_LIKE = StepCosts(draft_step=0.010, verify={1: 0.030, 2: 0.032, 3: 0.034, 5: 0.038, 9: 0.046})
SHARP = SamplingParams(temperature=2.0, top_k=2)  # 2^5 outcomes of 5 tokens: enough samples per cell


@pytest.fixture(scope="module")
def pool():
    p = ThreadPoolExecutor(1)
    yield p
    p.shutdown()


@pytest.fixture(scope="module")
def target(fp32_bundle):
    return OnnxLM(fp32_bundle.target, threads=1)


@pytest.fixture(scope="module")
def near_draft(tiny_sources, tmp_path_factory):
    """A draft closer to the target than the shared noisy one (noise 0.03, not 0.35): under
    sampling its guesses of the target's bonus token hit often enough to test the cache."""
    from conftest import export_bundle
    from tiny import make_model

    root = tmp_path_factory.mktemp("near")
    near = make_model(root / "near-draft", noise_from=tiny_sources["target"], noise=0.03, seed=4)
    return export_bundle({**tiny_sources, "draft": near}, root / "pair").draft


def parallel(entry, pool, fanout=4, wait_all=False, vocab=300):
    return ParallelDrafter(ModelDrafter(OnnxLM(entry, threads=1), vocab), pool, fanout, wait_all)


@pytest.mark.parametrize("fanout,wait_all", [(1, False), (4, False), (4, True), (0, True)])
def test_greedy_parallel_equals_ar(fp32_bundle, target, pool, fanout, wait_all):
    par = parallel(fp32_bundle.draft, pool, fanout, wait_all)
    for prompt in PROMPTS[:8]:
        ar, _ = run(target, None, prompt, max_new_tokens=40)
        for k in (1, 3, 5):
            out, st = run(target, par, prompt, max_new_tokens=40, k=k)
            assert out == ar, (fanout, k, prompt)
    s = par.parallel_stats()
    if fanout == 0:
        assert s["hits"] == 0 and s["branches"] == 0
    elif wait_all:  # every fan-out ran to the end: hits do not depend on timing
        assert s["hits"] > 20 and s["rejection_hits"] > 0, s  # outcomes beyond "all accepted" hit too
        assert s["mean_fanout"] > 1


def test_perfect_draft_hits_once_acceptance_is_learned(fp32_bundle, target, pool):
    """A draft identical to the target is always fully accepted. Its acceptance is learned from
    a prior centred on the tiny model's low confidence, so early rounds fan out to rejection
    outcomes; once learned, the all-accepted branch leads and hits."""
    par = parallel(fp32_bundle.target, pool, fanout=2, wait_all=True)
    ar, _ = run(target, None, PROMPTS[2], max_new_tokens=200)
    out, st = run(target, par, PROMPTS[2], max_new_tokens=200, k=4)
    assert out == ar and st.acceptance_rate == 1.0   # every branch drafted on its true prefix
    late = par.trace[len(par.trace) // 2:]
    assert len(late) >= 15 and sum(e[1] >= 0 for e in late) >= 0.8 * len(late), par.trace
    assert st.parallel["hidden_s"] > 0


def test_parallel_with_auto_k_ngram_and_plain_rounds(fp32_bundle, target, pool):
    """Auto K (plain K=0 rounds included) and n-gram proposals between model rounds: still exact."""
    from edge_ssd.costs import StepCosts

    costs = StepCosts(draft_step=0.004, verify={1: 0.010, 2: 0.012, 3: 0.014, 5: 0.018, 9: 0.026})
    par = parallel(fp32_bundle.draft, pool, fanout=3, wait_all=True)
    auto = AutoDrafter(par, [NgramDrafter()], {})
    sources, ks = set(), []
    for prompt in PROMPTS + [[5, 6, 7, 8] * 6]:
        ar, _ = run(target, None, prompt, max_new_tokens=50)
        st = Stats("parallel")
        out = [t for c in decode(target, auto, prompt, DecodeConfig(max_new_tokens=50, k=None), st, costs)
               for t in c]
        assert out == ar, prompt
        sources |= set(st.sources)
        ks += st.k_chosen
    assert "ngram" in sources and "model" in sources and 0 in ks and max(ks) > 1


def test_context_limit_inside_branches(fp32_bundle, target, pool):
    """Branches near the end of a short cache stop at its edge; the request ends cleanly."""
    small_t = OnnxLM(fp32_bundle.target, threads=1, max_context=48)
    par = ParallelDrafter(ModelDrafter(OnnxLM(fp32_bundle.draft, threads=1, max_context=48), 300), pool, 4, True)
    prompt = PROMPTS[2]  # 30 tokens
    ar, ar_st = run(small_t, None, prompt, max_new_tokens=100)
    out, st = run(small_t, par, prompt, max_new_tokens=100, k=5)
    assert out == ar and st.finish_reason == ar_st.finish_reason == "context"


def joint_test(target, drafter, sp, runs=2500) -> float:
    """p-value of 5 sampled tokens (a prefill token, then K=1 rounds that use the cache) vs exact."""
    prompt = [40, 41, 42, 43]
    joint = exact_joint(target, prompt, sp, 5)
    counts = spec_samples(target, drafter, prompt, sp, 5, runs, k=1)
    keys = sorted(set(joint) | set(counts))
    obs = np.array([counts.get(key, 0) for key in keys], float)
    exp = np.array([joint.get(key, 1e-12) for key in keys])
    return chi2_pvalue(obs, exp / exp.sum())


def test_parallel_sampling_matches_target_joint(near_draft, target, pool):
    """Sampled branches are valid proposals for their outcome: the joint law is the target's."""
    par = parallel(near_draft, pool, fanout=4, wait_all=True)
    assert joint_test(target, par, SHARP) > 1e-3
    s = par.parallel_stats()
    assert s["hits"] > 1000 and s["rejection_hits"] > 10, s   # the cache really served proposals


def test_parallel_sampling_test_catches_a_biased_branch(near_draft, target, pool, monkeypatch):
    """Branches that draw the likeliest token while claiming q: the same test must reject."""
    monkeypatch.setattr("edge_ssd.parallel.sample", lambda p, rng: int(np.argmax(p)))
    par = parallel(near_draft, pool, fanout=4, wait_all=True)
    assert joint_test(target, par, SHARP) < 1e-6


def test_governor_lowers_fanout_before_k(fp32_bundle):
    """Under memory pressure the fan-out goes first (halved, then off), then K, then the draft."""
    calm = [0]

    def reader():
        calm[0] += 1
        return Reading(8 * GiB, 200 * MiB) if calm[0] <= 8 else Reading(100 * MiB, 200 * MiB)

    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1, draft_threads=1, memory_reader=reader,
                    memory_budget="4GiB")
    e.costs = GPU_LIKE  # the tiny models' verify is no dearer than a draft step: parallel would not pay
    ref = Engine.load(fp32_bundle.path, provider="cpu", threads=1).generate("def add", raw=True, mode="ar",
                                                                            max_new_tokens=40)
    if not e.parallel_pays():
        pytest.skip("one core: parallel runs sequentially here")
    r = e.generate("def add", raw=True, mode="parallel", drafter="model", k=4, max_new_tokens=40, fanout=4)
    assert r.token_ids == ref.token_ids and not r.error
    ev = r.stats["memory_events"]
    assert ev[:3] == ["lower_fanout"] * 3 and ev[3] == "lower_k" and "drop_draft" in ev, ev
    caps = [x["fanout_cap"] for x in e.governor.events[:3]]
    assert caps == [2, 1, 0]


def test_plan_reserves_branch_rows(fp32_bundle):
    from edge_ssd.governor import Governor

    g = Governor("4GiB", lambda: Reading(8 * GiB, 0), margin=0)
    w, kv = {"target": GiB, "draft": GiB // 2}, {"target": 56 << 10, "draft": 24 << 10}
    plain = g.plan(w, kv, 151936, 1 << 20, 16, 1 << 20, "int4", fanout=0)
    fanned = g.plan(w, kv, 151936, 1 << 20, 16, 1 << 20, "int4", fanout=4)
    rows = 17 * 151936 * 4 * 4  # K_max + 1 rows of q per branch, 4 branches
    assert plain.max_context - fanned.max_context == pytest.approx(rows / (80 << 10), abs=1)


def test_placement_defaults_by_device():
    opts = EngineOptions()
    assert placement(8, "cpu", "cpu", opts) == (8, 8)         # CPU only: sequential, every core each
    assert placement(8, "cuda", "cpu", opts) == (8, 8)        # GPU target: the CPU is the draft's
    assert placement(8, "cpu", "cpu", EngineOptions(threads=5, draft_threads=3)) == (5, 3)
    assert placement(8, "cpu", "cpu", EngineOptions(threads=3)) == (3, 3)
    assert placement(8, "cuda", "cpu", EngineOptions(threads=3)) == (3, 8)


def test_parallel_needs_a_verify_worth_hiding_behind(fp32_bundle):
    """parallel_pays: cores to spare, and a verify of at least two draft steps (cost model)."""
    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1, draft_threads=1)
    if os.cpu_count() < 2:
        pytest.skip("one core")
    e.costs = GPU_LIKE
    assert e.parallel_pays()
    e.costs = StepCosts(draft_step=0.010, verify={1: 0.012, 2: 0.013, 3: 0.014, 5: 0.016, 9: 0.020})
    assert not e.parallel_pays()
    r = e.generate("def add", raw=True, mode="parallel", max_new_tokens=8)
    assert r.stats["parallel"] == {}                          # ran as spec


def test_bad_fanout_is_a_request_error(fp32_bundle):
    from edge_ssd.errors import RequestError

    e = Engine.load(fp32_bundle.path, provider="cpu", threads=1, draft_threads=1)
    for bad in (-1, 17, 2.5, True):
        with pytest.raises(RequestError, match="fanout"):
            e.generate("x", raw=True, mode="parallel", fanout=bad, max_new_tokens=2)


def test_hidden_drafting_makes_longer_proposals_pay():
    """With drafting hidden behind verification (parallel hits), K is chosen against what still
    delays a round: measured 1-thread costs where sequential drafting stops at one token."""
    from edge_ssd.policy import SpecPolicy

    costs = StepCosts(draft_step=0.0145, verify={1: 0.0364, 2: 0.0367, 3: 0.0494, 5: 0.0659, 9: 0.0983})
    conf = [0.95] * 8

    def length(share: float) -> int:
        pol = SpecPolicy(costs, None, 0, 8, draft_share=share)
        for _ in range(30):
            pol.observe(conf, 8)          # a draft that is always right
        return next((j for j in range(1, 9) if not pol.keep_drafting(conf[:j])), 8)

    assert length(1.0) == 1 and length(0.1) >= 3


class PressureAt:
    """A governor that already capped K (an earlier request did) and cuts the fan-out to 0 from
    round `at` on; the round before may have hit a branch longer than the capped K."""

    def __init__(self, at: int):
        self.k_cap, self.fanout_cap, self.n, self.at = 2, None, 0, at

    def prefill_chunk(self, bytes_per_token):
        return 1 << 20  # the whole prompt at once

    def check(self, k, have_draft, fanout=0):
        self.n += 1
        if self.n >= self.at:
            self.fanout_cap = 0
            return "lower_fanout"
        return "ok"


def test_fanout_cut_to_zero_after_a_hit(fp32_bundle, target, pool):
    """Found in review: after a hit the cache held the branch past the proposal; with no job
    next round, the drafter was left nothing to feed (ValueError). Every switch round now."""
    par = ParallelDrafter(ModelDrafter(OnnxLM(fp32_bundle.target, threads=1), 300), pool, 1, wait_all=True)
    ar, _ = run(target, None, PROMPTS[2], max_new_tokens=80)
    for at in range(2, 30):
        st = Stats("parallel")
        out = [t for c in decode(target, par, PROMPTS[2], DecodeConfig(max_new_tokens=80, k=8), st,
                                 governor=PressureAt(at)) for t in c]
        assert out == ar, at


def test_worker_error_surfaces_once_after_every_job_finished(pool):
    """A failed job raises in the main thread, once, and only after later jobs are done: the
    draft session is never left to a job still running."""
    import time
    import types

    par = ParallelDrafter(types.SimpleNamespace(keep_rows=False), pool, 2)

    def bad():
        time.sleep(0.05)
        raise RuntimeError("onnxruntime failed in the worker")

    def later():
        time.sleep(0.2)
        return 0.0

    par.futures = [pool.submit(bad), pool.submit(later)]
    done_later = par.futures[1]
    with pytest.raises(RuntimeError, match="worker"):
        par._quiesce()
    assert done_later.done() and par.futures == []
    par._quiesce()                                        # not raised again
