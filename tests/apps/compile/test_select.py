"""FastestOf: checks candidates against the reference, keeps the fastest, records why; re-runnable graphs."""
from __future__ import annotations

import time

import pytest
import torch

from elision.apps.compile.records import GraphRecord
from elision.apps.compile.select import FastestOf, graph_is_rerunnable, outputs_match


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
    assert record.reason.startswith("fastest of") and record.fallback is None
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
