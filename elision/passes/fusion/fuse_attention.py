"""``fuse-attention``: every attention the model map recognizes becomes ``elision.attention`` with an explicit
additive bias (see the package docstring)."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

from elision.analysis.model_map import Attention
from elision.ir.core import Function, Module, Value
from elision.ir.types import TensorType
from elision.passes.base import Pass, register_pass
from elision.passes.fusion.rewrite import FLOAT_DTYPES, clean_up, first_use, fresh_map, insert_node, record_skip

# a fill value this negative (or -inf) removes the position from the softmax exactly, added or assigned
_MASKED = -1e4


@register_pass
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Recognized attention -> ``elision.attention`` with an explicit additive bias."""

    name: ClassVar[str] = "fuse-attention"

    def run(self, module: Module) -> bool:
        changed = False
        for fn in list(module.functions.values()):
            mm = fresh_map(module, fn)
            bias_cache: dict[tuple, Value | None] = {}
            for a in mm.attentions:
                changed |= self._fuse(module, fn, a, bias_cache)
        if changed:
            clean_up(module)
        return changed

    def _fuse(self, module: Module, fn: Function, a: Attention, bias_cache: dict) -> bool:
        where = a.loc or f"%{a.output.name}"
        if a.kind == "fused":
            return False
        q, k, v = a.q, a.k, a.v
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t.type, TensorType) or t.type.rank != 4 or t.type.dtype not in FLOAT_DTYPES:
                record_skip(module, f"fuse-attention: {where}: {name} is {t.type}, not a float [B, H, L, D] tensor")
                return False
        if a.k_unrepeated is not None and a.v_unrepeated is not None:
            k, v = a.k_unrepeated, a.v_unrepeated
        hq, hk = q.type.shape[1], k.type.shape[1]
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            record_skip(module, f"fuse-attention: {where}: head counts {hq} (q) and {hk} (k/v) are not static multiples")
            return False
        anchor = a.node if a.kind == "sdpa" else fn.producer(a.output)
        sdpa_causal = False
        scale = a.scale
        if a.kind == "sdpa":
            node = a.nodes[0]
            args = list(node.args) + [None] * (7 - len(node.args))
            dropout = args[4] if args[4] is not None else node.kwargs.get("dropout_p", 0.0)
            sdpa_causal = bool(args[5] if args[5] is not None else node.kwargs.get("is_causal", False))
            if dropout:
                record_skip(module, f"fuse-attention: {where}: dropout_p={dropout} (training-mode attention)")
                return False
            if sdpa_causal and a.mask is not None:
                record_skip(module, f"fuse-attention: {where}: SDPA with both is_causal and a mask")
                return False
            if sdpa_causal and q.type.shape[2] != k.type.shape[2]:
                # SDPA's is_causal is top-left aligned, elision's bottom-right: equal only for Lq == Lk
                record_skip(module, f"fuse-attention: {where}: is_causal with Lq != Lk (alignment differs)")
                return False
        if a.mask is not None and fn.index(first_use(fn, [a.mask])) > fn.index(anchor):
            # the bias is computed where the mask is first used: it must come before the fused op
            record_skip(module, f"fuse-attention: {where}: mask is computed after the attention's inputs")
            return False
        key = (a.mask, a.mask_form, a.mask_fill, a.mask_scale, q.type.dtype)
        if key not in bias_cache:
            bias_cache[key] = self._bias(module, fn, a, where, q.type.dtype)
        bias = bias_cache[key]
        if bias is False:
            return False
        fused = insert_node(fn, "elision.attention.default", (q, k, v, bias, scale, sdpa_causal), {}, a.output.type,
                      a.loc, anchor, "attention")
        fn.replace_all_uses(a.output, fused.result)
        _views_to_reshapes(fn, fused.result)
        return True

    def _bias(self, module: Module, fn: Function, a: Attention, where: str, dtype: str):
        """Additive float bias Value for the attention's mask (None: no mask; False: cannot express)."""
        m = a.mask
        if m is None:
            return None
        mt = m.type
        if not isinstance(mt, TensorType) or mt.rank > 4:
            record_skip(module, f"fuse-attention: {where}: mask {mt} is not a tensor of rank <= 4")
            return False
        before = first_use(fn, [m])
        loc = before.loc
        fty = TensorType(dtype, mt.shape)
        if a.mask_form in ("sdpa-bool", "where-keep", "masked_fill"):
            fill = -math.inf if a.mask_form == "sdpa-bool" else a.mask_fill
            if fill is None or fill > _MASKED:
                record_skip(module, f"fuse-attention: {where}: masked_fill value {fill} does not remove positions "
                              f"(only fills <= {_MASKED:g} or -inf are additive-equivalent)")
                return False
            if mt.dtype != "bool":
                record_skip(module, f"fuse-attention: {where}: mask {mt} is not boolean")
                return False
            drop = m
            if a.mask_form != "masked_fill":  # True = keep -> True = drop
                drop = insert_node(fn, "aten.logical_not.default", (m,), {}, mt, loc, before, "mask_drop").result
            zeros = insert_node(fn, "aten.zeros_like.default", (m,), {"dtype": fty.torch_dtype}, fty, loc, before,
                          "mask_zeros").result
            bias = insert_node(fn, "aten.masked_fill.Scalar", (zeros, drop, float(fill)), {}, fty, loc, before,
                         "attn_bias").result
        elif a.mask_form == "additive":
            if mt.dtype not in FLOAT_DTYPES:
                record_skip(module, f"fuse-attention: {where}: additive mask of dtype {mt.dtype}")
                return False
            bias = m
            if a.mask_scale != 1.0:
                bias = insert_node(fn, "aten.mul.Tensor", (bias, float(a.mask_scale)), {}, mt, loc, before,
                             "attn_bias").result
            if mt.dtype != dtype:
                bias = insert_node(fn, "aten._to_copy.default", (bias,), {"dtype": fty.torch_dtype}, fty, loc, before,
                             "attn_bias").result
        else:
            record_skip(module, f"fuse-attention: {where}: mask form {a.mask_form!r} not supported")
            return False
        # the op wants [B|1, 1|H, Lq, Lk]
        shape = list(fty.shape)
        while len(shape) < 4:
            shape.insert(0, 1)
            bias = insert_node(fn, "aten.unsqueeze.default", (bias, 0), {}, TensorType(dtype, tuple(shape)), loc, before,
                         "attn_bias").result
        return bias


_STRIDE_OPS = {"aten.view.default", "aten._unsafe_view.default"}
_PASS_THROUGH = {"aten.transpose.int", "aten.permute.default", "aten.view.default", "aten._unsafe_view.default",
                 "aten.reshape.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.slice.Tensor",
                 "aten.alias.default", "aten.expand.default"}


def _views_to_reshapes(fn: Function, v: Value) -> None:
    """The fused op's output strides differ from SDPA's (contiguous [B, H, L, D] vs. SDPA's [B, L, H, D] layout):
    ``view``s downstream that relied on SDPA's strides become ``reshape`` (same values; copies only if needed)."""
    frontier = [v]
    seen: set[Value] = set()
    while frontier:
        x = frontier.pop()
        if x in seen:
            continue
        seen.add(x)
        for n in fn.nodes:
            if n.args and n.args[0] == x and n.op in _PASS_THROUGH:
                if n.op in _STRIDE_OPS:
                    n.op = "aten.reshape.default"
                frontier.append(n.result)
