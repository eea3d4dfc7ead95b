"""Classic semantics-preserving passes: dead-code elimination, CSE, constant folding, canonicalization."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from elision.ir.core import Function, Module, Node, Value, map_values
from elision.ir.ops import is_deterministic, is_effectful, resolve_op
from elision.ir.types import TensorType
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
            if changed:
                # re-run until nodes fed by freshly folded params fold too
                pass
        if changed:
            for fn in module.functions.values():
                eliminate_dead_code(fn)
            remove_unused_params(module)
            self.run(module)
        return changed


# ------------------------------------------------------------------------------------- canonicalize
# Rules: op -> function(fn, node) returning the Value that replaces node's result, or None (no match).
Rule = Callable[[Function, Node], "Value | None | bool"]
_INT64_MAX = 2**63 - 1


def _same_type(a: Value, b: Value) -> bool:
    return a.type == b.type


def _identity_if_same_type(fn: Function, n: Node):
    x = n.args[0]
    return x if isinstance(x, Value) and _same_type(x, n.result) else None


def _to_copy(fn: Function, n: Node):
    x = n.args[0]
    extra = {k: v for k, v in n.kwargs.items() if k not in ("dtype", "layout", "device", "pin_memory", "memory_format")}
    if extra or (len(n.args) > 1):
        return None
    if n.kwargs.get("memory_format") not in (None, torch.preserve_format, torch.contiguous_format):
        return None
    return x if isinstance(x, Value) and _same_type(x, n.result) else None


def _slice_full(fn: Function, n: Node):
    x = n.args[0]
    args = list(n.args) + [None] * (5 - len(n.args))
    start, end, step = args[2] if args[2] is not None else 0, args[3], args[4] if args[4] is not None else 1
    if start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= _INT64_MAX)) and _same_type(x, n.result):
        return x
    return None


def _arith_identity(neutral: float) -> Rule:
    def rule(fn: Function, n: Node):
        if len(n.args) < 2 or n.kwargs.get("alpha", 1) != 1:
            return None
        x, y = n.args[0], n.args[1]
        if isinstance(x, Value) and not isinstance(y, Value) and isinstance(y, (int, float)) and not isinstance(y, bool) \
                and y == neutral and _same_type(x, n.result):
            return x
        return None
    return rule


def _drop(fn: Function, n: Node):
    return True  # assertion-like: nothing uses the result; remove the node


CANONICALIZE_RULES: dict[str, Rule] = {
    "aten._assert_tensor_metadata.default": _drop,
    "aten._assert_scalar.default": _drop,
    "aten._assert_async.msg": _drop,
    "aten.sym_constrain_range_for_size.default": _drop,
    "aten.alias.default": _identity_if_same_type,
    "aten.detach.default": _identity_if_same_type,
    # clone/contiguous are NOT dropped: the IR runs torch ops with stride semantics and a later view may need
    # the contiguous copy.
    "aten.lift_fresh_copy.default": _identity_if_same_type,
    "aten._to_copy.default": _to_copy,
    "aten.to.dtype": _identity_if_same_type,
    "aten.view.default": _identity_if_same_type,
    "aten.reshape.default": _identity_if_same_type,
    "aten._unsafe_view.default": _identity_if_same_type,
    "aten.expand.default": _identity_if_same_type,
    "aten.slice.Tensor": _slice_full,
    "aten.add.Tensor": _arith_identity(0),
    "aten.sub.Tensor": _arith_identity(0),
    "aten.mul.Tensor": _arith_identity(1),
    "aten.div.Tensor": _arith_identity(1),
}


@register_pass
@dataclass(frozen=True)
class Canonicalize(Pass):
    """Drop no-op views, casts, copies and assertions (see CANONICALIZE_RULES)."""

    name: ClassVar[str] = "canonicalize"
    keep_asserts: bool = False

    def run(self, module: Module) -> bool:
        changed = False
        for fn in module.functions.values():
            keep = []
            replace: dict[Value, Value] = {}
            for n in fn.nodes:
                if replace:
                    n.args = map_values(n.args, lambda v: replace.get(v, v))
                    n.kwargs = map_values(n.kwargs, lambda v: replace.get(v, v))
                rule = CANONICALIZE_RULES.get(n.op)
                out = None
                if rule is not None and not (self.keep_asserts and rule is _drop):
                    out = rule(fn, n)
                if out is True:
                    changed = True
                    continue
                if isinstance(out, Value):
                    replace[n.result] = out
                    changed = True
                    continue
                keep.append(n)
            fn.nodes = keep
            fn.outputs = [replace.get(o, o) for o in fn.outputs]
        return changed
