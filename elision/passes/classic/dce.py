"""``dce``: remove nodes whose results nothing uses (effectful ops stay) and parameters no function reads.

`eliminate_dead_code` and `remove_unused_params` are the helpers every rewriting pass calls after it detaches
nodes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from elision.ir.core import Function, Module, Node, Value
from elision.ir.ops import is_effectful
from elision.passes.base import Pass, register_pass


def remove_unused_params(module: Module) -> int:
    used = {n.args[0] for f in module.functions.values() for n in f.nodes if n.op == "param"}
    dead = [k for k in module.params if k not in used]
    for k in dead:
        del module.params[k]
    return len(dead)


def eliminate_dead_code(fn: Function) -> int:
    live: set[Value] = set(fn.outputs)
    keep: list[Node] = []
    for n in reversed(fn.nodes):
        if n.result in live or is_effectful(n.op):
            keep.append(n)
            live.update(n.inputs)
    removed = len(fn.nodes) - len(keep)
    fn.nodes = list(reversed(keep))
    return removed


@register_pass
@dataclass(frozen=True)
class DeadCodeElimination(Pass):
    """Remove nodes whose results are never used (effectful ops stay) and parameters no function reads."""

    name: ClassVar[str] = "dce"

    def run(self, module: Module) -> bool:
        removed = sum(eliminate_dead_code(f) for f in module.functions.values())
        removed += remove_unused_params(module)
        return removed > 0
