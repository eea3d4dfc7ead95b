"""Which tensor axes of an IR function index tokens, and rewriting a graph region to a shorter token axis.

Token pruning changes the sequence length in the middle of a graph; every downstream value whose axis is
"the token axis" shrinks from N to K: views/reshapes/expands that spell N, the attention mask (which was
built once, before the pruning point, at length N), the pooling weights of a sentence encoder. Shapes are
static, so N cannot be found by value (a head dim or a batch may also equal N). Instead axes are unified
along the data flow: an (value, axis) pair is linked to the pairs it corresponds to through each op
(elementwise broadcasting, linear, transpose, view by prefix product, SDPA query/key/mask axes, ...), and
the class of (hidden state after the pruning layer, axis 1) is the token axis everywhere it reaches.
"""
from __future__ import annotations

import math

from elision.ir.core import Function, Node, Value
from elision.ir.types import TensorType

# ops whose output aligns with their (broadcast) inputs axis by axis, right-aligned
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "where", "masked_fill", "__and__", "__or__", "bitwise_and", "bitwise_or",
    "logical_and", "logical_or", "logical_not", "eq", "ne", "ge", "gt", "le", "lt", "clone", "_to_copy", "to",
    "gelu", "relu", "silu", "tanh", "sigmoid", "neg", "exp", "log", "sqrt", "rsqrt", "pow", "clamp", "clamp_min",
    "layer_norm", "softmax", "_softmax", "log_softmax", "dropout", "alias", "detach", "contiguous", "erf",
    "_assert_tensor_metadata", "type_as", "abs", "reciprocal", "rms_norm",
}
_REDUCE = {"sum", "mean", "amax", "amin", "max", "min", "prod", "std", "var", "norm", "any", "all"}
_RESHAPE = {"view", "reshape", "_unsafe_view", "flatten"}


def base_op(op: str) -> str:
    """`aten.add.Tensor` -> `add`."""
    parts = op.split(".")
    return parts[1] if parts[0] == "aten" and len(parts) >= 2 else op


def shape_of(v) -> tuple | None:
    if isinstance(v, Value) and isinstance(v.type, TensorType):
        return tuple(v.type.shape)
    return None


class AxisClasses:
    """Union-find over (value name, axis)."""

    def __init__(self) -> None:
        self.parent: dict[tuple[str, int], tuple[str, int]] = {}

    def find(self, key):
        self.parent.setdefault(key, key)
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def union(self, a: Value, ia: int, b: Value, ib: int) -> None:
        sa, sb = shape_of(a), shape_of(b)
        if sa is None or sb is None:
            return
        ia, ib = ia % len(sa) if sa else 0, ib % len(sb) if sb else 0
        if not sa or not sb or sa[ia] != sb[ib] or sa[ia] == 1:
            return
        ra, rb = self.find((a.name, ia)), self.find((b.name, ib))
        if ra != rb:
            self.parent[ra] = rb


def _dims(arg, rank: int) -> list[int]:
    dims = arg if isinstance(arg, (list, tuple)) else [arg]
    return [d % rank for d in dims if isinstance(d, int)]


def link_node(node: Node, uf: AxisClasses) -> None:
    """Link the axes of `node`'s tensor inputs to the axes of its result they correspond to."""
    out = node.result
    so = shape_of(out)
    if so is None:
        return
    op = base_op(node.op)
    args = node.args
    x = args[0] if args else None
    sx = shape_of(x)
    ro = len(so)
    if op in _ELEMENTWISE:
        for v in node.inputs:
            sv = shape_of(v)
            if sv is not None and len(sv) <= ro:
                for a in range(len(sv)):
                    uf.union(v, a, out, a + ro - len(sv))
    elif op == "expand" and sx is not None:
        for a in range(len(sx)):
            uf.union(x, a, out, a + ro - len(sx))
    elif op == "linear" and sx is not None:
        for a in range(len(sx) - 1):
            uf.union(x, a, out, a)
    elif op == "embedding" and len(args) > 1 and shape_of(args[1]) is not None:
        for a in range(len(shape_of(args[1]))):
            uf.union(args[1], a, out, a)
    elif op in ("transpose", "t") and sx is not None:
        d0, d1 = (args[1], args[2]) if op == "transpose" else (0, 1)
        perm = list(range(len(sx)))
        perm[d0 % len(sx)], perm[d1 % len(sx)] = perm[d1 % len(sx)], perm[d0 % len(sx)]
        for o, i in enumerate(perm):
            uf.union(x, i, out, o)
    elif op == "permute" and sx is not None:
        for o, i in enumerate(args[1]):
            uf.union(x, i % len(sx), out, o)
    elif op == "unsqueeze" and sx is not None:
        d = args[1] % ro
        for a in range(len(sx)):
            uf.union(x, a, out, a + (a >= d))
    elif op == "squeeze" and sx is not None:
        kept = [a for a in range(len(sx)) if not (sx[a] == 1 and (len(args) < 2 or a in _dims(args[1], len(sx))))]
        for o, a in enumerate(kept):
            uf.union(x, a, out, o)
    elif op == "select" and sx is not None:
        d = args[1] % len(sx)
        for o, a in enumerate([a for a in range(len(sx)) if a != d]):
            uf.union(x, a, out, o)
    elif op == "slice" and sx is not None:
        d = args[1] % len(sx) if len(args) > 1 else 0
        for a in range(len(sx)):
            if a != d or sx[a] == so[a]:
                uf.union(x, a, out, a)
    elif op == "cat" and isinstance(x, (list, tuple)):
        d = (args[1] if len(args) > 1 else node.kwargs.get("dim", 0)) % ro
        for v in x:
            sv = shape_of(v)
            if sv is not None and len(sv) == ro:
                for a in range(ro):
                    if a != d:
                        uf.union(v, a, out, a)
    elif op in _REDUCE and sx is not None:
        dims = _dims(args[1], len(sx)) if len(args) > 1 and args[1] is not None else list(range(len(sx)))
        keepdim = (args[2] if len(args) > 2 else node.kwargs.get("keepdim", False)) is True
        o = 0
        for a in range(len(sx)):
            if a in dims:
                o += int(keepdim)
                continue
            uf.union(x, a, out, o)
            o += 1
    elif op in _RESHAPE and sx is not None:
        # axis a of the input is axis b of the output when both have the same size and the same number of
        # elements before them (the axis was neither split nor merged)
        pre_in = [math.prod(sx[:a]) for a in range(len(sx))]
        pre_out = {math.prod(so[:b]): b for b in range(ro)}
        for a in range(len(sx)):
            b = pre_out.get(pre_in[a])
            if b is not None and isinstance(sx[a], int) and all(isinstance(d, int) for d in so):
                uf.union(x, a, out, b)
    elif op in ("matmul", "bmm") and sx is not None and shape_of(args[1]) is not None:
        y, sy = args[1], shape_of(args[1])
        for a in range(len(sx) - 2):
            uf.union(x, a, out, a + ro - len(sx))
        for a in range(len(sy) - 2):
            uf.union(y, a, out, a + ro - len(sy))
        uf.union(x, -2, out, -2)
        uf.union(y, -1, out, -1)
        uf.union(x, -1, y, -2)
    elif op == "scaled_dot_product_attention":
        q, k, v = args[0], args[1], args[2]
        mask = args[3] if len(args) > 3 else node.kwargs.get("attn_mask")
        for a in range(ro - 1):
            uf.union(q, a, out, a)
        uf.union(k, -2, v, -2)
        if isinstance(mask, Value):
            uf.union(mask, -2, q, -2)
            uf.union(mask, -1, k, -2)


def token_axes(fn: Function, seed: Value, axis: int) -> dict[str, list[int]]:
    """value name -> its axes in the token class of (seed, axis), for every value of `fn`."""
    uf = AxisClasses()
    for node in fn.nodes:
        link_node(node, uf)
    root = uf.find((seed.name, axis))
    out: dict[str, list[int]] = {}
    for key in list(uf.parent):
        if uf.find(key) == root:
            out.setdefault(key[0], []).append(key[1])
    return {k: sorted(v) for k, v in out.items()}
