"""FastestOf: checks candidates against the reference, warms up, times, lets `choose_route` decide (deterministic
given the timings: plain inductor unless another route is faster by a margin), records why; re-runnable graphs."""
from __future__ import annotations

import time

import pytest
import torch

from elision.apps.compile.records import GraphRecord
from elision.apps.compile.select import MARGIN, FastestOf, choose_route, graph_is_rerunnable, outputs_match


def _slow(fn, seconds):
    def call(*args):
        time.sleep(seconds)
        return fn(*args)

    return call


def test_keeps_the_fastest_matching_candidate_and_records_the_medians():
    record = GraphRecord("#t", "torch")
    exact = lambda x: (x * 2,)  # noqa: E731
    runner = FastestOf({"eager": _slow(exact, 0.02), "fast": exact, "slow": _slow(exact, 0.04)}, record,
                       budget_s=0.0, min_rounds=3)
    x = torch.randn(4)
    torch.testing.assert_close(runner(x)[0], x * 2)
    assert runner.chosen == "fast" and record.runs == "fast"
    assert set(record.timings_ms) == {"eager", "fast", "slow"}
    assert record.timings_ms["fast"] < record.timings_ms["eager"] < record.timings_ms["slow"]
    # no inductor among them: eager is the default route, and "fast" beats it by far more than the margin
    assert record.ratios["eager"] == 1.0 and record.ratios["fast"] < 1 - MARGIN < record.ratios["slow"]
    assert record.reason.startswith("fast: ") and "the speed of eager" in record.reason and record.fallback is None
    assert record.selection_seconds > 0 and record.as_dict()["ratios"] == record.ratios
    # later calls go straight to the winner, whatever the input
    torch.testing.assert_close(runner(torch.ones(3))[0], torch.full((3,), 2.0))


def test_a_candidate_that_changes_the_numbers_is_dropped_even_when_faster():
    record = GraphRecord("#t", "torch")
    runner = FastestOf({"eager": _slow(lambda x: (x.exp(),), 0.01), "wrong": lambda x: (x.exp() * 1.01,)}, record,
                       budget_s=0.0)
    x = torch.randn(8)
    torch.testing.assert_close(runner(x)[0], x.exp())
    assert record.runs == "eager"
    assert "output differs from eager" in record.dropped["wrong"]


def test_a_candidate_that_raises_is_dropped_and_strict_raises_instead():
    def broken(x):
        raise RuntimeError("no kernel for this shape")

    record = GraphRecord("#t", "torch")
    runner = FastestOf({"eager": lambda x: (x + 1,), "broken": broken}, record)
    torch.testing.assert_close(runner(torch.zeros(2))[0], torch.ones(2))
    assert record.runs == "eager" and "no kernel for this shape" in record.dropped["broken"]
    strict = FastestOf({"eager": lambda x: (x + 1,), "broken": broken}, GraphRecord("#s", "torch"), strict=True)
    with pytest.raises(RuntimeError, match="no kernel for this shape"):
        strict(torch.zeros(2))


def test_unmeasured_runner_calls_only_the_first_candidate_that_runs():
    calls = []

    def first(x):
        calls.append("first")
        return (x,)

    def second(x):
        calls.append("second")
        return (x,)

    record = GraphRecord("#t", "torch")
    runner = FastestOf({"first": first, "second": second}, record, reference=None, measure=False)
    runner(torch.zeros(1))
    runner(torch.zeros(1))
    assert calls == ["first", "first"] and record.runs == "first" and not record.timings_ms


@pytest.mark.parametrize("fn, x, expected", [
    (lambda x: torch.nn.functional.dropout(x.relu(), 0.1, False) * 2, torch.ones(4), True),  # eval dropout: identity
    (lambda x: (x & 1) | 2, torch.ones(4, dtype=torch.int64), True),  # and_/or_: not in-place despite the underscore
    (lambda x: x.add_(1), torch.ones(4), False),
    (lambda x: torch.nn.functional.dropout(x, 0.1, True), torch.ones(4), False),
    (lambda x: x + torch.randn_like(x), torch.ones(4), False),
], ids=["eval-dropout", "bitwise-operators", "in-place", "train-dropout", "random"])
def test_graph_is_rerunnable(fn, x, expected):
    seen = []

    def backend(gm, example_inputs):
        seen.append(graph_is_rerunnable(gm))
        return gm.forward

    torch._dynamo.reset()
    torch.compile(fn, backend=backend)(x)
    assert seen == [expected]


def test_outputs_match_uses_the_dtype_tolerance_relative_to_the_output_scale():
    want = (torch.full((3,), 1000.0),)
    assert outputs_match((want[0] + 0.05,), want) is None  # 5e-5 relative: within float32's 1e-4
    assert "differs by" in outputs_match((want[0] + 0.5,), want)
    assert "shape" in outputs_match((torch.zeros(4),), want)
    assert "differs" in outputs_match((torch.tensor([1, 2]),), (torch.tensor([1, 3]),))
    assert "differs by nan" in outputs_match((torch.tensor([float("nan")]),), (torch.tensor([1.0]),))


# ---------------------------------------------------------------- the decision, from given timings (seconds)
def test_choose_route_keeps_inductor_when_the_alternative_is_a_coin_flip():
    # issue 13: first-call medians 26.26 ms (elision+inductor) vs 26.36 ms (inductor) chose elision+inductor
    samples = {"eager": [0.0287, 0.0286, 0.0288], "elision+inductor": [0.02626, 0.02610, 0.02640],
               "inductor": [0.02636, 0.02630, 0.02641], "elision": [0.0335, 0.0336, 0.0334]}
    choice = choose_route(samples)
    assert choice.runs == "inductor" and choice.baseline == "inductor"
    assert choice.reason.startswith("inductor (default route)")
    assert choice.ratios["inductor"] == 1.0 and 1 - MARGIN < choice.ratios["elision+inductor"] < 1.0
    assert choice.medians_s["eager"] == 0.0287


def test_choose_route_takes_a_route_measurably_faster_than_inductor():
    samples = {"inductor": [0.010, 0.011, 0.010, 0.012, 0.010], "elision+inductor": [0.008, 0.009, 0.008, 0.009, 0.008],
               "eager": [0.009, 0.0105, 0.0095, 0.0115, 0.0098]}
    choice = choose_route(samples)
    assert choice.runs == "elision+inductor" and choice.baseline == "inductor"
    assert choice.ratios["elision+inductor"] == pytest.approx(0.8)
    assert choice.reason.startswith("elision+inductor: 1.25x the speed of inductor")


def test_choose_route_pairs_rounds_so_load_drift_and_spikes_do_not_decide():
    # the machine got 3x slower after round 2: eager is 8% faster than inductor in every round
    inductor = [0.010, 0.010, 0.030, 0.030, 0.030]
    assert choose_route({"inductor": inductor, "eager": [0.0092, 0.0092, 0.0276, 0.0276, 0.0276]}).runs == "eager"
    # inductor hit by load spikes in two rounds of five: eager is no faster in the other three, inductor stays
    spiky = [0.010, 0.030, 0.010, 0.030, 0.010]
    choice = choose_route({"inductor": spiky, "eager": [0.010, 0.010, 0.010, 0.010, 0.0102]})
    assert choice.runs == "inductor" and choice.ratios["eager"] == 1.0
    # faster round by round but not overall (issue 13, MiniLM b1 on a loaded machine): not measurably faster
    noisy = {"inductor": [0.8, 0.9, 0.8, 3.0, 3.0], "elision+inductor": [0.7, 0.8, 1.1, 2.5, 2.8]}
    choice = choose_route(noisy)
    assert choice.ratios["elision+inductor"] < 1 - MARGIN and choice.medians_s["elision+inductor"] > 0.9
    assert choice.runs == "inductor"


def test_choose_route_is_deterministic_and_breaks_ties_by_order():
    samples = {"inductor": [1.0, 1.0, 1.0], "elision": [0.5, 0.5, 0.5], "eager": [0.5, 0.5, 0.5]}
    first = choose_route(samples)
    assert first == choose_route(dict(samples)) and first.runs == "elision"
    assert choose_route({"inductor": [1.0], "eager": [0.5], "elision": [0.5]}).runs == "eager"
    # a margin of 60% leaves the default route in place
    assert choose_route(samples, margin=0.6).runs == "inductor"


def test_choose_route_default_without_inductor_follows_the_preference_then_the_order():
    assert choose_route({"elision": [0.9], "elision+inductor": [1.0]}).baseline == "elision+inductor"
    assert choose_route({"elision": [0.99], "elision+inductor": [1.0]}).runs == "elision+inductor"
    assert choose_route({"b": [1.0], "a": [0.99]}).runs == "b"
    with pytest.raises(ValueError, match="at least one route"):
        choose_route({})
    with pytest.raises(ValueError, match="at least one timed round"):
        choose_route({"inductor": []})


def test_fastest_of_warms_up_every_candidate_before_the_timed_rounds():
    calls = {"eager": 0, "inductor": 0}

    def counting(name):
        def call(x):
            calls[name] += 1
            return (x + 1,)

        return call

    record = GraphRecord("#t", "torch")
    runner = FastestOf({n: counting(n) for n in calls}, record, budget_s=0.0, min_rounds=4, max_rounds=4, warmup=2)
    runner(torch.zeros(2))
    assert calls == {"eager": 1 + 2 + 4, "inductor": 1 + 2 + 4}  # first (checked) call, warm-up, timed rounds
    assert record.runs in calls and record.reason and set(record.ratios) == set(calls)
    runner(torch.zeros(2))
    assert calls[record.runs] == 8
