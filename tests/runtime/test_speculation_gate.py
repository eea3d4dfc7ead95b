"""`SpeculationGate`: speculation falls back to plain one-token steps while it measures slower, deterministically
from the measurements, and the loop's plain steps commit exactly what speculative steps would."""
from __future__ import annotations

import numpy as np
import pytest

from elision.runtime.generation.drafters import CombinedDrafter, NoDrafter, PromptLookupDrafter
from elision.runtime.generation.loop import DecodeOptions, decode
from elision.runtime.generation.ort_session_base import BatchedTreeSession
from elision.runtime.generation.speculation_gate import SpeculationGate


def _drive(gate: SpeculationGate, spec_rate: float, plain_rate: float, steps: int) -> list[bool]:
    """The gate's choices when a speculative step makes `spec_rate` tokens/s and a plain one `plain_rate`."""
    kinds = []
    for _ in range(steps):
        spec = gate.speculate()
        kinds.append(spec)
        gate.record(spec, 2 if spec else 1, (2 / spec_rate) if spec else (1 / plain_rate))
    return kinds


def test_losing_speculation_backs_off_to_plain_steps_exponentially():
    kinds = _drive(SpeculationGate(probe=4, max_backoff=32), spec_rate=500.0, plain_rate=1000.0, steps=200)
    assert kinds[:4] == [True] * 4 and kinds[4:8] == [False] * 4  # probe, then the plain rate's measurement
    runs, current = [], None
    for k in kinds:
        if k != current:
            runs.append([k, 0])
            current = k
        runs[-1][1] += 1
    plain_runs = [n for k, n in runs if not k][1:-1]
    assert plain_runs[:3] == [4, 8, 16] and set(plain_runs[3:]) == {32}  # doubled, up to the cap
    assert all(n == 4 for k, n in runs if k)  # speculation only ever probed
    assert sum(kinds) / len(kinds) < 0.2


def test_winning_speculation_stays_on():
    kinds = _drive(SpeculationGate(probe=4), spec_rate=2000.0, plain_rate=1000.0, steps=100)
    assert kinds[4:8] == [False] * 4 and all(kinds[8:])


def test_choices_are_a_function_of_the_measurements():
    a = _drive(SpeculationGate(), spec_rate=900.0, plain_rate=1000.0, steps=300)
    b = _drive(SpeculationGate(), spec_rate=900.0, plain_rate=1000.0, steps=300)
    assert a == b
    gate = SpeculationGate()
    gate.record(True, 0, 1.0)  # nothing committed: nothing learnt, the phase does not advance
    assert gate.rates == {True: None, False: None} and gate.left == gate.probe
    with pytest.raises(ValueError, match="bad gate settings"):
        SpeculationGate(probe=0)


class _Oracle(BatchedTreeSession):
    """A deterministic 'model': the next token after t is (3 t + 1) mod V, with one logit per row."""

    V = 50

    def __init__(self, batch: int):
        super().__init__(batch)
        self.kv = np.zeros((1, batch, 1, 512, 1), np.float32)

    def _run(self, batch, first):
        rows = self._rows_of(batch, first)
        logits = np.zeros(batch.tokens.shape + (self.V,), np.float32)
        np.put_along_axis(logits, ((3 * batch.tokens + 1) % self.V)[..., None], 1.0, axis=-1)
        self._starts[rows], self._rows = self.lengths[rows], rows
        return logits

    def commit(self, keep):
        for i, nodes in enumerate(keep):
            self.lengths[self._rows.start + i] = self._starts[self._rows.start + i] + len(nodes)

    def rollback(self):
        self.lengths[self._rows] = self._starts[self._rows]


@pytest.mark.parametrize("drafter", [NoDrafter, PromptLookupDrafter], ids=["none", "lookup"])
@pytest.mark.parametrize("gated", [False, True])
def test_plain_and_gated_steps_commit_the_models_greedy_tokens(drafter, gated):
    prompts = [[1, 2, 3, 4, 1, 2], [7, 8]]
    want = []
    for p in prompts:
        t, out = p[-1], []
        for _ in range(40):
            t = (3 * t + 1) % _Oracle.V
            out.append(t)
        want.append(out)
    outcome = decode(_Oracle(2), prompts, CombinedDrafter([drafter()]), DecodeOptions(40, speculation_gate=gated))
    assert outcome.outputs == want
    stats = outcome.stats
    if drafter is NoDrafter:  # a drafter that never proposes runs plain steps only, gate or not
        assert stats["plain_steps"] == stats["verify_steps"] and stats["mean_tree_size"] == 1.0
    elif not gated:
        assert stats["plain_steps"] == 0


def test_a_gate_switching_mid_generation_keeps_the_tokens():
    """Plain phases between speculative ones (the gate forced to lose: its plain rate set far above any real one)."""
    from elision.runtime.generation.loop import DecodeBatch

    prompts = [[1, 2, 3, 4, 1, 2, 3, 4, 1, 2], [7, 8, 7, 8, 7]]
    reference = decode(_Oracle(2), prompts, PromptLookupDrafter(), DecodeOptions(60)).outputs
    opts = DecodeOptions(60, speculation_gate=True)
    batch = DecodeBatch(_Oracle(2), PromptLookupDrafter(), opts, 2)
    batch.start(prompts, [opts.sequence()] * 2)
    batch.gate.rates[False] = 1e12  # plain "always faster": every phase after a probe is plain
    while any(batch.active):
        batch.step()
    assert batch.outputs == reference
    assert 0 < batch.plain_steps < batch.steps and batch.gate.switches >= 2  # to plain and back
