"""Textual form of the IR. :mod:`elision.ir.parser` reads it back losslessly.

    module attributes {"inputs": ["ids"]}
    param "m.lm_head.weight" : f32[128, 64]
    func @forward(%ids : i64[batch, seq]) {
      %w : f32[128, 64] = param("m.lm_head.weight")
      %logits : f32[batch, seq, 128] = aten.linear.default(%h, %w, None) loc("m.lm_head")
      return (%logits)
    }
"""
from __future__ import annotations

import json
import math

import torch

from elision.ir.values import Value

# The formatters read nodes, functions and modules by attribute and do not import their classes: those classes
# print themselves with these functions (``str(fn)``, ``module.print()``).


def format_literal(obj) -> str:
    if isinstance(obj, Value):
        return f"%{obj.name}"
    if obj is None or isinstance(obj, bool):
        return repr(obj)
    if isinstance(obj, int):
        return repr(obj)
    if isinstance(obj, float):
        if math.isnan(obj):
            return "nan"
        if math.isinf(obj):
            return "inf" if obj > 0 else "-inf"
        return repr(obj)
    if isinstance(obj, str):
        return json.dumps(obj)
    if isinstance(obj, torch.dtype):
        return str(obj)  # torch.float32
    if isinstance(obj, torch.device):
        return f'device("{obj}")'
    if isinstance(obj, (torch.layout, torch.memory_format)):
        return str(obj)  # torch.strided / torch.contiguous_format
    if isinstance(obj, list):
        return "[" + ", ".join(format_literal(o) for o in obj) + "]"
    if isinstance(obj, tuple):
        inner = ", ".join(format_literal(o) for o in obj)
        return "(" + inner + ("," if len(obj) == 1 else "") + ")"
    raise TypeError(f"cannot print constant {obj!r} of type {type(obj).__name__} in the IR")


def format_node(n) -> str:
    """One line: ``%name : type = op(args, key=value) loc("...")`` (``n`` is a Node)."""
    parts = [format_literal(a) for a in n.args]
    parts += [f"{k}={format_literal(v)}" for k, v in n.kwargs.items()]
    loc = f" loc({json.dumps(n.loc)})" if n.loc else ""
    return f"%{n.result.name} : {n.result.type} = {n.op}({', '.join(parts)}){loc}"


def format_function(fn) -> str:
    ins = ", ".join(f"%{v.name} : {v.type}" for v in fn.inputs)
    lines = [f"func @{fn.name}({ins}) {{"]
    lines += ["  " + format_node(n) for n in fn.nodes]
    lines.append("  return (" + ", ".join(f"%{o.name}" for o in fn.outputs) + ")")
    lines.append("}")
    return "\n".join(lines)


def format_module(m) -> str:
    lines = []
    if m.attrs:
        lines.append("module attributes " + json.dumps(m.attrs, sort_keys=True))
    for name in m.params:
        lines.append(f"param {json.dumps(name)} : {m.param_type(name)}")
    for fn in m.functions.values():
        lines.append(format_function(fn))
    return "\n".join(lines) + "\n"
