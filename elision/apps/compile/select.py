"""Run the fastest of several equivalent implementations of one graph, decided on the first call.

The torch target has several ways to run a graph: elision's rewritten graph compiled by inductor, plain
inductor on the unrewritten graph, elision's rewritten graph on eager PyTorch, and the graph as given (eager).
Which is fastest depends on the model, the shapes and the machine (on CPU inductor can lose to eager), so
`FastestOf` measures instead of guessing: on the first call it runs every candidate once (this is where lazy
compilation happens) and checks each output against the reference candidate (a rewrite that changes the numbers
beyond the dtype's tolerance is dropped, loudly); then it calls each survivor once more untimed (warm-up:
allocator, caches, lazily initialised kernels), times them in interleaved rounds on those same arguments, and
hands the samples to `choose_route`. Every later call goes straight to the winner.

`choose_route` is deliberately conservative: the default route is the preferred one (plain inductor when it ran,
the route `torch.compile(backend="inductor")` gives), and another route replaces it only when it is faster by
more than `margin`, both in the median of per-round time ratios and in its median time. Per-round ratios pair
each sample with the preferred route's sample of the same round, so load drift on a shared machine cancels out;
a route that is only as fast within noise (a coin flip), or faster by one statistic only, never displaces the
default.

Measuring runs the graph several times, so it is only done for graphs that are safe to re-run (no input
mutation, no random ops: see `graph_is_rerunnable`); other graphs take the first candidate that runs.
"""
from __future__ import annotations

import operator
import statistics
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from elision.apps.compile.numerics import REL_TOLERANCE
from elision.apps.compile.records import GraphRecord

__all__ = ["FastestOf", "Choice", "choose_route", "graph_is_rerunnable", "outputs_match", "PREFERENCE", "MARGIN"]

# the default route when several ran, best first: plain inductor is what `backend="inductor"` would run
PREFERENCE = ("inductor", "elision+inductor", "eager", "elision")
# how much faster (median of per-round ratios) another route must be to replace the default one
MARGIN = 0.05

# random / in-place ops that make re-running a graph observable
_RANDOM = ("dropout", "rand", "randn", "randint", "randperm", "bernoulli", "normal", "uniform", "multinomial",
           "exponential", "geometric", "cauchy", "log_normal", "rrelu", "native_dropout", "seed")


def _inference_dropout(node: torch.fx.Node) -> bool:
    """F.dropout(x, p, training=False): the identity (what every eval-mode Hugging Face layer records)."""
    training = node.kwargs.get("training", node.args[2] if len(node.args) > 2 else True)
    return training is False


def graph_is_rerunnable(gm: torch.fx.GraphModule) -> bool:
    """True when running `gm` twice on the same inputs has no effect beyond returning the same outputs.

    Conservative: an in-place op (a method or torch function whose name ends in `_`, a mutable aten op), an
    in-place Python operator (`x[i] = y`, `x += y`), or a random op makes it False.
    """
    in_place_operators = {operator.setitem, operator.delitem, operator.iadd, operator.isub, operator.imul,
                          operator.itruediv, operator.ifloordiv, operator.imod, operator.ipow, operator.iand,
                          operator.ior, operator.ixor, operator.ilshift, operator.irshift, operator.imatmul}
    for node in gm.graph.nodes:
        if node.op not in ("call_function", "call_method"):
            continue
        target = node.target
        if node.op == "call_function" and getattr(target, "__module__", None) in ("_operator", "operator"):
            if target in in_place_operators:
                return False
            continue  # and_, or_, getitem, ...: pure
        if isinstance(target, torch._ops.OpOverload):
            if target._schema.is_mutable:
                return False
            name = target._schema.name.split("::")[-1]
        else:
            name = target if isinstance(target, str) else (getattr(target, "__name__", None) or str(target))
        if name.endswith("_") and not name.endswith("__"):
            return False
        if "dropout" in name:
            if _inference_dropout(node):
                continue
            return False
        if name.removesuffix("_like") in _RANDOM:
            return False
    return True


def _flat_tensors(out: Any) -> list[torch.Tensor]:
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _flat_tensors(o)]
    if isinstance(out, Mapping):
        return [t for o in out.values() for t in _flat_tensors(o)]
    return []


def outputs_match(got: Any, want: Any) -> str | None:
    """None when every tensor of `got` matches `want` within the dtype tolerance, else a one-line difference."""
    a, b = _flat_tensors(got), _flat_tensors(want)
    if len(a) != len(b):
        return f"{len(a)} output tensors, expected {len(b)}"
    for i, (x, y) in enumerate(zip(a, b)):
        if tuple(x.shape) != tuple(y.shape):
            return f"output {i} has shape {tuple(x.shape)}, expected {tuple(y.shape)}"
        if not y.dtype.is_floating_point:
            if not torch.equal(x.detach().cpu(), y.detach().cpu()):
                return f"output {i} ({y.dtype}) differs"
            continue
        diff = float((x.detach().double() - y.detach().double()).abs().max()) if y.numel() else 0.0
        scale = float(y.detach().double().abs().max()) if y.numel() else 0.0
        tol = REL_TOLERANCE.get(y.dtype, 1e-4)
        if diff != diff or diff > tol * max(scale, 1.0):  # NaN, or beyond tolerance relative to the output scale
            return f"output {i} differs by {diff:.3g} (max |reference| {scale:.3g}, tolerance {tol:g} relative)"
    return None


@dataclass(frozen=True)
class Choice:
    """What `choose_route` picked: the route, the default it was measured against, the evidence, why."""

    runs: str
    baseline: str
    medians_s: dict[str, float]  # per-route median of its samples, seconds
    ratios: dict[str, float]  # per-route median of (route sample / baseline sample) over the rounds
    reason: str


def choose_route(samples: Mapping[str, Sequence[float]], preference: Sequence[str] = PREFERENCE,
                 margin: float = MARGIN) -> Choice:
    """The route to run, given interleaved-round timings (`samples[name][i]`: seconds of round i).

    Deterministic in `samples`. The baseline is the first route of `preference` that was measured (else the first
    measured route); another route wins only if both its median per-round ratio to the baseline and its median
    time relative to the baseline's are below `1 - margin`, the lowest ratio winning (ties: the order of `samples`).
    """
    if not samples:
        raise ValueError("choose_route needs the timings of at least one route")
    names = list(samples)
    rounds = min(len(s) for s in samples.values())
    if rounds == 0:
        raise ValueError("choose_route needs at least one timed round per route")
    baseline = next((n for n in preference if n in samples), names[0])
    base = samples[baseline]
    medians = {n: statistics.median(samples[n]) for n in names}
    ratios = {n: statistics.median([samples[n][i] / base[i] if base[i] > 0 else 1.0 for i in range(rounds)])
              for n in names}
    ratios[baseline] = 1.0
    # measurably faster: by the margin both round by round (median ratio) and overall (median time); on a noisy
    # machine the two can disagree, and then the default route stays
    challengers = [n for n in names if n != baseline and ratios[n] < 1.0 - margin
                   and medians[n] < (1.0 - margin) * medians[baseline]]
    if not challengers:
        return Choice(baseline, baseline, medians, ratios,
                      f"{baseline} (default route): no other route was more than {margin:.0%} faster over {rounds} rounds")
    best = min(challengers, key=lambda n: (ratios[n], names.index(n)))
    return Choice(best, baseline, medians, ratios,
                  f"{best}: {1 / ratios[best]:.2f}x the speed of {baseline} (median of {rounds} interleaved rounds; "
                  f"needs more than {margin:.0%} to replace the default route)")


class FastestOf:
    """Calls one of `candidates` (name -> callable, all computing the same thing), chosen on the first call.

    reference: the candidate whose output the others are checked against (None: no check). measure: time the
    candidates (False: take the first that runs). strict: a candidate that fails or differs raises instead of
    being dropped. Timing: `warmup` untimed calls each, then interleaved rounds until `min_rounds` are done and
    `budget_s` is spent (at most `max_rounds`); `choose_route(..., margin=margin)` decides. The decision, the
    timings and the seconds the selection took land in `record`.
    """

    def __init__(self, candidates: Mapping[str, Callable], record: GraphRecord, *, reference: str | None = "eager",
                 measure: bool = True, strict: bool = False, budget_s: float = 3.0, min_rounds: int = 7,
                 max_rounds: int = 25, warmup: int = 1, margin: float = MARGIN) -> None:
        if not candidates:
            raise ValueError("FastestOf needs at least one candidate")
        self.candidates = dict(candidates)
        self.record = record
        self.reference = reference if reference in self.candidates else None
        self.measure = measure
        self.strict = strict
        self.budget_s = budget_s
        self.min_rounds = min_rounds
        self.max_rounds = max_rounds
        self.warmup = warmup
        self.margin = margin
        self.chosen: str | None = None
        self._fn: Callable | None = None
        record.candidates = list(self.candidates)

    def __call__(self, *args):
        fn = self._fn
        if fn is None:
            return self._choose(args)
        return fn(*args)

    # ------------------------------------------------------------------ the first call
    def _drop(self, name: str, why: str) -> None:
        if self.strict:
            raise RuntimeError(f"elision backend: candidate {name} of graph {self.record.graph_id}: {why}")
        self.record.dropped[name] = why

    def _choose(self, args: Sequence[Any]):
        if not self.measure:
            return self._first_that_runs(args)
        outputs: dict[str, Any] = {}
        order = ([self.reference] if self.reference else []) + [n for n in self.candidates if n != self.reference]
        for name in order:
            try:
                start = time.perf_counter()
                outputs[name] = self.candidates[name](*args)
                self.record.first_call_seconds[name] = round(time.perf_counter() - start, 3)
            except Exception as e:  # a candidate that cannot run (compile error, unsupported op) is dropped
                self._drop(name, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
        if self.reference and self.reference in outputs:
            want = outputs[self.reference]
            for name in list(outputs):
                if name == self.reference:
                    continue
                why = outputs_match(outputs[name], want)
                if why is not None:
                    self._drop(name, f"output differs from {self.reference}: {why}")
                    del outputs[name]
        if not outputs:
            raise RuntimeError(f"no candidate of graph {self.record.graph_id} could run: {self.record.dropped}")
        alive = [n for n in order if n in outputs]
        if len(alive) > 1:
            start = time.perf_counter()
            choice = choose_route(self._time(alive, args), margin=self.margin)
            self.record.selection_seconds = round(time.perf_counter() - start, 3)
            self.record.timings_ms = {n: choice.medians_s[n] * 1e3 for n in alive}
            self.record.ratios = dict(choice.ratios)
            best = choice.runs
            self.record.reason = choice.reason
        else:
            best = alive[0]
            self.record.reason = "only candidate that ran"
        self._settle(best)
        return outputs[best]

    def _first_that_runs(self, args: Sequence[Any]):
        for name, fn in self.candidates.items():
            try:
                out = fn(*args)
            except Exception as e:
                self._drop(name, f"{type(e).__name__}: {str(e).strip().splitlines()[0][:300] if str(e).strip() else ''}")
                continue
            self.record.reason = "first candidate that ran (graph not re-runnable, so not timed)" \
                if len(self.candidates) > 1 else "only candidate"
            self._settle(name)
            return out
        raise RuntimeError(f"no candidate of graph {self.record.graph_id} could run: {self.record.dropped}")

    def _time(self, names: list[str], args: Sequence[Any]) -> dict[str, list[float]]:
        """Warm-up calls, then interleaved rounds (so machine-load drift hits every candidate alike, and the
        order alternates so none always follows the same neighbour); per-candidate samples in seconds."""
        for name in names:
            for _ in range(self.warmup):
                self.candidates[name](*args)
        samples: dict[str, list[float]] = {n: [] for n in names}
        start = time.perf_counter()
        for round_ in range(self.max_rounds):
            for name in (names if round_ % 2 == 0 else reversed(names)):
                fn = self.candidates[name]
                t0 = time.perf_counter()
                fn(*args)
                samples[name].append(time.perf_counter() - t0)
            if round_ + 1 >= self.min_rounds and time.perf_counter() - start > self.budget_s:
                break
        return samples

    def _settle(self, name: str) -> None:
        self.chosen = name
        self._fn = self.candidates[name]
        self.record.runs = name
        # the losers (compiled code, graphs) are no longer needed
        self.candidates = {name: self._fn}
