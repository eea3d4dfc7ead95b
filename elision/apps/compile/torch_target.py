"""The torch (and triton) target of the backend: elision's rewrites, code generation by inductor.

For one Dynamo graph the candidates are

  elision+inductor  elision's rewritten graph (`optimize_graph`) compiled by inductor (`compile_fx`);
  inductor          the graph as Dynamo gave it, compiled by inductor: exactly `backend="inductor"`;
  elision           elision's rewritten graph on eager PyTorch;
  eager             the graph as Dynamo gave it, uncompiled.

elision's own ops reach inductor as ops it can schedule: they are `torch.library.triton_op`s, which inductor
traces into (`elision.kernels.ops`): on CPU tensors the body is plain aten ops (SDPA, `F.rms_norm`, ...) that
inductor fuses with their neighbours; on CUDA it is Triton kernels behind `wrap_triton`, which inductor
schedules as user-defined Triton kernels. Why delegate the whole graph to `compile_fx` after elision's passes
rather than run them as inductor graph passes: elision's passes work on its IR (torch-level ops, module
locations, symbolic dims), which inductor's post-grad ATen graph no longer has, and `compile_fx` is the
registered "inductor" backend itself, so the code we hand back is inductor's, with Dynamo's guards and dynamic
shapes intact (compile_fx runs inside Dynamo's tracing context).

`FastestOf` then keeps, of the candidates whose output matches the graph as given, plain inductor unless another
is faster by a margin (`select.choose_route`); `options["select"]` can name one candidate instead (no timing,
no check). The "inductor" candidate is `compile_fx` on Dynamo's graph, as `backend="inductor"` calls it: the
generated code is the same (checked on a tiny BERT), and the only per-call cost added is `FastestOf`'s call.
"""
from __future__ import annotations

import time
from typing import Any, Callable, Mapping, Sequence

import torch

from elision.apps.compile.optimize import OptimizedGraph, optimize_graph
from elision.apps.compile.records import GraphRecord, warn_once
from elision.apps.compile.select import FastestOf, graph_is_rerunnable
from elision.lowering.onnx_export import exporter_error_summary

__all__ = ["CANDIDATES", "build_torch_target", "inductor_compile"]

CANDIDATES = ("elision+inductor", "inductor", "elision", "eager")


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {exporter_error_summary(e)}"


def inductor_compile(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], config_patches: Mapping[str, Any] | None,
                     record: GraphRecord, name: str) -> Callable:
    """`compile_fx` (the registered "inductor" backend) on `gm`; the compile time lands in `record`."""
    from torch._inductor.compile_fx import compile_fx  # Inductor costs seconds to import: only its candidates pay

    start = time.perf_counter()
    compiled = compile_fx(gm, list(example_inputs), config_patches=dict(config_patches or {}) or None)
    record.compile_seconds[name] = round(time.perf_counter() - start, 3)
    return compiled


def _mode_patches(mode: str | None) -> dict[str, Any]:
    """Inductor config for torch.compile's `mode` (what `backend="inductor"` would get)."""
    if mode in (None, "default"):
        return {}
    from torch._inductor import list_mode_options  # Inductor costs seconds to import: only a `mode` pays

    return dict(list_mode_options(mode))


def build_torch_target(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, passes: str | None,
                       select: str, strict: bool, mode: str | None, record: GraphRecord) -> Callable:
    """The callable Dynamo runs for `gm`: a `FastestOf` over the candidates `select` allows."""
    wanted = CANDIDATES if select == "fastest" else (select,)
    # a graph that mutates its inputs or draws random numbers cannot be run several times to time it: it gets
    # the first candidate that compiles, in the order of CANDIDATES (eager stays as the last resort)
    rerunnable = graph_is_rerunnable(gm)
    patches = _mode_patches(mode)
    eager = gm.forward
    candidates: dict[str, Callable] = {}
    optimized: OptimizedGraph | None = None
    uses_elision = [c for c in wanted if c.startswith("elision")]
    if uses_elision and (passes is None or passes.strip()):
        try:
            optimized = optimize_graph(gm, example_inputs, passes)
        except Exception as e:
            if strict:
                raise
            for c in uses_elision:
                record.dropped[c] = f"elision's rewrites failed: {_one_line(e)}"
            warn_once(f"{record.graph_id}:rewrites", f"elision backend: graph {record.graph_id} runs without elision's "
                                                     f"rewrites: {_one_line(e)}")
    elif uses_elision:  # passes="": nothing to rewrite, so the elision candidates are the plain ones
        for c in uses_elision:
            record.dropped[c] = "no passes requested"
    for name in wanted:
        if not rerunnable and candidates and name != "eager":
            continue
        if name.startswith("elision") and optimized is None:
            if name == "elision+inductor" and passes is not None and not passes.strip() and "inductor" not in wanted:
                name = "inductor"  # asked for elision+inductor with no passes: that is plain inductor
            else:
                continue
        try:
            if name == "elision+inductor":
                compiled = inductor_compile(optimized.fx, optimized.kept(example_inputs), patches, record, name)
                candidates[name] = optimized.guard(compiled, eager, record, name, len(example_inputs))
            elif name == "elision":
                candidates[name] = optimized.guard(optimized.call_kept, eager, record, name, len(example_inputs))
            elif name == "inductor":
                candidates[name] = inductor_compile(gm, example_inputs, patches, record, name)
            else:
                candidates[name] = eager
        except Exception as e:
            if strict:
                raise
            record.dropped[name] = f"compilation failed: {_one_line(e)}"
    if not candidates:
        record.fall_back("eager", "; ".join(f"{k}: {v}" for k, v in record.dropped.items()) or "no candidate")
        candidates["eager"] = eager
    elif select == "fastest" and not any(c in candidates for c in ("elision+inductor", "inductor", "elision")):
        record.fall_back("eager", "; ".join(f"{k}: {v}" for k, v in record.dropped.items()))
    runner = FastestOf(candidates, record, reference="eager" if rerunnable else None, measure=rerunnable,
                       strict=strict)
    return runner
