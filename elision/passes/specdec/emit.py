"""What the speculative-decoding passes share: the typed-node emitter, the tags it leaves on nodes for the passes
that follow (``positions``, ``bias``, ``kv_cat``), and the module's ``specdec`` facts."""
from __future__ import annotations

import torch

from elision.ir.core import Function, Module, Node, Value
from elision.ir.symbolic import from_sympy, to_sympy
from elision.ir.types import Type
from elision.passes.base import PassError

META_KEY = "specdec"  # node.meta[META_KEY] tags nodes kv-cache creates ("positions", "bias", "kv_cat")


class Emitter:
    """Inserts nodes with explicitly computed types at a moving position (no fake-tensor inference: fast)."""

    def __init__(self, fn: Function, index: int, loc: str = ""):
        self.fn, self.index, self.loc = fn, index, loc

    def __call__(self, op: str, args: tuple, type: Type, hint: str, kwargs: dict | None = None,
                 tag: str | None = None) -> Value:
        node = Node(op, tuple(args), dict(kwargs or {}), Value(self.fn.fresh_name(hint), type), self.loc)
        if tag:
            node.meta[META_KEY] = tag
        self.fn.nodes.insert(self.index, node)
        self.index += 1
        return node.result


def tagged(fn: Function, tag: str) -> Value:
    """The value of the node kv-cache tagged ``tag``."""
    for n in fn.nodes:
        if n.meta.get(META_KEY) == tag:
            return n.result
    raise PassError(f"@{fn.name} has no node tagged {tag!r}: run the kv-cache pass first")


def specdec_attrs(module: Module) -> dict:
    """``module.attrs["specdec"]``: layer count, head counts, layer prefix, dtype, skipped layers ..."""
    return module.attrs.setdefault("specdec", {})


def dim_add(a, b) -> int | str:
    """The symbolic dim ``a + b``."""
    return from_sympy(to_sympy(str(a)) + to_sympy(str(b)))


def trace_device(fn: Function) -> torch.device:
    """The device the model was traced on (from the first node that names one)."""
    for n in fn.nodes:
        d = n.kwargs.get("device")
        if isinstance(d, torch.device):
            return d
    return torch.device("cpu")
