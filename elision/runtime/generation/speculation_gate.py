"""When speculation does not pay, decode plainly: the policy that keeps a drafter from losing to the plain step.

A speculative step costs more than a plain one-token step (a wider forward, drafting, verification and drafter
feedback) and gains 1 + the accepted draft tokens. On text the drafter predicts badly (or on a model so small that
drafting costs as much as its forward) it gains too little to cover that, and plain decoding is faster. The
tree-size choice (`choose_tree_size`) cannot see this: it weighs the forward's cost against the drafter's own
acceptance estimates, not against the drafting and bookkeeping time around it.

`SpeculationGate` measures both instead: tokens gained per second of whole steps, an exponential moving average
per kind of step, and runs whichever is faster, in phases:

    probe (speculate `probe` steps) -> plain `probe` steps, the plain rate's first measurement ->
    speculate `probe` steps -> faster? speculate `probe` more : plain `backoff` steps, backoff doubled (<= max) ->
    after a plain phase, speculate `probe` steps again (acceptance changes with the text) ...

A speculative phase that wins resets the backoff. Given the same measurements the choices are the same (no
randomness, no clock of its own); the tokens never depend on them: a plain step commits exactly what a
speculative step's root would (greedy: the argmax; sampling: the same draw from the root's distribution).
"""
from __future__ import annotations

__all__ = ["SpeculationGate"]


class SpeculationGate:
    def __init__(self, probe: int = 4, max_backoff: int = 64, smoothing: float = 0.3):
        if probe < 1 or max_backoff < probe or not 0.0 < smoothing <= 1.0:
            raise ValueError(f"bad gate settings: probe={probe}, max_backoff={max_backoff}, smoothing={smoothing}")
        self.probe, self.max_backoff, self.smoothing = probe, max_backoff, smoothing
        self.rates: dict[bool, float | None] = {True: None, False: None}  # speculative? -> tokens per second
        self.speculative = True  # the kind of the current phase
        self.left = probe  # steps left in it
        self.backoff = probe  # length of the next plain phase after a speculative phase that lost
        self.switches = 0  # phases that changed the kind of step (for stats and tests)

    def speculate(self) -> bool:
        """Whether the next step speculates."""
        return self.speculative

    def record(self, speculative: bool, tokens: float, seconds: float) -> None:
        """A step of this kind committed `tokens` (per sequence of the batch, as `DecodeBatch` counts) in `seconds`."""
        if tokens <= 0 or seconds <= 0.0:
            return  # nothing learnt (every sequence had just finished, or a clock that did not move)
        rate, old = tokens / seconds, self.rates[speculative]
        self.rates[speculative] = rate if old is None else old + self.smoothing * (rate - old)
        if speculative != self.speculative:
            return  # a step the caller ran outside the current phase: measured, not counted
        self.left -= 1
        if self.left <= 0:
            self._next_phase()

    def _next_phase(self) -> None:
        spec, plain = self.rates[True], self.rates[False]
        if not self.speculative:
            self._enter(True, self.probe)  # probe speculation again: acceptance changes with the text
        elif plain is None:
            self._enter(False, self.probe)  # the plain rate is not known yet: measure it
        elif spec is not None and spec >= plain:
            self.backoff = self.probe
            self._enter(True, self.probe)
        else:
            self._enter(False, self.backoff)
            self.backoff = min(2 * self.backoff, self.max_backoff)

    def _enter(self, speculative: bool, steps: int) -> None:
        self.switches += speculative != self.speculative
        self.speculative, self.left = speculative, steps
