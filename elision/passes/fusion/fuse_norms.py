"""``fuse-norms``: LayerNorm / RMSNorm, and a residual add feeding them, become elision's norm ops (see the package
docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from elision.analysis.model_map import Norm
from elision.ir.core import Function, Module, Value
from elision.ir.types import TensorType, TupleType
from elision.passes.base import Pass, register_pass
from elision.passes.fusion.rewrite import FLOAT_DTYPES, clean_up, fresh_map, insert_node, param_before, record_skip


@register_pass
@dataclass(frozen=True)
class FuseNorms(Pass):
    """LayerNorm / RMSNorm (and a residual add feeding them) -> elision norm ops."""

    name: ClassVar[str] = "fuse-norms"
    residual: bool = True  # also fuse the residual add that feeds a norm

    def run(self, module: Module) -> bool:
        changed = False
        for fn in list(module.functions.values()):
            mm = fresh_map(module, fn)
            renamed: dict[Value, Value] = {}  # outputs replaced earlier in this run (a norm may read one)
            for norm in mm.norms:
                changed |= self._fuse(module, fn, norm, renamed)
        if changed:
            clean_up(module)
        return changed

    def _fuse(self, module: Module, fn: Function, norm: Norm, renamed: dict[Value, Value]) -> bool:
        where = norm.loc or f"%{norm.output.name}"
        if norm.nodes[0].op.startswith("elision."):
            return False
        x, out = norm.input, norm.output
        while x in renamed:
            x = renamed[x]
        xt, ot = x.type, out.type
        if not isinstance(xt, TensorType) or xt.dtype not in FLOAT_DTYPES or not isinstance(ot, TensorType):
            record_skip(module, f"fuse-norms: {where}: input {xt} is not a float tensor")
            return False
        if ot.dtype != xt.dtype or ot.shape != xt.shape:
            record_skip(module, f"fuse-norms: {where}: output {ot} differs from input {xt} in dtype/shape "
                          f"(weight of another dtype promotes the result)")
            return False
        last = xt.shape[-1]
        node = norm.nodes[0]
        # a LayerNorm written out as ops (Cohere) normalizes the last dim: the model map checked the means' dims
        if node.op in ("aten.layer_norm.default", "aten.native_layer_norm.default"):
            shape = node.args[1]
            if list(shape) != [last]:
                record_skip(module, f"fuse-norms: {where}: layer_norm over {list(shape)}, not only the last dim")
                return False
        for name, pname in (("weight", norm.weight), ("bias", norm.bias)):
            if pname is not None:
                p = module.params[pname]
                if tuple(p.shape) != (last,):
                    record_skip(module, f"fuse-norms: {where}: {name} {pname} has shape {tuple(p.shape)}, not ({last},)")
                    return False
        # every check passed: from here on the graph changes
        # residual add feeding the norm: a + b with both operands already of the result's shape and dtype
        add = fn.producer(x)
        fuse_add = (self.residual and add is not None and add.op == "aten.add.Tensor" and not add.kwargs
                    and len(add.args) == 2 and all(isinstance(t, Value) and t.type == xt for t in add.args))
        anchor = fn.nodes[fn.index(add) + 1] if fuse_add else fn.producer(out)
        weight = param_before(fn, norm.weight, anchor) if norm.weight else None
        if weight is not None and norm.weight_offset:  # Gemma multiplies by 1 + w: the fused op gets 1 + w
            weight = insert_node(fn, "aten.add.Tensor", (weight, norm.weight_offset), {}, weight.type, norm.loc,
                                 anchor, "norm_weight").result
        bias = param_before(fn, norm.bias, anchor) if norm.bias else None
        if fuse_add:
            a, b = add.args
            op = "elision.add_rms_norm.default" if norm.kind == "rmsnorm" else "elision.add_layer_norm.default"
            args = (a, b, weight, norm.eps) if norm.kind == "rmsnorm" else (a, b, weight, bias, norm.eps)
            fused = insert_node(fn, op, args, {}, TupleType((xt, xt)), norm.loc, anchor, "add_norm")
            normed = insert_node(fn, "getitem", (fused.result, 0), {}, xt, norm.loc, anchor, "normed")
            summed = insert_node(fn, "getitem", (fused.result, 1), {}, xt, add.loc, anchor, "residual")
            fn.replace_all_uses(out, normed.result)
            fn.replace_all_uses(x, summed.result)
            renamed[out], renamed[x] = normed.result, summed.result
            # the two getitems above read fused, not x; nothing else refers to the old add
            return True
        op = "elision.rms_norm.default" if norm.kind == "rmsnorm" else "elision.layer_norm.default"
        args = (x, weight, norm.eps) if norm.kind == "rmsnorm" else (x, weight, bias, norm.eps)
        fused = insert_node(fn, op, args, {}, xt, norm.loc, anchor, "norm")
        fn.replace_all_uses(out, fused.result)
        renamed[out] = fused.result
        return True
