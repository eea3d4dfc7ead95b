"""Which axes of an op's result correspond to which axes of its inputs: the per-op rules, written once.

Two analyses read them:
  * `token_axes` (token pruning) unions every correspondence into classes of axes, and follows the class of the
    hidden state's token axis through the graph;
  * `query_independence` (sparse volume decoding) follows one axis, the query axis, forward and fails at the first
    op that combines values along it.

A rule (`AxisRule`) holds
  links   (input, input axis) -> result axis: index i of the result along that axis is computed from index i of
          the input along it and from no other index (``mixes=False``), or from every index along it (``mixes=True``:
          a softmax, a norm, a cumulative sum or a sort over that axis keeps the axis but mixes values along it);
  ties    pairs of input axes that the op contracts with each other (a matmul's inner axes, attention's key axes);
          an axis in a tie is consumed even where the same value also fills a linked argument (attention(x, x, x)).
An input axis with neither is consumed by the op: reduced, contracted, indexed, or merged with another by a reshape;
`verb` says which, for the messages of the query-axis proof.

Ops with several results (split, sort, native_layer_norm, max.dim) have a tuple result: a link then names the part it
lands in (`result_part`), and `getitem` links a part of its tuple input (`part`) to its result.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import sympy

from elision.ir.core import Node, Value
from elision.ir.symbolic import to_sympy
from elision.ir.types import TensorType, TupleType


@dataclass(frozen=True)
class Link:
    source: Value
    axis: int
    result_axis: int
    mixes: bool = False
    part: int | None = None         # element of a tuple-valued source (getitem)
    result_part: int | None = None  # element of a tuple-valued result (split, sort, ...)


@dataclass
class AxisRule:
    links: list[Link] = field(default_factory=list)
    ties: list[tuple[Value, int, Value, int]] = field(default_factory=list)
    verb: str = "consumes"  # what the op does to an input axis that has no link, or to a linked one it mixes
    input_verbs: dict[str, str] = field(default_factory=dict)  # per input value name, where it differs

    def verb_for(self, v: Value) -> str:
        return self.input_verbs.get(v.name, self.verb)


def base_op(op: str) -> str:
    """`aten.add.Tensor` -> `add`; elision's own ops keep their namespace (`elision.attention`)."""
    parts = op.split(".")
    if parts[0] == "aten" and len(parts) >= 2:
        return parts[1]
    if parts[0] == "elision" and len(parts) >= 2:
        return "elision." + parts[1]
    return op


def shape_of(v) -> tuple | None:
    if isinstance(v, Value) and isinstance(v.type, TensorType):
        return tuple(v.type.shape)
    return None


def part_shapes(v: Value) -> list[tuple | None]:
    """Shapes of the elements of a tuple-valued value (None where an element is not a tensor)."""
    if isinstance(v.type, TupleType):
        return [tuple(e.shape) if isinstance(e, TensorType) else None for e in v.type.elems]
    return []


def prod(dims) -> int | sympy.Expr:
    """Product of static and symbolic (string) dims; symbolic ones as a sympy expression (so `batch*50` keys
    compare; a sympy integer equals and hashes as the int)."""
    if all(isinstance(d, int) for d in dims):
        return math.prod(dims)
    out = sympy.Integer(1)
    for d in dims:
        out = out * (to_sympy(d) if isinstance(d, str) else sympy.Integer(d))
    return sympy.expand(out)


def _dims(arg, rank: int) -> list[int]:
    dims = arg if isinstance(arg, (list, tuple)) else [arg]
    return [d % rank for d in dims if isinstance(d, int)]


def _arg(node: Node, index: int, name: str, default=None):
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


# ------------------------------------------------------------------------------------------- the rules

# ops whose result aligns with their (broadcast) inputs axis by axis, right-aligned
ELEMENTWISE = {
    "add", "sub", "mul", "div", "rsub", "where", "masked_fill", "__and__", "__or__", "bitwise_and", "bitwise_or",
    "logical_and", "logical_or", "logical_not", "eq", "ne", "ge", "gt", "le", "lt", "clone", "_to_copy", "to",
    "type_as", "copy", "gelu", "relu", "silu", "tanh", "sigmoid", "neg", "exp", "log", "sqrt", "rsqrt", "pow",
    "clamp", "clamp_min", "clamp_max", "hardtanh", "leaky_relu", "softplus", "mish", "elu", "erf", "abs",
    "reciprocal", "square", "maximum", "minimum", "sign", "sin", "cos", "dropout", "alias", "detach", "contiguous",
    "lift_fresh_copy", "_assert_tensor_metadata",
}
# the same, but values mix along the normalised trailing axes / along `dim`
NORMS = {"layer_norm", "rms_norm", "native_layer_norm"}
MIX_ALONG_DIM = {"softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "cummax", "cummin",
                 "argsort", "sort"}
REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "norm", "any", "all", "logsumexp",
              "argmax", "argmin", "var_mean", "linalg_vector_norm", "kthvalue", "median"}
RESHAPES = {"view", "reshape", "_unsafe_view", "flatten"}
SPLITS = {"split", "split_with_sizes", "chunk", "unbind", "tensor_split"}
ATTENTIONS = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention",
              "_scaled_dot_product_efficient_attention", "elision.attention"}


def _right_aligned(node: Node, rule: AxisRule, inputs, ro: int, mixed: Callable[[int], bool] = lambda a: False,
                   result_part: int | None = None) -> None:
    for v in inputs:
        sv = shape_of(v)
        if sv is not None and len(sv) <= ro:
            for a in range(len(sv)):
                b = a + ro - len(sv)
                rule.links.append(Link(v, a, b, mixes=v is node.args[0] and mixed(b), result_part=result_part))


def _elementwise(node: Node, so: tuple) -> AxisRule:
    rule = AxisRule(verb="broadcasts")
    _right_aligned(node, rule, node.inputs, len(so))
    return rule


def _norm(node: Node, so: tuple) -> AxisRule:
    normalized = _arg(node, 1, "normalized_shape", ())
    k = len(normalized) if isinstance(normalized, (list, tuple)) else 1
    rule = AxisRule(verb="normalises over")
    _right_aligned(node, rule, node.inputs, len(so), mixed=lambda b: b >= len(so) - k,
                   result_part=0 if base_op(node.op) == "native_layer_norm" else None)
    return rule


def _mix_along(node: Node, so: tuple | None) -> AxisRule:
    op = base_op(node.op)
    x = node.args[0]
    sx = shape_of(x)
    d = _arg(node, 1, "dim", -1) % len(sx)
    rule = AxisRule(verb=f"{op} mixes values along")
    parts = [0, 1] if so is None else [None]  # sort, cummax, cummin: (values, indices)
    for p in parts:
        for a in range(len(sx)):
            rule.links.append(Link(x, a, a, mixes=a == d, result_part=p))
    return rule


def _topk(node: Node) -> AxisRule:
    x, sx = node.args[0], shape_of(node.args[0])
    d = _arg(node, 2, "dim", -1) % len(sx)
    rule = AxisRule(verb="topk mixes values along")
    for p in (0, 1):
        rule.links += [Link(x, a, a, result_part=p) for a in range(len(sx)) if a != d]
    return rule


def _reduction(node: Node, so: tuple | None) -> AxisRule | None:
    op = base_op(node.op)
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    if len(node.args) > 1 and isinstance(node.args[1], Value):  # max.other / min.other: elementwise
        return _elementwise(node, so) if so is not None else None
    dim_at, keep_at = (2, 3) if op in ("norm", "linalg_vector_norm") else (1, 2)
    if op in ("kthvalue",):
        dim_at, keep_at = 2, 3
    dim_arg = _arg(node, dim_at, "dim")
    dims = _dims(dim_arg, len(sx)) if dim_arg is not None else list(range(len(sx)))
    keepdim = _arg(node, keep_at, "keepdim", False) is True
    rule = AxisRule(verb="reduces over")
    parts = [None] if so is not None else list(range(len(part_shapes(node.result))))
    for p in parts:
        o = 0
        for a in range(len(sx)):
            if a in dims:
                o += int(keepdim)
                continue
            rule.links.append(Link(x, a, o, result_part=p))
            o += 1
    return rule


def _reshape(node: Node, so: tuple) -> AxisRule | None:
    # axis a of the input is axis b of the result when both have the same size and the same number of elements
    # before them (the axis was neither split nor merged); element counts may be symbolic (a dynamic batch)
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    rule = AxisRule(verb=f"{base_op(node.op)} merges or splits")
    pre_out: dict = {}
    for b in range(len(so)):
        pre_out.setdefault(prod(so[:b]), []).append(b)
    for a in range(len(sx)):
        same = [b for b in pre_out.get(prod(sx[:a]), []) if str(so[b]) == str(sx[a])]
        if same:
            rule.links.append(Link(x, a, same[-1]))
    return rule


def _matmul(node: Node, so: tuple) -> AxisRule | None:
    x, y = node.args[0], node.args[1]
    sx, sy = shape_of(x), shape_of(y)
    if sx is None or sy is None or len(sx) < 2 or len(sy) < 2:
        return None
    ro = len(so)
    rule = AxisRule(verb="contracts over")
    rule.links += [Link(x, a, a + ro - len(sx)) for a in range(len(sx) - 2)]
    rule.links += [Link(y, a, a + ro - len(sy)) for a in range(len(sy) - 2)]
    rule.links += [Link(x, len(sx) - 2, ro - 2), Link(y, len(sy) - 1, ro - 1)]
    rule.ties.append((x, len(sx) - 1, y, len(sy) - 2))
    return rule


def _attention(node: Node, so: tuple | None) -> AxisRule:
    q, k, v = node.args[0], node.args[1], node.args[2]
    mask = _arg(node, 3, "attn_mask") if base_op(node.op) != "elision.attention" else _arg(node, 3, "bias")
    sq = shape_of(q)
    part = None if so is not None else 0  # the flash/efficient variants return (out, logsumexp, ...)
    rule = AxisRule(verb="contracts over",
                    input_verbs={k.name: "keys/values depend on the queries (attention mixes along)",
                                 v.name: "keys/values depend on the queries (attention mixes along)"})
    rule.links += [Link(q, a, a, result_part=part) for a in range(len(sq) - 1)]
    rule.ties.append((k, -2 % len(shape_of(k)), v, -2 % len(shape_of(v))))
    sm = shape_of(mask)
    if sm is not None:
        rule.links.append(Link(mask, len(sm) - 2, len(sq) - 2, result_part=part))  # row i masks query i
        rule.ties.append((mask, len(sm) - 1, k, len(shape_of(k)) - 2))
        rule.input_verbs[mask.name] = "masks along"
    return rule


def _sparse_cross_attention(node: Node, so: tuple) -> AxisRule:
    q = node.args[0]
    rule = AxisRule(verb="contracts over",
                    input_verbs={node.args[1].name: "keys/values depend on the queries (attention mixes along)",
                                 node.args[2].name: "keys/values depend on the queries (attention mixes along)",
                                 node.args[3].name: "indexes along"})
    rule.links += [Link(q, a, a) for a in range(len(shape_of(q)) - 1)]
    return rule


def _getitem(node: Node, so: tuple | None) -> AxisRule | None:
    src, index = node.args[0], node.args[1]
    shapes = part_shapes(src) if isinstance(src, Value) else []
    if not isinstance(index, int) or not 0 <= index < len(shapes) or shapes[index] is None:
        return None
    return AxisRule(links=[Link(src, a, a, part=index) for a in range(len(shapes[index]))], verb="selects")


def _split(node: Node, so: tuple | None) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    op = base_op(node.op)
    d = (_arg(node, 1, "dim", 0) if op == "unbind" else _arg(node, 2, "dim", 0)) % len(sx)
    rule = AxisRule(verb=f"{op} splits")
    for p in range(len(part_shapes(node.result))):
        kept = [a for a in range(len(sx)) if not (op == "unbind" and a == d)]
        for o, a in enumerate(kept):
            if a != d:
                rule.links.append(Link(x, a, o, result_part=p))
    return rule


def _cat(node: Node, so: tuple) -> AxisRule:
    op = base_op(node.op)
    tensors = node.args[0]
    ro = len(so)
    d = _arg(node, 1, "dim", 0) % ro
    rule = AxisRule(verb=f"{op} concatenates along")
    for v in tensors if isinstance(tensors, (list, tuple)) else ():
        sv = shape_of(v)
        if sv is None:
            continue
        if op == "stack" and len(sv) == ro - 1:
            rule.links += [Link(v, a, a + (a >= d)) for a in range(len(sv))]
        elif op != "stack" and len(sv) == ro:
            rule.links += [Link(v, a, a) for a in range(ro) if a != d]
    return rule


def _transpose(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    d0, d1 = (node.args[1], node.args[2]) if base_op(node.op) == "transpose" else (0, 1)
    perm = list(range(len(sx)))
    perm[d0 % len(sx)], perm[d1 % len(sx)] = perm[d1 % len(sx)], perm[d0 % len(sx)]
    return AxisRule(links=[Link(x, i, o) for o, i in enumerate(perm)])


def _permute(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    return AxisRule(links=[Link(x, i % len(sx), o) for o, i in enumerate(node.args[1])])


def _unsqueeze(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    d = node.args[1] % len(so)
    return AxisRule(links=[Link(x, a, a + (a >= d)) for a in range(len(sx))])


def _squeeze(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    args = node.args
    kept = [a for a in range(len(sx)) if not (sx[a] == 1 and (len(args) < 2 or a in _dims(args[1], len(sx))))]
    return AxisRule(links=[Link(x, a, o) for o, a in enumerate(kept)], verb="squeezes")


def _expand(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    return AxisRule(links=[Link(x, a, a + len(so) - len(sx)) for a in range(len(sx))])


def _select(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    d = node.args[1] % len(sx)
    return AxisRule(links=[Link(x, a, o) for o, a in enumerate(a for a in range(len(sx)) if a != d)],
                    verb="select indexes along")


def _slice(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    d = _arg(node, 1, "dim", 0) % len(sx)
    # a slice that keeps the whole axis is the identity along it
    return AxisRule(links=[Link(x, a, a) for a in range(len(sx)) if a != d or sx[a] == so[a]],
                    verb=f"{base_op(node.op)} indexes along")


def _index_select(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    idx = node.args[2]
    if sx is None:
        return None
    d = node.args[1] % len(sx)
    rule = AxisRule(links=[Link(x, a, a) for a in range(len(sx)) if a != d], verb="index_select indexes along")
    if shape_of(idx) is not None and len(shape_of(idx)) == 1:
        rule.links.append(Link(idx, 0, d))  # result row i is row idx[i]
    return rule


def _embedding(node: Node, so: tuple) -> AxisRule | None:
    idx = node.args[1] if len(node.args) > 1 else None
    si = shape_of(idx)
    if si is None:
        return None
    return AxisRule(links=[Link(idx, a, a) for a in range(len(si))], verb="looks up along")


def _indexing(node: Node, so: tuple) -> AxisRule:
    return AxisRule(verb=f"{base_op(node.op)} indexes along")


def _linear(node: Node, so: tuple) -> AxisRule | None:
    x, sx = node.args[0], shape_of(node.args[0])
    if sx is None:
        return None
    return AxisRule(links=[Link(x, a, a) for a in range(len(sx) - 1)], verb="contracts over")


_RULES: dict[str, Callable[[Node, tuple | None], AxisRule | None]] = {
    **{op: _elementwise for op in ELEMENTWISE},
    **{op: _norm for op in NORMS},
    **{op: _mix_along for op in MIX_ALONG_DIM},
    **{op: _reduction for op in REDUCTIONS},
    **{op: _reshape for op in RESHAPES},
    **{op: _split for op in SPLITS},
    **{op: _attention for op in ATTENTIONS},
    **{op: _indexing for op in ("index", "take", "gather", "scatter")},
    "elision.sparse_cross_attention": _sparse_cross_attention,
    "topk": lambda node, so: _topk(node),
    "getitem": _getitem,
    "cat": _cat, "concat": _cat, "stack": _cat,
    "matmul": _matmul, "bmm": _matmul, "mm": _matmul,
    "transpose": _transpose, "t": _transpose, "permute": _permute,
    "unsqueeze": _unsqueeze, "squeeze": _squeeze, "expand": _expand, "expand_as": _expand,
    "select": _select, "slice": _slice, "narrow": _slice, "index_select": _index_select,
    "embedding": _embedding, "linear": _linear,
}
# ops whose result may be a tuple (the others need a tensor result to have a rule)
_TUPLE_RESULTS = NORMS | MIX_ALONG_DIM | REDUCTIONS | SPLITS | ATTENTIONS | {"topk", "getitem"}


def axis_rule(node: Node) -> AxisRule | None:
    """The axis correspondences of `node`, or None when the op has no rule (unknown op, or an unsupported form)."""
    op = base_op(node.op)
    make = _RULES.get(op)
    if make is None:
        return None
    so = shape_of(node.result)
    if so is None and not (op in _TUPLE_RESULTS and isinstance(node.result.type, TupleType)):
        return None
    try:
        return make(node, so)
    except (TypeError, IndexError):
        return None  # an argument form the rule does not know (a dim given as a value, a missing shape)
