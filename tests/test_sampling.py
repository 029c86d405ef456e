"""Sampling stays lossless: speculative output follows the target's distribution exactly.

Chi-square tests over many seeds. Each is also run against a deliberately broken acceptance
rule, and must then reject: a statistical test that cannot fail proves nothing.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from edge_ssd import sampling
from edge_ssd.decode import DecodeConfig, decode
from edge_ssd.drafters import ModelDrafter
from edge_ssd.errors import RequestError
from edge_ssd.model import OnnxLM
from edge_ssd.sampling import SamplingParams, accept_sampled, probs
from edge_ssd.stats import Stats


def chi2_pvalue(observed: np.ndarray, expected_p: np.ndarray) -> float:
    """Pearson chi-square p-value (Wilson-Hilferty), merging bins expected below 5."""
    n = observed.sum()
    exp = expected_p * n
    order = np.argsort(exp)
    obs_m, exp_m, acc_o, acc_e = [], [], 0.0, 0.0
    for i in order:
        acc_o, acc_e = acc_o + observed[i], acc_e + exp[i]
        if acc_e >= 5:
            obs_m.append(acc_o)
            exp_m.append(acc_e)
            acc_o = acc_e = 0.0
    if acc_e > 0 and exp_m:
        obs_m[-1] += acc_o
        exp_m[-1] += acc_e
    obs_m, exp_m = np.array(obs_m), np.array(exp_m)
    stat = float(((obs_m - exp_m) ** 2 / exp_m).sum())
    k = len(exp_m) - 1
    if k < 1:
        return 1.0
    z = ((stat / k) ** (1 / 3) - (1 - 2 / (9 * k))) / math.sqrt(2 / (9 * k))
    return 0.5 * math.erfc(z / math.sqrt(2))


def always_accept(target_logits, draft, q, sp, rng):
    """A broken rule: trusts the draft blindly."""
    p = probs(target_logits, sp)
    return len(draft), sampling.sample(p[len(draft)], rng)


def no_residual(target_logits, draft, q, sp, rng):
    """A broken rule: after a rejection, samples from p instead of max(0, p - q)."""
    p = probs(target_logits, sp)
    d = np.asarray(draft)
    ok = rng.random(len(d)) * q[np.arange(len(d)), d] < p[np.arange(len(d)), d]
    n = len(d) if ok.all() else int(np.argmin(ok))
    return n, sampling.sample(p[n], rng)


def one_step_distribution(rule, n=20000, seed=0):
    """First-token distribution of one speculative round on fixed small-vocabulary p and q."""
    sp = SamplingParams(temperature=1.0)
    p_logits = np.log(np.array([[0.05, 0.4, 0.1, 0.3, 0.15, 0.0001], [0.2] * 5 + [0.0001]], np.float32))
    q = np.array([[0.5, 0.1, 0.1, 0.1, 0.1, 0.1]], np.float32)
    rng = np.random.default_rng(seed)
    counts = np.zeros(6)
    for _ in range(n):
        d = [int(rng.choice(6, p=q[0]))]
        k, tok = rule(p_logits, d, q, sp, rng)
        counts[d[0] if k >= 1 else tok] += 1
    return counts, probs(p_logits[:1], sp)[0].astype(np.float64)


def test_rejection_rule_matches_target_distribution():
    counts, p = one_step_distribution(accept_sampled)
    assert chi2_pvalue(counts, p) > 1e-3


@pytest.mark.parametrize("broken", [always_accept, no_residual])
def test_statistical_test_catches_a_broken_rule(broken):
    counts, p = one_step_distribution(broken)
    assert chi2_pvalue(counts, p) < 1e-6


def test_point_mass_proposal_is_lossless():
    """A deterministic proposal (greedy draft at T > 0, n-gram) is a point mass q."""
    sp = SamplingParams(temperature=1.0)
    p_logits = np.log(np.array([[0.1, 0.6, 0.3], [0.3, 0.3, 0.4]], np.float32))
    rng = np.random.default_rng(1)
    counts = np.zeros(3)
    for _ in range(20000):
        k, tok = accept_sampled(p_logits, [1], None, sp, rng)
        counts[1 if k else tok] += 1
    assert chi2_pvalue(counts, probs(p_logits[:1], sp)[0].astype(np.float64)) > 1e-3


def exact_joint(target: OnnxLM, prompt: list, sp: SamplingParams, n: int) -> dict:
    """P(t1..tn) under the target alone, by exhaustive expansion over the (top-k) support."""
    joint = {(): 1.0}
    for _ in range(n):
        nxt = {}
        for prefix, pr in joint.items():
            target.reset()
            row = probs(target.forward(prompt + list(prefix), keep=1), sp)[0]
            for t in np.flatnonzero(row):
                nxt[prefix + (int(t),)] = pr * float(row[t])
        joint = nxt
    return joint


def spec_samples(target, drafter, prompt, sp, n_tokens, runs, k):
    counts: dict = {}
    for seed in range(runs):
        cfg = DecodeConfig(max_new_tokens=n_tokens, k=k, sampling=SamplingParams(
            temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, seed=seed))
        out = tuple(t for chunk in decode(target, drafter, prompt, cfg, Stats("spec")) for t in chunk)
        counts[out] = counts.get(out, 0) + 1
    return counts


SETTINGS = [SamplingParams(temperature=1.0, top_k=3), SamplingParams(temperature=0.6, top_k=4, top_p=0.8),
            SamplingParams(temperature=1.5, top_k=3, top_p=0.95)]


@pytest.fixture(scope="module")
def pair(fp32_bundle):
    target = OnnxLM(fp32_bundle.target, threads=1)
    return target, ModelDrafter(OnnxLM(fp32_bundle.draft, threads=1), target.entry.vocab_size)


@pytest.mark.parametrize("sp", SETTINGS, ids=lambda s: f"T{s.temperature}-k{s.top_k}-p{s.top_p}")
def test_speculative_sampling_matches_target_joint(pair, sp):
    """Joint law of 3 new tokens (a prefill token, then a K=2 speculative round) vs exact target."""
    target, drafter = pair
    prompt = [40, 41, 42, 43]
    joint = exact_joint(target, prompt, sp, 3)
    counts = spec_samples(target, drafter, prompt, sp, 3, 1500, k=2)
    keys = list(joint)
    assert set(counts) <= set(keys)
    obs = np.array([counts.get(key, 0) for key in keys], float)
    assert chi2_pvalue(obs, np.array([joint[key] for key in keys])) > 1e-3


def test_end_to_end_test_fails_with_broken_rule(pair, monkeypatch):
    target, drafter = pair
    sp = SETTINGS[0]
    prompt = [40, 41, 42, 43]
    joint = exact_joint(target, prompt, sp, 3)
    monkeypatch.setattr("edge_ssd.decode.accept_sampled", always_accept)
    counts = spec_samples(target, drafter, prompt, sp, 3, 1500, k=2)
    keys = sorted(set(joint) | set(counts))
    obs = np.array([counts.get(key, 0) for key in keys], float)
    exp = np.array([joint.get(key, 1e-12) for key in keys])
    assert chi2_pvalue(obs, exp / exp.sum()) < 1e-6


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(temperature=float("nan")), dict(top_p=0),
                                 dict(top_p=1.5), dict(top_k=-3), dict(top_k=2.5), dict(seed=-1),
                                 dict(temperature="hot")])
def test_bad_sampling_parameters(bad):
    with pytest.raises(RequestError):
        SamplingParams(**bad)


def test_top_p_keeps_the_nucleus():
    p = np.array([[0.5, 0.3, 0.15, 0.05]], np.float32)
    out = probs(np.log(p), SamplingParams(temperature=1.0, top_p=0.8))
    np.testing.assert_allclose(out[0], [0.625, 0.375, 0, 0], rtol=1e-5)
    out = probs(np.log(p), SamplingParams(temperature=1.0, top_p=0.81))
    assert (out[0] > 0).sum() == 3
    big = np.random.default_rng(0).standard_normal((2, 5000)).astype(np.float32)
    got = probs(big, SamplingParams(temperature=1.0, top_p=0.9))
    for row_in, row_out in zip(big, got):   # the fast path equals a full sort
        e = np.exp(row_in - row_in.max())
        e /= e.sum()
        order = np.argsort(-e)
        keep = order[: np.searchsorted(np.cumsum(e[order]), 0.9) + 1]
        assert set(np.flatnonzero(row_out)) == set(keep.tolist())


