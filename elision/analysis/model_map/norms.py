"""Matching norms: LayerNorm (``aten.layer_norm`` / ``native_layer_norm``), RMSNorm (the pow/mean/add-eps/rsqrt/mul
chain with Hugging Face's casts, or ``aten.rms_norm``), and elision's own fused norm ops."""
from __future__ import annotations

from elision.analysis.model_map.graph_view import GraphView
from elision.analysis.model_map.ops import CAST_OPS, is_scalar_const, tensor_shape
from elision.analysis.model_map.records import Norm
from elision.ir.core import Node, Value


def match_norm(g: GraphView, n: Node) -> Norm | None:
    """The norm ``n`` is the anchor of (its rsqrt, layer_norm or fused op), or None."""
    if n.op in ("aten.layer_norm.default", "aten.native_layer_norm.default"):
        return _match_layernorm(g, n)
    if n.op == "aten.rsqrt.default":
        return _match_rmsnorm(g, n)
    if n.op in ("elision.rms_norm.default", "elision.layer_norm.default"):
        rms = n.op.startswith("elision.rms")
        w = g.param_name(n.args[1]) if isinstance(n.args[1], Value) else None
        b = None if rms or not isinstance(n.args[2], Value) else g.param_name(n.args[2])
        return Norm("rmsnorm" if rms else "layernorm", [n], n.args[0], n.result, w, b, float(n.args[-1]))
    if n.op in ("elision.add_rms_norm.default", "elision.add_layer_norm.default"):
        rms = n.op.startswith("elision.add_rms")
        gets = {u.args[1]: u for u in g.uses.get(n.result, []) if u.op == "getitem"}
        if 0 not in gets:
            return None
        w = g.param_name(n.args[2]) if isinstance(n.args[2], Value) else None
        b = None if rms or not isinstance(n.args[3], Value) else g.param_name(n.args[3])
        summed = gets[1].result if 1 in gets else n.args[0]
        return Norm("rmsnorm" if rms else "layernorm", [n] + list(gets.values()), summed, gets[0].result, w, b,
                    float(n.args[-1]))
    if n.op == "aten.rms_norm.default":
        w = g.param_name(n.args[2]) if len(n.args) > 2 and isinstance(n.args[2], Value) else None
        eps = n.args[3] if len(n.args) > 3 and n.args[3] is not None else 0.0
        return Norm("rmsnorm", [n], n.args[0], n.result, w, None, float(eps))
    return None


def _scalar_arg(n: Node, i: int):
    return n.args[i] if len(n.args) > i else None


def _match_rmsnorm(g: GraphView, rsqrt: Node) -> Norm | None:
    """rsqrt(mean(x^2) + eps) * x [* weight], with the HF casts around it."""
    add = g.prod.get(rsqrt.args[0]) if isinstance(rsqrt.args[0], Value) else None
    eps = 0.0
    if add is not None and add.op == "aten.add.Tensor" and is_scalar_const(_scalar_arg(add, 1)):
        eps = float(add.args[1])
        mean = g.prod.get(add.args[0])
    else:
        mean = add
    if mean is None or mean.op != "aten.mean.dim":
        return None
    dims = mean.args[1] if len(mean.args) > 1 else None
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not keep or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return None
    sq = g.prod.get(mean.args[0])
    if sq is None:
        return None
    if sq.op == "aten.pow.Tensor_Scalar" and sq.args[1] == 2:
        xf = sq.args[0]
    elif sq.op == "aten.mul.Tensor" and sq.args[0] == sq.args[1]:
        xf = sq.args[0]
    else:
        return None
    rank = len(tensor_shape(xf) or ())
    if dims[0] not in (-1, rank - 1):
        return None
    # x * rsqrt
    muls = [u for u in g.uses.get(rsqrt.result, []) if u.op == "aten.mul.Tensor" and xf in u.args[:2]]
    if len(muls) != 1:
        return None
    nodes = [n for n in (sq, mean, add, rsqrt, muls[0]) if n is not None]
    x = g.through(xf, CAST_OPS)
    cast = g.prod.get(xf)  # the cast to fp32 (when present) belongs to the norm
    if cast is not None and cast is not g.prod.get(x) and cast.op in CAST_OPS:
        nodes.insert(0, cast)
    out = muls[0].result
    # optional cast back to the input dtype, then the weight multiply
    nxt = g.forward_through(out, CAST_OPS)
    chain = out
    while chain != nxt:
        u = g.uses[chain][0]
        nodes.append(u)
        chain = u.result
    weight = None
    us = g.uses.get(nxt, [])
    if len(us) == 1 and us[0].op == "aten.mul.Tensor":
        other = us[0].args[1] if us[0].args[0] == nxt else us[0].args[0]
        if isinstance(other, Value):
            pname = g.param_name(other)
            shape = tensor_shape(other)
            if pname is not None and shape is not None and len(shape) == 1:
                weight = pname
                nodes.append(us[0])
                nxt = us[0].result
    return Norm("rmsnorm", nodes, x, nxt, weight, None, eps)


def _match_layernorm(g: GraphView, n: Node) -> Norm | None:
    if n.op == "aten.layer_norm.default":
        args = list(n.args) + [None] * (5 - len(n.args))
        w = g.param_name(args[2]) if isinstance(args[2], Value) else None
        b = g.param_name(args[3]) if isinstance(args[3], Value) else None
        eps = float(args[4]) if args[4] is not None else float(n.kwargs.get("eps", 1e-5))
        return Norm("layernorm", [n], n.args[0], n.result, w, b, eps)
    if n.op == "aten.native_layer_norm.default":
        gets = [u for u in g.uses.get(n.result, []) if u.op == "getitem" and u.args[1] == 0]
        if len(gets) != 1:
            return None
        w = g.param_name(n.args[2]) if isinstance(n.args[2], Value) else None
        b = g.param_name(n.args[3]) if isinstance(n.args[3], Value) else None
        return Norm("layernorm", [n, gets[0]], n.args[0], gets[0].result, w, b, float(n.args[4]))
    return None
