"""``constant-fold``: evaluate nodes that depend only on parameters and constants and store the results as
parameters."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.ir.core import Module, Value, map_values
from elision.ir.ops import is_deterministic, is_effectful, resolve_op
from elision.ir.types import TensorType
from elision.passes.base import Pass, register_pass
from elision.passes.classic.dce import eliminate_dead_code, remove_unused_params


@register_pass
@dataclass(frozen=True)
class ConstantFolding(Pass):
    """Evaluate tensor nodes that depend only on parameters and constants; store results as new parameters.

    Results larger than ``max_elements`` (or than the largest input, which would trade compute for memory) are
    left alone. Folded parameters are named ``const.<function>.<value>``.
    """

    name: ClassVar[str] = "constant-fold"
    max_elements: int = 1 << 22

    def run(self, module: Module) -> bool:
        changed = False
        for fn in module.functions.values():
            known: dict[Value, object] = {}
            for n in list(fn.nodes):
                if n.op == "param":
                    known[n.result] = module.params[n.args[0]]
                    continue
                if not n.inputs or any(i not in known for i in n.inputs):
                    # ops with no inputs (arange(5), full(...)) fold too, when deterministic and tensor-valued
                    if n.inputs:
                        continue
                if is_effectful(n.op) or not is_deterministic(n.op) or not isinstance(n.result.type, TensorType):
                    continue
                if n.op.startswith("py.") or n.op == "getitem":
                    continue
                try:
                    val = resolve_op(n.op)(*map_values(n.args, known.__getitem__), **map_values(n.kwargs, known.__getitem__))
                except Exception:
                    continue
                if not isinstance(val, torch.Tensor) or val.device.type == "meta":
                    continue
                biggest = max([known[i].numel() for i in n.inputs if isinstance(known[i], torch.Tensor)] or [0])
                if val.numel() > self.max_elements or (n.inputs and val.numel() > max(biggest, 1)):
                    continue
                known[n.result] = val
                if all(fn.producer(i) is not None and fn.producer(i).op == "param" for i in n.inputs) or not n.inputs:
                    pname = f"const.{fn.name}.{n.result.name}"
                    module.params[pname] = val.detach()  # keep strides: same kernels, same bits
                    n.op, n.args, n.kwargs = "param", (pname,), {}
                    changed = True
        if changed:  # re-run until nodes fed by freshly folded params fold too
            for fn in module.functions.values():
                eliminate_dead_code(fn)
            remove_unused_params(module)
            self.run(module)
        return changed
