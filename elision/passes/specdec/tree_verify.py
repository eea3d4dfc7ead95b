"""``tree-verify``: add ``@verify``, which is ``@decode`` with the positions and an additive attention bias as
inputs, so one call scores a whole token tree (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from elision.analysis.model_map import lm_head_input
from elision.ir.core import Function, Module, Value
from elision.ir.types import TensorType
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.classic.dce import eliminate_dead_code
from elision.passes.specdec.emit import dim_add, specdec_attrs, tagged
from elision.passes.specdec.rename import rename_value
from elision.passes.specdec.retype import retype


def build_verify(module: Module, hidden: bool = False) -> Function:
    if "decode" not in module.functions:
        raise PassError("tree-verify needs @decode: run kv-cache first (pipeline '...,kv-cache,tree-verify,...')")
    fn = module.functions["decode"].copy()
    fn.name = "verify"
    ids = fn.inputs[0]
    batch, n = ids.type.shape
    dtype = specdec_attrs(module).get("dtype", "f32")
    causal_pos = rename_value(fn, tagged(fn, "positions"), "causal_positions")
    causal_bias = rename_value(fn, tagged(fn, "bias"), "causal_bias")
    pos_in = Value(fn.fresh_name("positions"), TensorType("i64", (batch, n)))
    bias_in = Value(fn.fresh_name("attn_bias"), TensorType(dtype, (batch, 1, n, dim_add("past", n))))
    fn.inputs[1:1] = [pos_in, bias_in]
    fn.replace_all_uses(causal_pos, pos_in)
    fn.replace_all_uses(causal_bias, bias_in)
    eliminate_dead_code(fn)
    retype(fn, {pos_in, bias_in})
    if hidden:
        h = rename_value(fn, lm_head_input(fn), "hidden")
        fn.outputs.insert(1, h)
    eliminate_dead_code(fn)
    return fn


@register_pass
@dataclass(frozen=True)
class TreeVerify(Pass):
    """Add ``@verify``: ``@decode`` with positions and an additive attention bias as inputs (token trees)."""

    name: ClassVar[str] = "tree-verify"
    hidden: bool = False

    def run(self, module: Module) -> bool:
        module.add_function(build_verify(module, self.hidden))
        specdec_attrs(module)["verify_hidden"] = self.hidden
        return True
