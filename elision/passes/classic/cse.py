"""``cse``: merge nodes that compute the same op on the same inputs (never effectful or random ops)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.ir.core import Module, Value, map_values
from elision.ir.ops import is_deterministic, is_effectful
from elision.passes.base import Pass, register_pass


def _key(obj):
    """Hashable structural key of an args structure (Values by name, floats by bit pattern incl. NaN)."""
    if isinstance(obj, Value):
        return ("%", obj.name)
    if isinstance(obj, float):
        return ("f", "nan" if math.isnan(obj) else obj)
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_key(o) for o in obj))
    if isinstance(obj, dict):
        return ("d", tuple((k, _key(v)) for k, v in sorted(obj.items())))
    if isinstance(obj, (torch.dtype, torch.device, torch.layout, torch.memory_format)):
        return ("t", str(obj))
    return (type(obj).__name__, obj)


@register_pass
@dataclass(frozen=True)
class CommonSubexpressionElimination(Pass):
    """Merge nodes computing the same op on the same inputs (never effectful or random ops)."""

    name: ClassVar[str] = "cse"

    def run(self, module: Module) -> bool:
        changed = False
        for fn in module.functions.values():
            seen: dict[tuple, Value] = {}
            replace: dict[Value, Value] = {}
            keep = []
            for n in fn.nodes:
                if replace:
                    n.args = map_values(n.args, lambda v: replace.get(v, v))
                    n.kwargs = map_values(n.kwargs, lambda v: replace.get(v, v))
                if is_effectful(n.op) or not is_deterministic(n.op):
                    keep.append(n)
                    continue
                k = (n.op, _key(n.args), _key(n.kwargs), str(n.result.type))
                if k in seen:
                    replace[n.result] = seen[k]
                    changed = True
                    continue
                seen[k] = n.result
                keep.append(n)
            fn.nodes = keep
            fn.outputs = [replace.get(o, o) for o in fn.outputs]
        return changed
