"""Continuous batching (batching.py, Engine(slots=N), serve --max-concurrency N, generate
--batch-size N): several requests decode together and each gets what it gets alone.

On the tiny fp32 pair a one-row step computes the same logits alone or in a batch (checked
below), so greedy output in a batch must equal the same request's output alone, token for
token; sampled output keeps the target's law (chi-square against the exact joint, as in
test_sampling.py, with every sample drawn in a batch of concurrent requests).
"""
from __future__ import annotations

import json
import subprocess
import sys
import threading

import httpx
import numpy as np
import pytest

from edge_ssd import Engine
from edge_ssd.batching import Batcher
from edge_ssd.costs import StepCosts
from edge_ssd.decode import DecodeConfig, decode
from edge_ssd.drafters import ModelDrafter
from edge_ssd.model import OnnxLM
from edge_ssd.policy import batch_cost
from edge_ssd.sampling import SamplingParams
from edge_ssd.server import ServeOptions, build_app
from edge_ssd.stats import Stats
from test_sampling import SETTINGS, chi2_pvalue, exact_joint
from test_server import Live

PROMPTS = [f"Write a function number {i} that adds {i} to every item of a list." for i in range(7)]


def run_threads(fn, n: int) -> list:
    out: list = [None] * n
    errors: list = []

    def work(i: int) -> None:
        try:
            out[i] = fn(i)
        except BaseException as e:  # noqa: BLE001 - re-raised in the test's thread
            errors.append(e)
    threads = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    if errors:
        raise errors[0]
    return out


@pytest.fixture(scope="module")
def solo(fp32_bundle):
    return Engine.load(fp32_bundle.path, provider="cpu", threads=1)


@pytest.fixture(scope="module")
def batched(fp32_bundle):
    return Engine.load(fp32_bundle.path, provider="cpu", threads=1, slots=4)


def test_batched_step_computes_what_a_lone_step_computes(fp32_bundle):
    """The premise of the equality tests: slots stepping together (with an idle slot inside
    the batch's span) get bit-identical logits to each sequence stepped alone."""
    lm = OnnxLM(fp32_bundle.target, threads=1, max_context=128, slots=4)
    rng = np.random.default_rng(0)
    prompts = {s: rng.integers(5, 200, size=9 + 4 * s).tolist() for s in (0, 1, 3)}  # slot 2 idle
    nxt = {s: rng.integers(5, 200, size=3).tolist() for s in prompts}
    alone = OnnxLM(fp32_bundle.target, threads=1, max_context=128)
    want = {}
    for s, p in prompts.items():
        alone.reset()
        alone.forward(p)
        want[s] = [alone.forward([t]).copy() for t in nxt[s]]
    for s, p in prompts.items():
        lm.forward(p, slot=s)
    for j in range(3):
        rows = lm.step(list(prompts), [nxt[s][j] for s in prompts])
        for s, row in zip(prompts, rows):
            assert np.array_equal(row, want[s][j]), (s, j)
    assert lm.lengths == [9 + 3, 13 + 3, 0, 21 + 3]


@pytest.mark.parametrize("mode,drafter", [("ar", "auto"), ("spec", "auto"), ("spec", "model"), ("spec", "ngram")])
def test_greedy_output_in_a_batch_equals_output_alone(solo, batched, mode, drafter):
    """Seven requests from seven threads on four slots (three wait for a slot): each one's
    tokens are the ones it gets alone; the target's steps really were batched."""
    kw = dict(mode=mode, drafter=drafter, max_new_tokens=24, raw=True)
    alone = []
    for p in PROMPTS:
        solo.suffix_cache.clear()  # the cache only proposes; cleared so both runs draft alike
        alone.append(solo.generate(p, **kw).token_ids)
    before = batched.batch_stats()
    together = run_threads(lambda i: batched.generate(PROMPTS[i], **kw).token_ids, len(PROMPTS))
    assert together == alone
    after = batched.batch_stats()
    steps, rows = after["steps"] - before["steps"], after["rows"] - before["rows"]
    assert after["active"] == 0
    if mode == "ar":
        assert steps > 0 and rows > 1.5 * steps, (steps, rows)  # most steps carried several requests


def test_exact_outputs_with_slots_are_token_for_token(int4_bundle):
    """--exact with slots: int4 (row-invariant at block 32) outputs of concurrent requests are
    each one's output alone, for ar and spec alike (one-row steps are not batched there)."""
    alone = Engine.load(int4_bundle.path, provider="cpu", threads=1, exact=True)
    shared = Engine.load(int4_bundle.path, provider="cpu", threads=1, exact=True, slots=3)
    for mode in ("ar", "spec"):
        want = []
        for p in PROMPTS[:4]:
            alone.suffix_cache.clear()
            want.append(alone.generate(p, mode=mode, max_new_tokens=20, raw=True).token_ids)
        got = run_threads(lambda i: shared.generate(PROMPTS[i], mode=mode, max_new_tokens=20, raw=True).token_ids, 4)
        assert got == want, mode
    assert shared.batch_stats()["steps"] == 0


def test_streams_join_and_leave_between_rounds(batched):
    """A stream closed early frees its slot for the next request; the others run on."""
    first = batched.stream(PROMPTS[0], mode="ar", max_new_tokens=40, raw=True)
    next(iter(first))
    others = run_threads(lambda i: batched.generate(PROMPTS[i + 1], mode="ar", max_new_tokens=12,
                                                    raw=True).stats["new_tokens"], 3)
    assert others == [12, 12, 12]
    first.close()
    assert batched.batch_stats()["active"] == 0
    # all four slots again, at once
    assert run_threads(lambda i: batched.generate(PROMPTS[i], mode="ar", max_new_tokens=5, raw=True)
                       .stats["new_tokens"], 4) == [5, 5, 5, 5]


def sample_in_batches(fp32_bundle, sp: SamplingParams, prompt: list, runs: int, with_draft: bool) -> dict:
    """`runs` 3-token samples, four requests at a time on one target (and draft) of 4 slots."""
    target = OnnxLM(fp32_bundle.target, threads=1, max_context=64, slots=4)
    draft = OnnxLM(fp32_bundle.draft, threads=1, max_context=64, slots=4)
    device = threading.Lock()
    tb, db = Batcher(target, device), Batcher(draft, device)
    counts: dict = {}

    def one(seed: int) -> tuple:
        t, d = tb.acquire(), db.acquire()
        try:
            drafter = ModelDrafter(d, target.vocab) if with_draft else None
            cfg = DecodeConfig(max_new_tokens=3, k=2, sampling=SamplingParams(
                temperature=sp.temperature, top_k=sp.top_k, top_p=sp.top_p, seed=seed))
            return tuple(x for chunk in decode(t, drafter, prompt, cfg, Stats("spec")) for x in chunk)
        finally:
            t.release()
            d.release()
    for base in range(0, runs, 4):
        for out in run_threads(lambda i: one(base + i), 4):
            counts[out] = counts.get(out, 0) + 1
    assert tb.steps > 0 if not with_draft else db.steps > 0  # samples were drawn from batched steps
    return counts


@pytest.mark.parametrize("with_draft", [False, True], ids=["ar-batched-target", "spec-batched-draft"])
def test_sampling_in_a_batch_keeps_the_target_law(fp32_bundle, with_draft):
    sp = SETTINGS[0]
    prompt = [40, 41, 42, 43]
    joint = exact_joint(OnnxLM(fp32_bundle.target, threads=1), prompt, sp, 3)
    counts = sample_in_batches(fp32_bundle, sp, prompt, 1200, with_draft)
    keys = list(joint)
    assert set(counts) <= set(keys)
    obs = np.array([counts.get(key, 0) for key in keys], float)
    assert chi2_pvalue(obs, np.array([joint[key] for key in keys])) > 1e-3


def test_the_test_sees_slots_mixed_up(fp32_bundle, monkeypatch):
    """A batch that hands each slot another slot's logits fails the same test."""
    real = OnnxLM.step

    def swapped(self, slots, tokens):
        rows = real(self, slots, tokens)
        return rows[1:] + rows[:1] if len(rows) > 1 else rows
    monkeypatch.setattr(OnnxLM, "step", swapped)
    sp = SETTINGS[0]
    prompt = [40, 41, 42, 43]
    joint = exact_joint(OnnxLM(fp32_bundle.target, threads=1), prompt, sp, 3)
    counts = sample_in_batches(fp32_bundle, sp, prompt, 1200, with_draft=False)
    keys = sorted(set(joint) | set(counts))
    obs = np.array([counts.get(key, 0) for key in keys], float)
    exp = np.array([joint.get(key, 1e-12) for key in keys])
    assert chi2_pvalue(obs, exp / exp.sum()) < 1e-6


# -- the cost model: rows are the budget ----------------------------------------------------------

COSTS = StepCosts(draft_step=0.011, verify={1: 0.030, 2: 0.040, 3: 0.050, 5: 0.070, 9: 0.110})


@pytest.mark.parametrize("active,rows,want", [
    (1, 1, 0.030), (1, 5, 0.070),            # alone: verify(rows), today's rule
    (2, 1, 0.020), (4, 1, 0.060 / 4),        # in the batch: the batch's time per token
    (4, 3, 0.015 + 0.050 - 0.010),           # alone beside it: its rows, less the row it leaves
])
def test_batch_cost(active, rows, want):
    assert batch_cost(COSTS, active, rows) == pytest.approx(want)


def test_drafting_shrinks_as_concurrency_rises():
    """At 0.8 acceptance, lookups (free drafts) pay alone; in a batch of 4 the same drafts
    must beat the batch's rate, and K shrinks to 0."""
    from edge_ssd.policy import best_length
    alone = best_length(0.8, range(9), lambda n: batch_cost(COSTS, 1, n + 1))[0]
    two = best_length(0.8, range(9), lambda n: batch_cost(COSTS, 2, n + 1))[0]
    four = best_length(0.8, range(9), lambda n: batch_cost(COSTS, 4, n + 1))[0]
    assert alone >= 2 and four == 0 and two <= alone


def test_no_probe_rounds_in_a_batch():
    """A declined draft model is probed every PROBE_EVERY rounds alone, never in a batch (a
    probe holds every other request back)."""
    from edge_ssd.policy import PROBE_EVERY, DecayedRate, SpecPolicy
    cheap_draft = StepCosts(draft_step=0.003, verify=COSTS.verify)
    for active, probes in ((1, True), (4, False)):
        p = SpecPolicy(cheap_draft, active=active)
        p.rate = DecayedRate(0.0, 10.0)  # nothing accepted lately
        assert not p.model_round_pays(100)
        for _ in range(PROBE_EVERY):
            p.note_model_round(ran=False)
        assert p.model_round_pays(100) == probes


# -- the surfaces: server, Python threads (above), CLI --------------------------------------------

def test_server_decodes_requests_together(batched):
    with Live(build_app(batched, ServeOptions(max_concurrency=4, queue=8))) as s:
        def ask(i: int) -> str:
            r = httpx.post(s.url + "/v1/completions", json={"prompt": PROMPTS[i], "max_tokens": 16, "raw": True},
                           timeout=60)
            assert r.status_code == 200, r.text
            return r.json()["choices"][0]["text"]
        texts = run_threads(ask, 4)
        metrics = httpx.get(s.url + "/metrics", timeout=10).text
    assert texts == [batched.generate(p, max_new_tokens=16, raw=True).text for p in PROMPTS[:4]]
    assert "edge_ssd_batch_slots 4" in metrics and "edge_ssd_aggregate_tokens_per_second" in metrics
    occupancy = float(next(line.split()[1] for line in metrics.splitlines()
                           if line.startswith("edge_ssd_batch_occupancy")))
    assert occupancy > 1.0


def test_cli_batch_size_keeps_input_order_and_bad_lines(fp32_bundle, solo, tmp_path):
    lines = [json.dumps({"id": f"r{i}", "prompt": p, "max_new_tokens": 10, "raw": True})
             for i, p in enumerate(PROMPTS[:5])]
    lines.insert(2, "{not json")
    src = tmp_path / "in.jsonl"
    src.write_text("\n".join(lines) + "\n")
    out = tmp_path / "out.jsonl"
    r = subprocess.run([sys.executable, "-m", "edge_ssd.cli", "generate", "--bundle", str(fp32_bundle.path),
                        "--input", str(src), "--output", str(out), "--batch-size", "3", "--threads", "1"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    assert [x["line"] for x in recs] == [1, 2, 3, 4, 5, 6]
    assert "error" in recs[2] and "text" not in recs[2]
    good = [x for x in recs if "text" in x]
    assert [x["id"] for x in good] == [f"r{i}" for i in range(5)]
    assert [x["token_ids"] for x in good] == [solo.generate(p, max_new_tokens=10, raw=True).token_ids
                                              for p in PROMPTS[:5]]
    assert "1 request(s) failed" in r.stderr
