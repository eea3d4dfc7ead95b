"""The op families the model map reasons about, and small predicates on single nodes and values."""
from __future__ import annotations

from elision.ir.core import Node, Value
from elision.ir.types import TensorType

# Ops that only move, copy or re-type data: looked through when following the residual stream or a projection.
TRANSPARENT_OPS = {
    "aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.contiguous.default",
    "aten._to_copy.default", "aten.to.dtype", "aten.type_as.default", "aten.dropout.default",
    "aten.lift_fresh_copy.default",
}
LAYOUT_OPS = TRANSPARENT_OPS | {
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.transpose.int",
    "aten.permute.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.expand.default",
    "aten.slice.Tensor", "aten.t.default", "aten.flatten.using_ints",
}
# dtype casts: the part of a norm's chain (HF casts to fp32 and back) that changes no value in fp32
CAST_OPS = {"aten._to_copy.default", "aten.to.dtype", "aten.type_as.default"}
SOFTMAX_OPS = {"aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default"}
MATMUL_OPS = {"aten.matmul.default", "aten.bmm.default"}
SDPA_OPS = {"aten.scaled_dot_product_attention.default"}
FUSED_ATTENTION_OPS = {"elision.attention.default"}
ADD_OPS = {"aten.add.Tensor"}
REPEAT_OPS = {"aten.repeat_interleave.self_int"}

# exporters spell "to the end" as INT64_MAX; any end at or beyond 2**62 is past every real dim
TO_THE_END = 2**62


def is_full_slice(n: Node) -> bool:
    """``aten.slice.Tensor(x, dim, 0, end>=2**62 or None, 1)``: the identity on ``x`` (``x[:, :]``)."""
    if n.op != "aten.slice.Tensor":
        return False
    args = list(n.args) + [None] * (5 - len(n.args))
    start = args[2] if args[2] is not None else 0
    end, step = args[3], args[4] if args[4] is not None else 1
    return start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= TO_THE_END))


def tensor_shape(v: Value) -> tuple | None:
    return v.type.shape if isinstance(v.type, TensorType) else None


def opname(n: Node) -> str:
    """``aten.linear.default`` -> ``linear``; ``getitem`` -> ``getitem``."""
    parts = n.op.split(".")
    return parts[1] if len(parts) == 3 else parts[-1]


def is_scalar_const(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


def layer_of(loc: str) -> tuple[str, int] | None:
    """``"model.layers.3.mlp"`` -> ``("model.layers", 3)``: the stack and index of the layer a location is in.

    The first numbered component counts, not the last: ``layers.0.mlp.experts.3`` belongs to layer 0.
    """
    parts = (loc or "").split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i > 0:
            return ".".join(parts[:i]), int(p)
    return None
