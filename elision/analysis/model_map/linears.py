"""Matching ``y = x @ W^T + b`` however the exporter spelled it: aten.linear, or addmm/mm/matmul on a flattened input."""
from __future__ import annotations

from elision.analysis.model_map.graph_view import GraphView
from elision.analysis.model_map.ops import tensor_shape
from elision.analysis.model_map.records import Linear
from elision.ir.core import Node, Value


def match_linear(g: GraphView, n: Node) -> Linear | None:
    op = n.op
    if op == "aten.linear.default":
        w = g.param_name(n.args[1]) if len(n.args) > 1 and isinstance(n.args[1], Value) else None
        if w is None:
            return None
        b_arg = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        b = g.param_name(b_arg) if isinstance(b_arg, Value) else None
        wt = g.module.params[w]
        if wt.dim() != 2:
            return None
        return Linear(n, w, b, n.args[0], n.result, int(wt.shape[1]), int(wt.shape[0]), [n])
    if op in ("aten.addmm.default", "aten.mm.default", "aten.matmul.default"):
        if op == "aten.addmm.default":
            bias_v, x, wv = n.args[0], n.args[1], n.args[2]
        else:
            bias_v, x, wv = None, n.args[0], n.args[1]
        if not isinstance(wv, Value) or not isinstance(x, Value):
            return None
        w = g.param_name(wv)
        if w is None or g.module.params[w].dim() != 2:
            return None
        # mm(x, W) with W [in, out] (Conv1D) or mm(x, t(W)) with W [out, in]
        wshape = tensor_shape(wv)
        if wshape is None or len(wshape) != 2:
            return None
        in_f, out_f = int(wshape[0]), int(wshape[1])
        b = g.param_name(bias_v) if isinstance(bias_v, Value) else None
        nodes = [n]
        inp, out = x, n.result
        px = g.prod.get(x)
        if px is not None and px.op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
            inp = px.args[0]
            nodes.insert(0, px)
        us = g.uses.get(n.result, [])
        if len(us) == 1 and us[0].op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
            out = us[0].result
            nodes.append(us[0])
        return Linear(n, w, b, inp, out, in_f, out_f, nodes)
    return None
