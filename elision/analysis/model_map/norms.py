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
    """rsqrt(mean(x^2) + eps) * x [* weight], with the HF casts around it; with ``x - mean(x)`` in place of ``x``
    it is a LayerNorm written out (Cohere's bias-free LayerNorm)."""
    add = g.prod.get(rsqrt.args[0]) if isinstance(rsqrt.args[0], Value) else None
    eps = 0.0
    if add is not None and add.op == "aten.add.Tensor" and is_scalar_const(_scalar_arg(add, 1)):
        eps = float(add.args[1])
        mean = g.prod.get(add.args[0])
    else:
        mean = add
    if not _is_last_dim_mean(g, mean):
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
    centered = _centered(g, xf)
    # x * rsqrt (a LayerNorm may subtract the mean twice: the trace keeps both subs)
    muls = [u for u in g.uses.get(rsqrt.result, []) if u.op == "aten.mul.Tensor" and
            any(isinstance(a, Value) and (a == xf or (centered and _centered(g, a) == centered)) for a in u.args[:2])]
    if len(muls) != 1:
        return None
    nodes = [n for n in (sq, mean, add, rsqrt, muls[0]) if n is not None]
    if centered:
        x, center_mean = centered
        subs = [g.prod[xf]] + [g.prod[a] for a in muls[0].args[:2] if a not in (rsqrt.result, xf)]
        nodes = [g.prod[center_mean]] + subs + nodes
    else:
        x = g.through(xf, CAST_OPS)
        cast = g.prod.get(xf)  # the cast to fp32 (when present) belongs to the norm
        if cast is not None and cast is not g.prod.get(x) and cast.op in CAST_OPS:
            nodes.insert(0, cast)
    out = _follow_casts(g, muls[0].result, nodes)  # optional cast back to the input dtype
    weight, offset, out = _weight_multiply(g, out, nodes)
    bias = None
    if centered:
        bias, out = _bias_add(g, out, nodes)
    if weight is not None:
        out = _follow_casts(g, out, nodes)  # Gemma casts back after the weight
    return Norm("layernorm" if centered else "rmsnorm", nodes, x, out, weight, bias, eps, offset)


def _is_last_dim_mean(g: GraphView, mean: Node | None) -> bool:
    if mean is None or mean.op != "aten.mean.dim":
        return False
    dims = mean.args[1] if len(mean.args) > 1 else None
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not keep or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return False
    rank = len(tensor_shape(mean.args[0]) or ())
    return dims[0] in (-1, rank - 1)


def _centered(g: GraphView, v: Value) -> tuple[Value, Value] | None:
    """``v = x - mean(x, -1, keepdim)``: (x, the mean)."""
    p = g.prod.get(v)
    if p is None or p.op != "aten.sub.Tensor" or not all(isinstance(a, Value) for a in p.args[:2]):
        return None
    x, m = p.args[0], p.args[1]
    mp = g.prod.get(m)
    if not _is_last_dim_mean(g, mp) or mp.args[0] != x:
        return None
    return x, m


def _follow_casts(g: GraphView, v: Value, nodes: list[Node]) -> Value:
    nxt = g.forward_through(v, CAST_OPS)
    while v != nxt:
        u = g.uses[v][0]
        nodes.append(u)
        v = u.result
    return v


def _weight_multiply(g: GraphView, v: Value, nodes: list[Node]) -> tuple[str | None, float, Value]:
    """The one use of ``v`` multiplying it by a 1-D parameter ``w``, or by ``w + c`` (Gemma's ``1 + w``)."""
    us = g.uses.get(v, [])
    if len(us) != 1 or us[0].op != "aten.mul.Tensor":
        return None, 0.0, v
    other = us[0].args[1] if us[0].args[0] == v else us[0].args[0]
    if not isinstance(other, Value) or len(tensor_shape(other) or ()) != 1:
        return None, 0.0, v
    offset, extra = 0.0, []
    op = g.prod.get(other)
    if op is not None and op.op == "aten.add.Tensor" and is_scalar_const(_scalar_arg(op, 1)) and \
            isinstance(op.args[0], Value) and len(g.uses.get(other, [])) == 1:
        offset, extra, other = float(op.args[1]), [op], op.args[0]
    pname = g.param_name(other)
    if pname is None:
        return None, 0.0, v
    nodes += extra + [us[0]]
    return pname, offset, us[0].result


def _bias_add(g: GraphView, v: Value, nodes: list[Node]) -> tuple[str | None, Value]:
    us = g.uses.get(v, [])
    if len(us) != 1 or us[0].op != "aten.add.Tensor":
        return None, v
    other = us[0].args[1] if us[0].args[0] == v else us[0].args[0]
    pname = g.param_name(other) if isinstance(other, Value) and len(tensor_shape(other) or ()) == 1 else None
    if pname is None:
        return None, v
    nodes.append(us[0])
    return pname, us[0].result


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
