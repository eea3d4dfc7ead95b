"""`query-independence` and `hoist-invariants` as IR passes.

query-independence{function=forward,query_input=0,query_dim=1}: proves that no op of the function mixes
values along the query axis of input `query_input`; raises PassError naming the op and module path where
the proof fails (so a sparse-volume rewrite is refused there). Records the verdict in module.attrs.

hoist-invariants{function=forward,query_input=0}: splits the function into `latents_side` (every node not
depending on the query input; outputs the values the query side needs) and `field_chunk` (query input +
hoisted values -> the original outputs). The original function is kept unchanged.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

from elision.ir.core import Function, Module, Value, map_values
from elision.ir.types import TensorType
from elision.passes.base import Pass, PassError, register_pass
from elision.analysis.query_independence import QueryIndependenceReport, query_independence


class _View:
    """Just enough of torch.fx.Node for the analysis: op, name, target, args, meta, inputs."""

    def __init__(self, name: str, op: str, target: Any, meta: dict) -> None:
        self.name, self.op, self.target, self.meta = name, op, target, meta
        self.args: tuple = ()
        self.kwargs: dict = {}
        self.all_input_nodes: list["_View"] = []


class _Graph:
    def __init__(self, nodes: list[_View]) -> None:
        self.nodes = nodes


class _GraphModule:
    def __init__(self, nodes: list[_View]) -> None:
        self.graph = _Graph(nodes)


def _meta(v: Value, loc: str = "") -> dict:
    t = v.type
    if isinstance(t, TensorType):
        return {"shape": tuple(t.shape), "loc": loc}
    return {"scalar": True, "loc": loc}


def _as_fx_view(fn: Function) -> _GraphModule:
    views: dict[Value, _View] = {}
    order: list[_View] = []
    for v in fn.inputs:
        views[v] = _View(v.name, "placeholder", None, _meta(v))
        order.append(views[v])
    for n in fn.nodes:
        kind = "get_attr" if n.op == "param" else "call_function"
        view = _View(n.result.name, kind, n.op, _meta(n.result, n.loc))
        view.args = map_values(n.args, lambda x: views[x])
        view.kwargs = map_values(n.kwargs, lambda x: views[x])
        view.all_input_nodes = [views[i] for i in n.inputs]
        views[n.result] = view
        order.append(view)
    out = _View("output", "output", None, {})
    out.args = (tuple(views[o] for o in fn.outputs),)
    out.all_input_nodes = [views[o] for o in fn.outputs]
    order.append(out)
    return _GraphModule(order)


def ir_query_independence(module: Module, function: str = "forward", query_input: int = 0,
                          query_dim: int = 1) -> QueryIndependenceReport:
    if function not in module.functions:
        raise PassError(f"module has no function @{function}; functions: {', '.join(module.functions)}")
    return query_independence(_as_fx_view(module.functions[function]), query_input, query_dim)  # type: ignore[arg-type]


@register_pass
@dataclass(frozen=True)
class QueryIndependence(Pass):
    name: ClassVar[str] = "query-independence"
    function: str = "forward"
    query_input: int = 0
    query_dim: int = 1

    def run(self, module: Module) -> bool:
        rep = ir_query_independence(module, self.function, self.query_input, self.query_dim)
        if not rep.ok:
            raise PassError(f"@{self.function} is {rep.explain()}\nsparse volume decoding is refused for this "
                            "decoder; decode densely instead")
        module.attrs.setdefault("volume", {})["query_independent"] = {
            "function": self.function, "query_input": self.query_input, "query_dim": self.query_dim,
            "invariant_nodes": len(rep.invariant_nodes)}
        return False


@register_pass
@dataclass(frozen=True)
class HoistInvariants(Pass):
    name: ClassVar[str] = "hoist-invariants"
    function: str = "forward"
    query_input: int = 0

    def run(self, module: Module) -> bool:
        if self.function not in module.functions:
            raise PassError(f"module has no function @{self.function}")
        if "latents_side" in module.functions:
            return False
        fn = module.functions[self.function]
        if not 0 <= self.query_input < len(fn.inputs):
            raise PassError(f"query_input {self.query_input} out of range: @{self.function} has "
                            f"{len(fn.inputs)} inputs")
        q = fn.inputs[self.query_input]
        dep: set[Value] = {q}
        for n in fn.nodes:
            if any(i in dep for i in n.inputs):
                dep.add(n.result)
        invariant = [n for n in fn.nodes if n.result not in dep]
        variant = [n for n in fn.nodes if n.result in dep]
        if not invariant:
            return False
        produced = {n.result for n in invariant}
        # values made on the latent side (params excepted: both functions share the module's params)
        crossing: list[Value] = []
        for n in variant:
            for i in n.inputs:
                if i not in dep and i not in crossing and (i in produced or i in fn.inputs):
                    crossing.append(i)
        for o in fn.outputs:
            if o not in dep and o not in crossing:
                crossing.append(o)
        param_nodes = {n.result: n for n in invariant if n.op == "param"}
        crossing = [c for c in crossing if c not in param_nodes]
        lat_inputs = [v for v in fn.inputs if v is not q]
        latents_side = Function("latents_side", lat_inputs, [copy.copy(n) for n in invariant], list(crossing))
        # the chunk side re-declares the params it reads (param nodes are free) and takes hoisted values
        needed_params = [copy.copy(param_nodes[i]) for n in variant for i in n.inputs if i in param_nodes]
        seen: set[Value] = set()
        params = [p for p in needed_params if not (p.result in seen or seen.add(p.result))]
        chunk_inputs = [q] + [c for c in crossing if c not in (q,)]
        field_chunk = Function("field_chunk", chunk_inputs, params + [copy.copy(n) for n in variant],
                               list(fn.outputs))
        module.add_function(latents_side)
        module.add_function(field_chunk)
        module.attrs.setdefault("volume", {})["hoisted"] = [c.name for c in crossing]
        return True
