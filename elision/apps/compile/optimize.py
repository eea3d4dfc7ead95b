"""Elision's rewrites on one Dynamo graph: import into the IR, run the pipeline, emit FX again.

`optimize_graph(gm, example_inputs, passes)` is the one switch point between "graph as Dynamo gave it" and
"graph through elision's IR". The rewritten graph holds the model's parameters as its own attributes (the
passes fold and fuse them, e.g. concatenated q/k/v weights), so it is called with Dynamo's arguments minus the
parameter positions. It is valid only while those parameters are the same tensors with the same contents:
`OptimizedGraph.guard` wraps a callable of the rewritten graph so that a replaced or in-place modified
parameter routes the call to the graph as Dynamo gave it (which reads the live parameters), loudly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from elision.apps.compile.records import GraphRecord
from elision.frontend.trace import import_graph_module
from elision.ir import to_fx
from elision.passes.fusion import DEFAULT_PIPELINE
from elision.passes.manager import PassManager
from elision.passes.pipeline import parse_pipeline

__all__ = ["OptimizedGraph", "optimize_graph", "default_pipeline", "SEMANTIC_PIPELINE"]


SEMANTIC_PIPELINE = "canonicalize,cse,constant-fold,dce"


def default_pipeline() -> str:
    """The semantics-preserving pipeline: classic cleanups plus the fusions."""
    return DEFAULT_PIPELINE


@dataclass
class OptimizedGraph:
    """A rewritten Dynamo graph: `fx(*kept_args)` returns the graph's outputs as a tuple."""

    fx: torch.fx.GraphModule
    dropped: frozenset[int]  # argument positions whose tensors (parameters, buffers) live inside `fx`
    state: tuple[tuple[int, torch.Tensor, int], ...]  # (position, tensor, version) captured at compile time
    report: list[dict]

    def kept(self, args: Sequence[Any]) -> list[Any]:
        dropped = self.dropped
        return [a for i, a in enumerate(args) if i not in dropped]

    def call_kept(self, *kept_args) -> tuple:
        return tuple(self.fx(*kept_args))

    def module(self) -> torch.nn.Module:
        """An nn.Module taking Dynamo's full argument list (what the ONNX exporter needs)."""
        return _DroppingModule(self.fx, self.dropped)

    def stale(self, args: Sequence[Any]) -> str | None:
        """Why the captured parameters no longer describe the call's (None when they still do)."""
        for pos, tensor, version in self.state:
            arg = args[pos]
            if arg is not tensor:
                return "a parameter or buffer was replaced after compilation"
            if arg._version != version:
                return "a parameter or buffer was modified in place after compilation"
        return None

    def guard(self, fn: Callable, eager: Callable, record: GraphRecord, name: str, n_args: int) -> Callable:
        """A callable of Dynamo's arguments: `fn(*kept_args)` while the captured parameters are current, and
        `eager(*args)` (with a warning, once) when one was replaced or modified in place since compilation."""
        state = self.state
        kept = tuple(i for i in range(n_args) if i not in self.dropped)

        def guarded(*args):
            for pos, tensor, version in state:
                arg = args[pos]
                if arg is not tensor or arg._version != version:
                    record.fall_back("eager", f"{name}: {self.stale(args)}; elision's graph holds the weights it was "
                                              f"compiled with, so this call runs the graph as given (recompile to use "
                                              f"the new weights with elision)")
                    return eager(*args)
            return fn(*[args[i] for i in kept])

        return guarded


class _DroppingModule(torch.nn.Module):
    """`fx` called with Dynamo's full argument list, minus the positions its parameters came from."""

    def __init__(self, fx: torch.nn.Module, dropped: frozenset[int]) -> None:
        super().__init__()
        self.fx = fx
        self.dropped = dropped

    def forward(self, *args):
        return tuple(self.fx(*[a for i, a in enumerate(args) if i not in self.dropped]))


def optimize_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], passes: str | None) -> OptimizedGraph:
    """Run elision's pipeline (None: the default semantics-preserving one) on a Dynamo graph."""
    pipeline = default_pipeline() if passes is None else passes
    module = import_graph_module(gm, list(example_inputs))
    manager = PassManager(parse_pipeline(pipeline)) if pipeline.strip() else None
    if manager is not None:
        manager.run(module)
    fx = to_fx(module, "forward")
    dropped = frozenset(module.attrs.get("param_positions", ()))
    state = tuple((i, example_inputs[i], example_inputs[i]._version) for i in sorted(dropped)
                  if isinstance(example_inputs[i], torch.Tensor))
    return OptimizedGraph(fx, dropped, state, manager.report() if manager is not None else [])
