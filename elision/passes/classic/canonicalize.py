"""``canonicalize``: drop no-op views, casts, copies and assertions (see ``CANONICALIZE_RULES``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, ClassVar

import torch

from elision.analysis.model_map.ops import is_full_slice
from elision.ir.core import Function, Module, Node, Value, map_values
from elision.passes.base import Pass, register_pass

# Rules: op -> function(fn, node) returning the Value that replaces node's result, or None (no match).
Rule = Callable[[Function, Node], "Value | None | bool"]


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
    return x if isinstance(x, Value) and is_full_slice(n) and _same_type(x, n.result) else None


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
