"""``fuse-qkv``: the q, k and v linears of one attention that read the same input become one linear with the
concatenated weight, followed by a split (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.analysis.model_map import Attention
from elision.ir.core import Function, Module
from elision.ir.types import TensorType, TupleType
from elision.passes.base import Pass, register_pass
from elision.passes.fusion.rewrite import clean_up, fresh_map, insert_node, record_skip


@register_pass
@dataclass(frozen=True)
class FuseQKV(Pass):
    """The q, k, v linears of one attention reading the same input -> one linear + split."""

    name: ClassVar[str] = "fuse-qkv"

    def run(self, module: Module) -> bool:
        changed = False
        for fn in list(module.functions.values()):
            mm = fresh_map(module, fn)
            for a in mm.attentions:
                changed |= self._fuse(module, fn, a)
        if changed:
            clean_up(module)
        return changed

    def _fuse(self, module: Module, fn: Function, a: Attention) -> bool:
        where = a.loc or f"%{a.output.name}"
        projs = [a.q_proj, a.k_proj, a.v_proj]
        if any(p is None for p in projs):
            record_skip(module, f"fuse-qkv: {where}: q/k/v projections not all found")
            return False
        if a.packed_qkv or len({id(p) for p in projs}) != 3:
            record_skip(module, f"fuse-qkv: {where}: q/k/v already come from one projection")
            return False
        if any(p.node.op != "aten.linear.default" for p in projs):
            record_skip(module, f"fuse-qkv: {where}: projections are not aten.linear (matmul/addmm forms are left alone)")
            return False
        x = projs[0].node.args[0]
        if any(p.node.args[0] != x for p in projs):
            record_skip(module, f"fuse-qkv: {where}: q, k and v read different inputs (cross-attention); not fused")
            return False
        ws = [module.params[p.weight] for p in projs]
        if len({(w.dtype, w.shape[1]) for w in ws}) != 1:
            record_skip(module, f"fuse-qkv: {where}: weights differ in dtype or input size")
            return False
        has_bias = [p.bias is not None for p in projs]
        if any(has_bias) and not all(has_bias):
            record_skip(module, f"fuse-qkv: {where}: only some projections have a bias")
            return False
        prefix = a.loc or f"fused.{a.output.name}"
        wname = _unique(module, f"{prefix}.qkv_fused.weight")
        module.params[wname] = torch.cat([w.detach() for w in ws], 0).contiguous()
        bname = None
        if all(has_bias):
            bname = _unique(module, f"{prefix}.qkv_fused.bias")
            module.params[bname] = torch.cat([module.params[p.bias].detach() for p in projs], 0).contiguous()
        anchor = min((p.node for p in projs), key=fn.index)
        wv = fn.param(wname, before=anchor)
        bv = fn.param(bname, before=anchor) if bname else None
        xt = x.type
        sizes = [p.out_features for p in projs]
        total = sum(sizes)
        out_t = TensorType(projs[0].output.type.dtype, tuple(xt.shape[:-1]) + (total,))
        lin = insert_node(fn, "aten.linear.default", (x, wv, bv), {}, out_t, f"{prefix}.qkv_fused", anchor, "qkv")
        split_t = TupleType(tuple(p.output.type for p in projs))
        split = insert_node(fn, "aten.split_with_sizes.default", (lin.result, sizes, -1), {}, split_t, lin.loc, anchor,
                      "qkv_split")
        for i, p in enumerate(projs):
            part = insert_node(fn, "getitem", (split.result, i), {}, p.output.type, p.loc, anchor, "qkv_part")
            fn.replace_all_uses(p.output, part.result)
        return True


def _unique(module: Module, name: str) -> str:
    if name not in module.params:
        return name
    i = 1
    while f"{name}.{i}" in module.params:
        i += 1
    return f"{name}.{i}"
