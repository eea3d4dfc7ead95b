"""Re-inferring result types downstream of values whose types changed (positions [1, n] -> [batch, n])."""
from __future__ import annotations

import torch

from elision.ir.core import Function, Node, Value, map_values
from elision.ir.ops import resolve_op
from elision.ir.shape_infer import infer_node_type, type_of
from elision.ir.symbolic import evaluate
from elision.ir.types import ScalarType, TensorType, Type
from elision.passes.specdec.rename import remap


_BINDINGS = ((17, 19, 23, 29, 31, 37), (41, 43, 47, 53, 59, 61))


def _meta_types(fn: Function, node: Node, current: dict[str, Value], producers: dict[Value, Node]) -> Type | None:
    """Result type of ``node`` from two runs on meta tensors with different prime sizes for every symbol.

    Each output dim is matched against the dims of the node's input types (and its old type); None when a dim
    cannot be explained that way (the caller falls back to fake-tensor inference).
    """
    module = fn.module
    syms = sorted({sym for v in fn.inputs if isinstance(v.type, TensorType) for sym in v.type.symbols()})
    if len(syms) > len(_BINDINGS[0]):
        return None
    outs = []
    for primes in _BINDINGS:
        bind = dict(zip(syms, primes))

        def meta(v: Value):
            p = producers.get(v)
            if p is not None and p.op == "param" and module is not None:
                t = module.params[p.args[0]]
                return torch.empty(t.shape, dtype=t.dtype, device="meta")
            t = current[v.name].type
            if isinstance(t, TensorType):
                return torch.empty([evaluate(d, bind) for d in t.shape], dtype=t.torch_dtype, device="meta")
            if isinstance(t, ScalarType) and t.kind == "int" and t.expr is not None:
                return evaluate(int(t.expr) if t.expr.lstrip("-").isdigit() else t.expr, bind)
            raise ValueError("unsupported input type")

        try:
            out = resolve_op(node.op)(*map_values(node.args, meta), **map_values(node.kwargs, meta))
        except Exception:
            return None
        if not isinstance(out, torch.Tensor) or out.device.type != "meta":
            return None
        outs.append((out, bind))
    cands: list = []
    for v in node.inputs + [node.result]:
        t = current.get(v.name, v).type
        if isinstance(t, TensorType):
            cands += [d for d in t.shape if d not in cands]
    dims = []
    (o1, b1), (o2, b2) = outs
    if o1.dim() != o2.dim():
        return None
    for a, b in zip(o1.shape, o2.shape):
        if a == b:
            dims.append(int(a))
            continue
        hit = [c for c in cands if isinstance(c, str) and evaluate(c, b1) == a and evaluate(c, b2) == b]
        if not hit:
            return None
        dims.append(hit[0])
    return TensorType(type_of(o1).dtype, tuple(dims))


def retype(fn: Function, changed: set[Value]) -> None:
    """Re-infer result types downstream of the ``changed`` values.

    Only nodes with an input whose type changed are re-inferred, and propagation stops where a result type
    comes out the same (positions [1, n] -> [batch, n] retypes the rotary table, not the whole network).
    Inference runs on meta tensors (fast); fake tensors with symbolic sizes are the fallback.
    """
    producers = fn.producers()
    dirty = {v.name for v in changed}
    current: dict[str, Value] = {v.name: v for v in fn.values()}
    mapping: dict[Value, Value] = {}
    for n in fn.nodes:
        if n.op == "param" or not any(i.name in dirty for i in n.inputs):
            continue
        t = _meta_types(fn, n, current, producers)
        if t is None:
            args = map_values(n.args, lambda v: current[v.name])
            kwargs = map_values(n.kwargs, lambda v: current[v.name])
            t = infer_node_type(fn, n.op, args, kwargs)
        if t != n.result.type:
            new = Value(n.result.name, t)
            mapping[n.result] = new
            current[n.result.name] = new
            dirty.add(n.result.name)
    remap(fn, mapping)
