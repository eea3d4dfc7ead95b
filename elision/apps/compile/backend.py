"""`torch.compile(model, backend="elision", options={...})`: the Dynamo backend.

Dynamo finds this function through the `torch_dynamo_backends` entry point declared in pyproject.toml
(`elision = elision.apps.compile.backend:elision_backend`); `register()` does the same by hand where the
package is not installed (idempotent; importing this module registers nothing, because Dynamo's
entry-point loader registers the name itself after importing us and asserts it is not taken yet).

Per Dynamo graph:
  1. optimize: import the graph into elision's IR, run the semantics-preserving pass pipeline (or
     `options["passes"]`), and emit FX again (`optimize.optimize_graph`);
  2. lower to the target:
     * `torch` / `triton` (`torch_target`): the rewritten graph compiled by inductor, next to plain inductor,
       the rewritten graph on eager PyTorch and the graph as given; the first call checks them against the
       graph as given and keeps plain inductor unless another is measurably faster (`select.choose_route`;
       `options["select"]` names one instead). elision ops are
       `triton_op`s inductor traces into: aten ops on CPU, Triton kernels on CUDA (target `triton` says once
       that there is no CUDA device when there is none);
     * `onnxruntime` (`ort_target`): export with torch.onnx (dynamic dims from Dynamo's SymInts), checked
       against eager on the first call, run in an ORT session.
What each graph runs, and why, is in its `GraphRecord` (`graph_records()`, or `.elision_record` on the
callable handed to Dynamo). Running eager instead of the target warns once (ElisionFallbackWarning), is
logged, and is recorded; `options["strict"]` raises instead. Bad options raise `ValueError` immediately.

Options: target ("torch" | "onnxruntime" | "triton"), passes (pipeline string; "" = none),
select ("fastest" | "elision+inductor" | "inductor" | "elision" | "eager"; torch and triton targets),
strict (bool), ort_threads (int), ort_fusions (bool: onnxscript ORT fusions, verified).
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from elision.apps.compile.optimize import optimize_graph
from elision.apps.compile.ort_target import OrtGraphRunner
from elision.apps.compile.records import (ElisionFallbackWarning, GraphRecord, clear_graph_records, graph_records,
                                          register_record, warn_once)
from elision.apps.compile.torch_target import CANDIDATES, build_torch_target
from elision.errors import ElisionError
from elision.lowering.onnx_export import exporter_error_summary
from elision.passes.pipeline import parse_pipeline

__all__ = ["elision_backend", "register", "BackendOptions", "ElisionFallbackWarning", "TARGETS", "graph_records",
           "clear_graph_records"]

TARGETS = ("torch", "onnxruntime", "triton")
SELECT = ("fastest",) + CANDIDATES
_graph_ids = itertools.count()


@dataclass(frozen=True)
class BackendOptions:
    target: str = "torch"
    passes: str | None = None  # None: elision's default semantics-preserving pipeline
    select: str = "fastest"
    strict: bool = False
    ort_threads: int | None = None
    ort_fusions: bool = False

    @staticmethod
    def parse(options: Mapping[str, Any] | None, mode: str | None = None) -> "BackendOptions":
        options = dict(options or {})
        known = {"target", "passes", "select", "strict", "ort_threads", "ort_fusions"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"elision backend: unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        target = options.get("target", "torch")
        if target not in TARGETS:
            raise ValueError(f"elision backend: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        passes = options.get("passes")
        if passes is not None and not isinstance(passes, str):
            raise ValueError(f"elision backend: passes must be a pipeline string like 'canonicalize,cse', got {type(passes).__name__}")
        if passes is not None:
            _check_pipeline(passes)
        select = options.get("select", "fastest")
        if select not in SELECT:
            raise ValueError(f"elision backend: unknown select {select!r}; choose one of {', '.join(SELECT)}")
        if select != "fastest" and target == "onnxruntime":
            raise ValueError("elision backend: select applies to the torch and triton targets, not onnxruntime")
        if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"elision backend: unknown mode {mode!r}")
        threads = options.get("ort_threads")
        return BackendOptions(
            target=target, passes=passes, select=select, strict=bool(options.get("strict", False)),
            ort_threads=None if threads is None else int(threads), ort_fusions=bool(options.get("ort_fusions", False)),
        )


def _check_pipeline(passes: str) -> None:
    """Unknown passes and approximate passes are bad options: say so before any graph is compiled."""
    try:
        parsed = parse_pipeline(passes) if passes.strip() else []
    except ElisionError as e:
        raise ValueError(f"elision backend: bad passes {passes!r}: {e}") from None
    approximate = [p.name for p in parsed if p.approximate]
    if approximate:
        raise ValueError(f"elision backend: {', '.join(approximate)} change the model's output (approximate passes); "
                         f"torch.compile backends must preserve it, use elision.compile(..., allow_approximate=True)")


def _graph_label(gm: torch.fx.GraphModule) -> str:
    n = sum(1 for node in gm.graph.nodes if node.op in ("call_function", "call_method", "call_module"))
    return f"#{next(_graph_ids)} ({n} ops)"


def _triton_note() -> None:
    if not torch.cuda.is_available():
        warn_once(
            "triton:no-cuda",
            "elision backend: target 'triton' has no CUDA device here; elision ops run their torch reference "
            "implementations on CPU (the graph is otherwise the same as target 'torch')",
        )


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {exporter_error_summary(e)}"


class _Eager:
    """The graph as given, standing in for a target that could not be built; says so on its first call."""

    def __init__(self, gm: torch.fx.GraphModule, record: GraphRecord, reason: str) -> None:
        self.forward = gm.forward
        self.elision_record = record
        self.reason = reason
        self.warned = False

    def __call__(self, *args):
        if not self.warned:
            self.warned = True
            self.elision_record.fall_back("eager", self.reason)
        return self.forward(*args)


def _lower_ort(gm, example_inputs, opts: BackendOptions, record: GraphRecord) -> OrtGraphRunner:
    optimized, rewrite_error = None, None
    if opts.passes is None or opts.passes.strip():
        try:
            optimized = optimize_graph(gm, example_inputs, opts.passes)
        except Exception as e:
            if opts.strict:
                raise
            rewrite_error = _one_line(e)
    return OrtGraphRunner(record, optimized, gm, example_inputs, strict=opts.strict, ort_threads=opts.ort_threads,
                          ort_fusions=opts.ort_fusions, rewrite_error=rewrite_error)


def elision_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None,
                    mode: str | None = None) -> Callable:
    """Dynamo backend: optimize the graph with elision's pipeline and lower it to the chosen target."""
    opts = BackendOptions.parse(options, mode)
    record = register_record(GraphRecord(_graph_label(gm), opts.target))
    try:
        if opts.target == "onnxruntime":
            return _lower_ort(gm, example_inputs, opts, record)
        if opts.target == "triton":
            _triton_note()
        runner = build_torch_target(gm, example_inputs, passes=opts.passes, select=opts.select, strict=opts.strict,
                                    mode=mode, record=record)
        runner.elision_record = record
        return runner
    except Exception as e:  # any failure: this graph runs eager, the rest of the model is unaffected
        if opts.strict:
            raise
        return _Eager(gm, record, f"falls back to eager: {_one_line(e)}")


def register(name: str = "elision") -> None:
    """Register the backend under `name` by hand (the entry point does this for installed elision). Idempotent."""
    # only when registering by hand: importing Dynamo costs seconds, which the other backend paths do not pay
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if name not in _COMPILER_FNS:
        register_backend(compiler_fn=elision_backend, name=name)
