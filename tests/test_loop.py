"""The decoding loop, drafters, policy and speculation cache on scripted models: no torch, no
ONNX, milliseconds per case, so every path can be driven from a table."""
from __future__ import annotations

import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from fake_lm import FakeLM  # noqa: E402

from edge_ssd.costs import StepCosts  # noqa: E402
from edge_ssd.decode import DecodeConfig, decode  # noqa: E402
from edge_ssd.drafters import AutoDrafter, Drafter, DraftRound, ModelDrafter, NgramDrafter  # noqa: E402
from edge_ssd.enums import FinishReason  # noqa: E402
from edge_ssd.parallel import ParallelDrafter  # noqa: E402
from edge_ssd.policy import DecayedRate, SpecPolicy, best_length, expected_tokens  # noqa: E402
from edge_ssd.sampling import SamplingParams  # noqa: E402
from edge_ssd.stats import Stats  # noqa: E402

PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]
POOL = ThreadPoolExecutor(max_workers=1)


def costs(draft: float = 0.004, decode1: float = 0.020, row: float = 0.004, catchup: float = 0.001) -> StepCosts:
    """A CPU-like cost model: verification rows add compute to a bandwidth-bound step."""
    return StepCosts(draft, {r: decode1 + row * (r - 1) for r in (1, 2, 3, 5, 9)}, catchup)


class FrozenCosts(StepCosts):
    """Costs that the fakes' microsecond steps do not move: the policy sees a device's."""

    def observe_verify(self, rows: int, seconds: float) -> None:
        pass

    def observe_draft(self, seconds: float) -> None:
        pass

    def observe_catchup(self, tokens: int, seconds: float) -> None:
        pass


def frozen(**kw) -> FrozenCosts:
    c = costs(**kw)
    return FrozenCosts(c.draft_step, c.verify, c.catchup_token)


def make_drafter(kind: str, target: FakeLM, agreement: float) -> Drafter:
    draft = FakeLM(target.vocab, target.max_context, seed=5, agree_with=target, agreement=agreement)
    model = ModelDrafter(draft, target.vocab)
    if kind == "model":
        return model
    if kind == "ngram":
        return AutoDrafter(None, [NgramDrafter()])
    if kind == "auto":
        return AutoDrafter(model, [NgramDrafter()])
    fanout = int(kind.split("/")[1])  # "parallel/F"
    return ParallelDrafter(model, POOL, fanout, wait_all=True)


def run(target: FakeLM, drafter, n: int = 120, k=None, sp: SamplingParams = SamplingParams(),
        step_costs: StepCosts = None, prompt=PROMPT) -> tuple:
    stats = Stats("spec" if drafter else "ar")
    cfg = DecodeConfig(max_new_tokens=n, k=k, sampling=sp)
    out = [t for chunk in decode(target, drafter, list(prompt), cfg, stats, step_costs or costs()) for t in chunk]
    return out, stats


@pytest.mark.parametrize("kind", ["model", "ngram", "auto", "parallel/0", "parallel/1", "parallel/4"])
@pytest.mark.parametrize("agreement", [0.0, 0.5, 0.9, 1.0])
@pytest.mark.parametrize("k", [None, 1, 4])
def test_greedy_speculation_is_the_targets_own_output(kind, agreement, k):
    target = FakeLM()
    want, _ = run(FakeLM(), None)
    got, stats = run(target, make_drafter(kind, target, agreement), k=k)
    assert got == want
    assert stats.new_tokens == 120 and stats.finish_reason == FinishReason.LENGTH


@pytest.mark.parametrize("agreement", [0.2, 0.5, 0.8])
def test_acceptance_measures_the_drafts_agreement(agreement):
    """K=1 rounds test one token each: the accepted share is the draft's agreement rate."""
    target = FakeLM(max_context=2048)
    _, stats = run(target, make_drafter("model", target, agreement), n=1500, k=1)
    assert stats.drafted > 600
    assert abs(stats.acceptance_rate - agreement) < 0.08, stats.acceptance_rate


@pytest.mark.parametrize("agreement,draft_step,expect", [
    (1.0, 0.002, "deep"),    # a cheap draft that is always right: draft as far as allowed
    (0.0, 0.004, "probed"),  # a cheap draft that is always wrong: plain steps, with probes
    (0.0, 0.015, "plain"),   # an expensive one: even predictable text could not repay a probe
    (0.6, 0.004, "shallow"),  # 0.6 per token at 4 ms a step and 4 ms a row: K = 1 is the optimum
])
def test_auto_k_follows_costs_and_acceptance(agreement, draft_step, expect):
    target = FakeLM(max_context=1024)
    _, stats = run(target, make_drafter("model", target, agreement), n=400, step_costs=frozen(draft=draft_step))
    late = stats.k_chosen[len(stats.k_chosen) // 2:]
    mean_k, plain = np.mean(late), np.mean([k == 0 for k in late])
    if expect == "deep":
        assert mean_k >= 6, mean_k
    elif expect == "probed":
        assert plain > 0.8 and 0 < sum(k > 0 for k in late), (plain, late)
    elif expect == "plain":
        assert plain == 1.0, late
    else:
        assert 0.8 <= mean_k <= 2 and plain < 0.2, (mean_k, plain)


@pytest.mark.parametrize("agreement,probes,found", [
    (0.0, True, False),   # an always-wrong cheap draft: declined, probed, never found paying
    (1.0, False, False),  # an always-right one: the estimate backs every round, nothing is a probe
])
def test_stats_count_probes_and_what_catching_up_fed_the_draft(agreement, probes, found):
    target = FakeLM(max_context=1024)
    _, stats = run(target, make_drafter("model", target, agreement), n=300, step_costs=frozen(draft=0.004))
    from edge_ssd.policy import PROBE_EVERY

    run_, found_ = stats.probes
    assert (run_ > 0) == probes and (found_ > 0) == found and found_ <= run_
    if probes:   # each probe feeds the draft the PROBE_EVERY or more tokens of the plain rounds before it
        assert stats.catchup[0] >= run_ * PROBE_EVERY and stats.catchup[1] > 0
    else:        # a draft that drafts every round is behind by two tokens at most (its last and the bonus)
        assert 0 < stats.catchup[0] <= 2 * stats.sources["model"][0]
    js = stats.to_json()
    assert js["probes"] == {"run": run_, "found": found_} and js["catchup_tokens"] == stats.catchup[0]


def test_eos_and_context_end_a_request():
    target = FakeLM(max_context=40)
    out, stats = run(target, make_drafter("model", target, 1.0), n=100)
    # the cache holds every token but the last, which no forward has seen yet
    assert stats.finish_reason == FinishReason.CONTEXT and len(PROMPT) + len(out) == 40 + 1
    want, _ = run(FakeLM(), None, n=10)
    stats = Stats("spec")
    cfg = DecodeConfig(max_new_tokens=100, k=4, eos_ids=frozenset({want[5]}))
    target = FakeLM()
    out = [t for c in decode(target, make_drafter("model", target, 1.0), PROMPT, cfg, stats, costs()) for t in c]
    assert out == want[:want.index(want[5])] and stats.finish_reason == FinishReason.STOP


@pytest.mark.parametrize("agreement,runner_up,fanout,expect", [
    (1.0, True, 1, "hits"),            # all accepted: PEARL's branch is always right
    (0.0, True, 4, "rejection_hits"),  # every first token rejected, the target's token is the runner-up
    (0.0, False, 4, "misses"),         # the target's token is nowhere among the draft's guesses
])
def test_speculation_cache_hit_partial_hit_and_miss(agreement, runner_up, fanout, expect):
    target = FakeLM(vocab=512)
    draft = FakeLM(512, seed=5, agree_with=target, agreement=agreement, runner_up=runner_up)
    par = ParallelDrafter(ModelDrafter(draft, 512), POOL, fanout, wait_all=True)
    want, _ = run(FakeLM(vocab=512), None, n=80)
    got, stats = run(target, par, n=80, k=3)
    assert got == want
    p = stats.parallel
    assert p["rounds"] > 10
    if expect == "hits":
        assert p["hit_rate"] > 0.9 and p["rejection_hits"] == 0, p
    elif expect == "rejection_hits":
        assert p["rejection_hits"] > 0.5 * p["rounds"], p
    else:
        assert p["misses"] > 0.9 * p["rounds"] and p["hits"] == 0, p


def test_drafter_hooks_are_declared_on_the_interface():
    """The loop calls every hook unconditionally: each concrete drafter must provide them."""
    for d in (ModelDrafter(FakeLM(), 64), NgramDrafter(), AutoDrafter(None, [NgramDrafter()])):
        assert d.concurrent is False and d.fanout == 0 and d.draft_share == 1.0 and d.parallel_stats() == {}
        d.overlap([1], None, None)
    par = ParallelDrafter(ModelDrafter(FakeLM(), 64), POOL, 3)
    auto = AutoDrafter(par, [NgramDrafter()])
    assert par.concurrent and auto.concurrent and auto.fanout == par.fanout == 3


def test_draft_round_limits():
    rnd = DraftRound(room=5, k_limit=8, sampling=SamplingParams(), rng=np.random.default_rng(0))
    assert rnd.k == 5 and rnd.after(3).k == 2 and rnd.after(9).k == 0
    assert DraftRound(room=9, k_limit=3, sampling=SamplingParams(), rng=None).k == 3


@pytest.mark.parametrize("accept,want", [([], 1.0), ([1.0, 1.0], 3.0), ([0.5], 1.5), ([0.5, 0.5], 1.75)])
def test_expected_tokens(accept, want):
    assert expected_tokens(accept) == pytest.approx(want)


def test_best_length_prefers_the_shortest_tie_and_pays_for_rows():
    flat = lambda n: 1.0  # noqa: E731 - rows are free: the longest proposal wins
    assert best_length(0.9, range(0, 5), flat)[0] == 4
    assert best_length(0.0, range(0, 5), flat)[0] == 0
    steep = lambda n: 1.0 + n  # noqa: E731 - each row costs a whole step: never worth it below 1.0
    assert best_length(0.9, range(0, 5), steep)[0] == 0


def test_decayed_rate_forgets_and_carries_a_bounded_prior():
    r = DecayedRate(1.0, 2.0, decay=0.5)
    for _ in range(20):
        r.observe(1.0, 1.0)
    assert r.value == pytest.approx(1.0, abs=1e-3)
    hits, seen = r.carried(1.0)
    assert seen == pytest.approx(1.0) and hits / seen == pytest.approx(r.value)


def test_policy_probes_after_declined_rounds():
    pol = SpecPolicy(costs(), None, 0, 8)
    pol.rate = DecayedRate(0.0, 10.0)  # nothing accepted lately: the model never pays
    assert not pol.model_round_pays(100)
    for _ in range(8):
        pol.note_model_round(ran=False)
    assert pol.model_round_pays(100)
    pol.note_model_round(ran=True)
    assert not pol.model_round_pays(100)


def _plain_rounds_before_a_probe(pol: SpecPolicy) -> int:
    n = 0
    while not pol.model_round_pays(100):
        pol.note_model_round(ran=False)
        n += 1
    pol.note_model_round(ran=True)
    return n


def test_probes_back_off_while_the_model_does_not_pay_and_recover_when_it_does():
    from edge_ssd.policy import PROBE_EVERY, PROBE_MAX

    pol = SpecPolicy(costs(), None, 0, 8)
    pol.rate = DecayedRate(0.0, 10.0)
    waits = [_plain_rounds_before_a_probe(pol) for _ in range(6)]
    assert waits == [min(PROBE_EVERY << i, PROBE_MAX) for i in range(6)] and waits[-1] == PROBE_MAX
    pol.costs, pol.rate = costs(), DecayedRate(9.5, 10.0)   # a cheap draft, mostly right: it pays
    assert pol.model_round_pays(100)
    pol.note_model_round(ran=True)        # a round the estimate backed: the short wait is back
    pol.rate = DecayedRate(0.0, 10.0)
    assert _plain_rounds_before_a_probe(pol) == PROBE_EVERY



@pytest.mark.parametrize("draft_step,prefilled", [(0.004, True), (0.015, False)], ids=["can-pay", "cannot-pay"])
def test_a_draft_that_cannot_pay_leaves_the_prompt_for_later(draft_step, prefilled):
    """A draft model that could not pay even on its best text does not prefill the prompt
    (time to first token); one that can, does. Output is the target's either way."""
    target = FakeLM()
    draft = FakeLM(target.vocab, target.max_context, seed=5, agree_with=target, agreement=0.9)
    stats = Stats("spec")
    gen = decode(target, ModelDrafter(draft, target.vocab), list(PROMPT), DecodeConfig(max_new_tokens=40, k=None),
                 stats, frozen(draft=draft_step))
    first = next(gen)
    assert draft.length == (len(PROMPT) if prefilled else 0)
    assert first + [t for chunk in gen for t in chunk] == run(FakeLM(), None, n=40)[0]


@pytest.mark.parametrize("draft_step,prefilled", [(0.004, True), (0.015, False)], ids=["prefilled", "lazy"])
def test_the_drafts_prompt_prefill_is_a_catch_up_the_costs_learn_from(draft_step, prefilled):
    """The calibration's 64-token catch-up underestimates a prompt's (measured 1.0 against
    1.5-2.5 ms a token): a draft that takes the prompt in reports how long it took; a lazy
    one took nothing in and reports nothing."""
    target = FakeLM()
    draft = FakeLM(target.vocab, target.max_context, seed=5, agree_with=target, agreement=0.9)
    seen = []
    c = frozen(draft=draft_step)
    c.observe_catchup = lambda tokens, seconds: seen.append((tokens, seconds))
    gen = decode(target, ModelDrafter(draft, target.vocab), list(PROMPT), DecodeConfig(max_new_tokens=40, k=None),
                 Stats("spec"), c)
    next(gen)
    assert [t for t, _ in seen] == ([len(PROMPT)] if prefilled else [])
    assert all(s > 0 for _, s in seen)


def test_a_lazy_draft_catches_up_and_drafts_what_an_eager_one_would():
    target = FakeLM()
    seq = list(PROMPT) + [7, 8, 9]
    rnd = DraftRound(room=10, k_limit=3, sampling=SamplingParams(), rng=np.random.default_rng(0))
    props = []
    for lazy in (False, True):
        draft = FakeLM(target.vocab, target.max_context, seed=5, agree_with=target, agreement=0.5)
        d = ModelDrafter(draft, target.vocab)
        d.start(list(PROMPT), lazy=lazy)
        props.append(d.propose(seq, rnd))
        assert draft.length == len(seq) + len(props[-1].tokens) - 1
    assert props[0].tokens == props[1].tokens and props[1].catchup[0] == len(seq)

AVX512 = dict(draft=0.0108, decode1=0.0223, row=0.0083, catchup=0.0032)  # the 2-core AVX-512 machine, measured
AVX2 = dict(draft=0.0105, decode1=0.022, row=0.004, catchup=0.0008)   # the 2-core AVX2 machine of before


@pytest.mark.parametrize("machine,behind,room,active,want", [
    (costs_kw := {}, 8, 100, 1, True),   # a cheap draft: a probe can repay its catch-up many times
    (costs_kw, 16, 1, 1, False),         # two tokens left: too few to win the catch-up back
    (costs_kw, 2000, 100, 1, False),     # a catch-up of 2000 tokens costs more than 100 could win
    (costs_kw, 8, 100, 4, False),        # in a batch a probe holds the other requests back
    (AVX2, 32, 100, 1, True),            # model drafting paid 1.3x on code there: probes may find it
    (AVX512, 8, 100, 1, False),          # a draft at 0.57x the target: even code could not repay one
], ids=["cheap", "no-room", "long-catch-up", "batch", "avx2", "avx512"])
def test_a_probe_runs_only_where_it_can_pay(machine, behind, room, active, want):
    """A declined model is probed after PROBE_EVERY plain rounds only if, at PROBE_RATE, it
    would win back the catch-up of the `behind` tokens it missed within the `room` left."""
    from edge_ssd.policy import PROBE_EVERY

    pol = SpecPolicy(costs(**machine), None, 0, 8, active=active)
    pol.rate = DecayedRate(0.0, 10.0)
    for _ in range(PROBE_EVERY):
        assert not pol.model_round_pays(room)
        pol.note_model_round(ran=False)
    pol.behind = behind
    assert pol.model_round_pays(room) == want


def _probe(pol: SpecPolicy, accepted: int, drafted: int = 4) -> None:
    """Decline rounds until a probe is due, then run it: `accepted` of `drafted` tokens."""
    while not pol.model_round_pays(100):
        pol.note_model_round(ran=False)
    pol.note_model_round(ran=True)
    pol.observe([0.5] * drafted, accepted)


def test_probe_odds_count_the_probes_that_found_text_the_model_pays_on():
    """Each probe that leaves the estimate unpaid lowers the odds a probe is judged at; one
    that finds the model paying raises them. Every probe counts alike (no decay)."""
    pol = SpecPolicy(costs(), None, 0, 8)
    pol.rate = DecayedRate(0.0, 10.0)
    assert pol.probes.value == 0.5
    for n in range(1, 6):
        _probe(pol, accepted=0)
        assert pol.probes.value == pytest.approx(1 / (2 + n))
    pol.rate = DecayedRate(0.0, 3.0)     # the text turned predictable: the next probe finds it
    _probe(pol, accepted=4)
    assert pol.model_pays_estimate() and pol.probes.value == pytest.approx(2 / 8)
    pol.observe([0.9] * 4, 4)            # rounds the estimate backs are not probes
    assert pol.probes.value == pytest.approx(2 / 8)


@pytest.mark.parametrize("found,probes,want", [
    (1.0, 2.0, True),     # even odds: half the best case's saving repays a catch-up of 0.3 of it
    (1.0, 7.0, False),    # after five failed probes, 1/7 of it is not
    (6.0, 7.0, True),     # probes that kept finding paying text
], ids=["even", "failing", "finding"])
def test_a_probe_is_a_bet_on_the_odds_that_it_finds_text_the_model_pays_on(found, probes, want):
    """A probe stakes the catch-up (`behind` tokens) against the best case's saving over the
    room left, times the odds from the probes before it."""
    from edge_ssd.policy import PROBE_EVERY, PROBE_RATE

    pol = SpecPolicy(costs(), None, 0, 8)
    pol.rate = DecayedRate(0.0, 10.0)
    pol.probes = DecayedRate(found, probes, decay=1.0)
    for _ in range(PROBE_EVERY):
        pol.note_model_round(ran=False)
    best = pol.saving(100, PROBE_RATE)
    pol.behind = round(0.3 * best / pol.costs.catchup_token)   # the catch-up: 0.3 of the best case's saving
    assert pol.model_round_pays(100) == want


@pytest.mark.parametrize("behind,room,want", [
    (1, 100, True),        # caught up: the estimate alone decides
    (2000, 100, False),    # 2 s of catch-up against ≈ 0.7 s the next 100 tokens could save
    (2000, 1000, True),    # ... which a 1000-token answer repays
], ids=["caught-up", "long-catch-up", "long-answer"])
def test_a_model_round_that_pays_still_repays_its_catch_up(behind, room, want):
    """A draft the estimate backs (acceptance 0.9, a step a fifth of the target's) runs only
    when the time it saves over the room left repays feeding it what it missed: a prompt it
    did not prefill is 2000 tokens behind, 2 s at 1 ms a token."""
    pol = SpecPolicy(costs(), None, 0, 8)
    pol.rate = DecayedRate(9.0, 10.0)
    assert pol.model_pays_estimate()
    pol.behind = behind
    assert pol.model_round_pays(room) == want


@pytest.mark.parametrize("machine,hits,prompt,room,want", [
    ({}, 9.0, 50, 100, True),           # a draft that pays, a short prompt: the first round drafts
    ({}, 9.0, 2000, 100, False),        # 2 s of prefill is more than 100 tokens could win back
    ({}, 9.0, 2000, 1000, True),        # ... but not more than 1000 could
    (AVX2, 0.0, 200, 1023, False),      # the estimate cannot argue for it: a probe may catch it up later
    (AVX512, 9.0, 200, 127, False),     # a draft that barely pays there cannot repay 200 tokens
], ids=["pays-short", "pays-long-prompt", "pays-long-answer", "avx2-unpaid", "avx512"])
def test_the_draft_takes_the_prompt_only_where_it_may_pay(machine, hits, prompt, room, want):
    """`hits` of 10 tokens accepted lately: the draft prefills exactly when the first round
    would draft with the whole prompt behind."""
    pol = SpecPolicy(costs(**machine), None, 0, 8)
    pol.rate = DecayedRate(hits, 10.0)
    assert pol.model_pays_estimate() == (hits > 0)
    assert pol.model_may_pay(room, prompt) == want
    pol.behind = prompt
    assert pol.model_round_pays(room) == want


def test_the_loop_counts_what_the_draft_missed():
    """`behind` is what a probe would feed the draft: every token since its last drafted round."""
    pol = SpecPolicy(costs(), None, 0, 8)
    pol.advance(1, by_model=False)
    pol.advance(4, by_model=False)   # a lookup round: three accepted and the target's own
    assert pol.behind == 5
    pol.advance(3, by_model=True)
    assert pol.behind == 1


# -- model-free drafting: predictions and the suffix cache ------------------------------------
from edge_ssd.lookup import KEY, PredictionDrafter, SuffixCacheDrafter, TokenStore  # noqa: E402


@pytest.mark.parametrize("docs,seq,want", [
    ([[1, 2, 3, 4, 5, 6]], [9, 1, 2, 3], [4, 5, 6]),                   # one match: its continuation
    ([[1, 2, 3, 4, 5], [1, 2, 3, 4, 7], [1, 2, 3, 4, 5]], [1, 2, 3], [4, 5]),  # majority per position
    ([[1, 2, 3, 4], [1, 2, 3, 5]], [1, 2, 3], []),                      # a split vote: no proposal
    ([[8, 1, 2, 3, 4], [9, 1, 2, 3, 5]], [9, 1, 2, 3], [5]),            # the longer suffix decides
    ([[1, 2, 3]], [1, 2, 3], []),                                        # nothing followed it
])
def test_token_store_votes_on_continuations(docs, seq, want):
    store = TokenStore(capacity=64)
    for d in docs:
        store.add(d)
    assert store.vote(store.matches(seq), 8) == want


def test_token_store_stays_within_its_capacity():
    store = TokenStore(capacity=256)
    for i in range(100):
        store.add([1000 + i, 2000 + i, 3000 + i, 4000 + i, 5000 + i])
    assert store.n <= 256 and sum(len(v) for v in store.index.values()) <= 256
    assert store.vote(store.matches([1099, 2099, 3099]), 2) == [4099, 5099]   # the newest is kept
    assert store.vote(store.matches([1000, 2000, 3000]), 2) == []             # the oldest is gone


def rnd(k: int = 8) -> DraftRound:
    return DraftRound(room=k, k_limit=k, sampling=SamplingParams(), rng=np.random.default_rng(0))


def test_prediction_starts_at_its_head_and_realigns_after_an_edit():
    pred = [10, 11, 12, 13, 14, 15, 16, 17, 18, 19]
    d = PredictionDrafter(pred)
    d.start([1, 2])
    assert d.propose([1, 2], rnd(4)).tokens == [10, 11, 12, 13]
    # the output replaced 13 with 99, then went on as predicted: the drafter finds its place again
    seq = [1, 2, 10, 11, 12, 99, 14, 15, 16]
    assert d.propose(seq, rnd(3)).tokens == [17, 18, 19]


@pytest.mark.parametrize("edit", [None, 20, 45])
def test_a_prediction_drafts_the_output_losslessly(edit):
    want, _ = run(FakeLM(), None, n=80)
    pred = list(want)
    if edit is not None:
        pred[edit] = (pred[edit] + 1) % 64  # the output is not quite what was predicted
    target = FakeLM()
    got, stats = run(target, AutoDrafter(None, [PredictionDrafter(pred), NgramDrafter()]), n=80)
    assert got == want
    p = stats.sources["prediction"]
    assert p[2] > 0.8 * 80 - 10, stats.sources   # most tokens came from the prediction


def test_the_suffix_cache_drafts_a_repeated_request():
    store = TokenStore()
    want, _ = run(FakeLM(), None, n=60)
    store.add(want)
    target = FakeLM()
    got, stats = run(target, AutoDrafter(None, [SuffixCacheDrafter(store)]), n=60)
    assert got == want and stats.sources["suffix"][2] > 40
    assert KEY >= 2
