"""hoist-invariants{function=forward;query_input=0}: split the field function into the work done once per shape and
the work done per query chunk.

@forward(points, latents) becomes
  @prepare(latents) -> state         every node that does not depend on the query input, returning the values the
                                     query side reads (for a VecSet decoder: the latent transformer and the
                                     cross-attention's keys and values)
  @evaluate(points, *state)          everything else, with the original outputs.
Parameters are shared by the module, so each side reads the ones it needs. The split is recorded in the module's
volume record (state names, function signatures) for the decoding driver. A function with nothing to hoist is left
as it is.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import ClassVar

from elision.ir.core import Function, Module, Node, Value
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.volume.record import FieldOptions, field_function, record_function, volume_record

PREPARE, EVALUATE = "prepare", "evaluate"


def _backward_slice(nodes: list[Node], roots: list[Value]) -> list[Node]:
    """The nodes (in program order) whose results `roots` need."""
    needed = set(roots)
    kept = []
    for n in reversed(nodes):
        if n.result in needed:
            kept.append(n)
            needed.update(n.inputs)
    return kept[::-1]


def split_invariants(fn: Function, query_input: int) -> tuple[list[Node], list[Node], list[Value]]:
    """(prepare nodes, evaluate nodes, state values): the nodes of `fn` that do not depend on input `query_input`
    and are needed by the others, the nodes that do (with the parameters they read), and the query-invariant values
    the query side reads."""
    dep: set[Value] = {fn.inputs[query_input]}
    for n in fn.nodes:
        if any(i in dep for i in n.inputs):
            dep.add(n.result)
    variant = [n for n in fn.nodes if n.result in dep]
    params = {n.result: n for n in fn.nodes if n.op == "param"}
    state: list[Value] = []
    for v in [i for n in variant for i in n.inputs] + list(fn.outputs):
        if v not in dep and v not in params and v not in state:
            state.append(v)
    invariant = [n for n in fn.nodes if n.result not in dep]
    prepare = _backward_slice(invariant, state)
    read = {i for n in variant for i in n.inputs}
    evaluate = [params[v] for v in params if v in read] + variant
    return [copy.copy(n) for n in prepare], [copy.copy(n) for n in evaluate], state


@register_pass
@dataclass(frozen=True)
class HoistInvariants(FieldOptions, Pass):
    """Split the field function into work done once per shape (@prepare) and work done per query chunk."""

    name: ClassVar[str] = "hoist-invariants"

    def run(self, module: Module) -> bool:
        if "split" in volume_record(module):
            return False  # already split
        fn, query_input, _ = field_function(module, self.name, self.function, self.query_input)
        clash = [f for f in (PREPARE, EVALUATE) if f in module.functions]
        if clash:
            raise PassError(f"{self.name}: the module already has @{clash[0]}; cannot split @{fn.name} into it")
        prepare_nodes, evaluate_nodes, state = split_invariants(fn, query_input)
        if not state:
            return False  # nothing computed without the queries
        query = fn.inputs[query_input]
        prepare = Function(PREPARE, [v for v in fn.inputs if v is not query], prepare_nodes, state)
        evaluate = Function(EVALUATE, [query] + state, evaluate_nodes, list(fn.outputs))
        del module.functions[fn.name]
        module.add_function(prepare)
        module.add_function(evaluate)
        rec = volume_record(module)
        rec["split"] = {"function": fn.name, "prepare": PREPARE, "evaluate": EVALUATE,
                        "state": [v.name for v in state]}
        rec.get("functions", {}).pop(fn.name, None)
        record_function(module, prepare, None)
        record_function(module, evaluate, query.name)
        return True
