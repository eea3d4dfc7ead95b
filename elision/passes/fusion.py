"""Fusion passes: recognized attention / norms / q-k-v projections become single elision ops.

* ``fuse-attention`` — every attention the model map recognizes (SDPA or hand-written softmax(QK^T)V; causal,
  boolean, padding or additive masks; GQA) becomes one ``elision.attention(q, k, v, bias, scale, is_causal)``.
  Boolean keep-masks become an additive float bias (0 / -inf) computed in the graph, shared by all layers that
  use the same mask. GQA head repetition (``repeat_kv`` / ``repeat_interleave``) is dropped: the op reads the
  kv heads directly.
* ``fuse-norms`` — LayerNorm (``aten.layer_norm``) and RMSNorm (the pow/mean/add-eps/rsqrt/mul/mul-weight chain,
  HF casts included) become ``elision.layer_norm`` / ``elision.rms_norm``; when the norm reads a residual add
  ``a + b`` of same-shaped tensors it becomes ``elision.add_layer_norm`` / ``elision.add_rms_norm`` returning
  (normed, a + b), and the add's other users read the second result.
* ``fuse-qkv`` — the q, k and v linears of one attention that read the same input become one linear with the
  concatenated weight (a new parameter ``<attention loc>.qkv_fused.weight``) followed by a split.

Bias + activation fusion is not provided: elision has no bias+activation op, and ``aten.linear`` already
carries its bias, so such a pass would only rename ops (there is nothing to fuse into).

Every pass records what it left alone and why in ``module.attrs["fusion_skipped"]`` (list of strings) so a
negative result is explainable. Semantics: all rewrites are exact up to floating-point reassociation (the
elision kernels compute norms and softmax in fp32), see tests/test_fusion_*.py for the bounds.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.ir.core import Function, Module, Node, Value
from elision.ir.types import TensorType, TupleType
from elision.passes.base import Pass, register_pass
from elision.analysis.cache import analyses
from elision.passes.classic import eliminate_dead_code, remove_unused_params
from elision.analysis.model_map import Attention, ModelMap, Norm, build_model_map

DEFAULT_PIPELINE = "canonicalize,cse,constant-fold,fuse-attention,fuse-norms,fuse-qkv,dce"

_FLOAT = ("f32", "f16", "bf16", "f64")
# a fill value this negative (or -inf) removes the position from the softmax exactly, added or assigned
_MASKED = -1e4


def _skip(module: Module, msg: str) -> None:
    module.attrs.setdefault("fusion_skipped", [])
    if msg not in module.attrs["fusion_skipped"]:
        module.attrs["fusion_skipped"].append(msg)


def _map(module: Module, fn: Function) -> ModelMap:
    # the graph may have been changed by an earlier rewrite in the same pass: never use a stale map
    analyses().invalidate()
    return build_model_map(module, fn.name)


def _node(fn: Function, op: str, args: tuple, kwargs: dict | None, ty, loc: str, before: Node, hint: str) -> Node:
    n = Node(op, tuple(args), dict(kwargs or {}), fn.new_value(ty, hint), loc)
    fn.insert_before(before, [n])
    return n


def _first_use(fn: Function, values: list[Value]) -> Node:
    vs = set(values)
    for n in fn.nodes:
        if vs & set(n.inputs):
            return n
    raise AssertionError("value without users")


def _defined_before(fn: Function, v: Value, anchor: Node) -> bool:
    if v in fn.inputs:
        return True
    idx = fn.index(anchor)
    return any(n.result == v for n in fn.nodes[:idx])


def _cleanup(module: Module) -> None:
    for f in module.functions.values():
        eliminate_dead_code(f)
    remove_unused_params(module)


# --------------------------------------------------------------------------------------------- attention
@register_pass
@dataclass(frozen=True)
class FuseAttention(Pass):
    """Recognized attention -> ``elision.attention`` with an explicit additive bias."""

    name: ClassVar[str] = "fuse-attention"

    def run(self, module: Module) -> bool:
        changed = False
        for fn in list(module.functions.values()):
            mm = _map(module, fn)
            bias_cache: dict[tuple, Value | None] = {}
            for a in mm.attentions:
                changed |= self._fuse(module, fn, a, bias_cache)
        if changed:
            _cleanup(module)
        return changed

    def _fuse(self, module: Module, fn: Function, a: Attention, bias_cache: dict) -> bool:
        where = a.loc or f"%{a.output.name}"
        if a.kind == "fused":
            return False
        q, k, v = a.q, a.k, a.v
        for name, t in (("q", q), ("k", k), ("v", v)):
            if not isinstance(t.type, TensorType) or t.type.rank != 4 or t.type.dtype not in _FLOAT:
                _skip(module, f"fuse-attention: {where}: {name} is {t.type}, not a float [B, H, L, D] tensor")
                return False
        if a.k_unrepeated is not None and a.v_unrepeated is not None:
            k, v = a.k_unrepeated, a.v_unrepeated
        hq, hk = q.type.shape[1], k.type.shape[1]
        if not (isinstance(hq, int) and isinstance(hk, int) and hq % hk == 0):
            _skip(module, f"fuse-attention: {where}: head counts {hq} (q) and {hk} (k/v) are not static multiples")
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
                _skip(module, f"fuse-attention: {where}: dropout_p={dropout} (training-mode attention)")
                return False
            if node.kwargs.get("enable_gqa") and k is a.k:
                pass  # elision.attention handles Hq != Hkv itself
            if sdpa_causal and a.mask is not None:
                _skip(module, f"fuse-attention: {where}: SDPA with both is_causal and a mask")
                return False
            if sdpa_causal and q.type.shape[2] != k.type.shape[2]:
                # SDPA's is_causal is top-left aligned, elision's bottom-right: equal only for Lq == Lk
                _skip(module, f"fuse-attention: {where}: is_causal with Lq != Lk (alignment differs)")
                return False
        key = (a.mask, a.mask_form, a.mask_fill, a.mask_scale, q.type.dtype)
        if key not in bias_cache:
            bias_cache[key] = self._bias(module, fn, a, where, q.type.dtype)
        bias = bias_cache[key]
        if bias is False:
            return False
        if bias is not None and not _defined_before(fn, bias, anchor):
            _skip(module, f"fuse-attention: {where}: mask is computed after the attention's inputs")
            return False
        fused = _node(fn, "elision.attention.default", (q, k, v, bias, scale, sdpa_causal), {}, a.output.type,
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
            _skip(module, f"fuse-attention: {where}: mask {mt} is not a tensor of rank <= 4")
            return False
        before = _first_use(fn, [m])
        loc = before.loc
        fty = TensorType(dtype, mt.shape)
        if a.mask_form in ("sdpa-bool", "where-keep", "masked_fill"):
            fill = -math.inf if a.mask_form == "sdpa-bool" else a.mask_fill
            if fill is None or fill > _MASKED:
                _skip(module, f"fuse-attention: {where}: masked_fill value {fill} does not remove positions "
                              f"(only fills <= {_MASKED:g} or -inf are additive-equivalent)")
                return False
            if mt.dtype != "bool":
                _skip(module, f"fuse-attention: {where}: mask {mt} is not boolean")
                return False
            drop = m
            if a.mask_form != "masked_fill":  # True = keep -> True = drop
                drop = _node(fn, "aten.logical_not.default", (m,), {}, mt, loc, before, "mask_drop").result
            zeros = _node(fn, "aten.zeros_like.default", (m,), {"dtype": fty.torch_dtype}, fty, loc, before,
                          "mask_zeros").result
            bias = _node(fn, "aten.masked_fill.Scalar", (zeros, drop, float(fill)), {}, fty, loc, before,
                         "attn_bias").result
        elif a.mask_form == "additive":
            if mt.dtype not in _FLOAT:
                _skip(module, f"fuse-attention: {where}: additive mask of dtype {mt.dtype}")
                return False
            bias = m
            if a.mask_scale != 1.0:
                bias = _node(fn, "aten.mul.Tensor", (bias, float(a.mask_scale)), {}, mt, loc, before,
                             "attn_bias").result
            if mt.dtype != dtype:
                bias = _node(fn, "aten._to_copy.default", (bias,), {"dtype": fty.torch_dtype}, fty, loc, before,
                             "attn_bias").result
        else:
            _skip(module, f"fuse-attention: {where}: mask form {a.mask_form!r} not supported")
            return False
        # the op wants [B|1, 1|H, Lq, Lk]
        shape = list(fty.shape)
        while len(shape) < 4:
            shape.insert(0, 1)
            bias = _node(fn, "aten.unsqueeze.default", (bias, 0), {}, TensorType(dtype, tuple(shape)), loc, before,
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


# --------------------------------------------------------------------------------------------- norms
@register_pass
@dataclass(frozen=True)
class FuseNorms(Pass):
    """LayerNorm / RMSNorm (and a residual add feeding them) -> elision norm ops."""

    name: ClassVar[str] = "fuse-norms"
    residual: bool = True  # also fuse the residual add that feeds a norm

    def run(self, module: Module) -> bool:
        changed = False
        for fn in list(module.functions.values()):
            mm = _map(module, fn)
            renamed: dict[Value, Value] = {}  # outputs replaced earlier in this run (a norm may read one)
            for norm in mm.norms:
                changed |= self._fuse(module, fn, norm, renamed)
        if changed:
            _cleanup(module)
        return changed

    def _fuse(self, module: Module, fn: Function, norm: Norm, renamed: dict[Value, Value]) -> bool:
        where = norm.loc or f"%{norm.output.name}"
        if norm.nodes[0].op.startswith("elision."):
            return False
        x, out = norm.input, norm.output
        while x in renamed:
            x = renamed[x]
        xt, ot = x.type, out.type
        if not isinstance(xt, TensorType) or xt.dtype not in _FLOAT or not isinstance(ot, TensorType):
            _skip(module, f"fuse-norms: {where}: input {xt} is not a float tensor")
            return False
        if ot.dtype != xt.dtype or ot.shape != xt.shape:
            _skip(module, f"fuse-norms: {where}: output {ot} differs from input {xt} in dtype/shape "
                          f"(weight of another dtype promotes the result)")
            return False
        last = xt.shape[-1]
        if norm.kind == "layernorm":
            node = norm.nodes[0]
            shape = node.args[1]
            if list(shape) != [last]:
                _skip(module, f"fuse-norms: {where}: layer_norm over {list(shape)}, not only the last dim")
                return False
        weight = fn.param(norm.weight) if norm.weight else None
        bias = fn.param(norm.bias) if norm.bias else None
        for name, pname in (("weight", norm.weight), ("bias", norm.bias)):
            if pname is not None:
                p = module.params[pname]
                if tuple(p.shape) != (last,):
                    _skip(module, f"fuse-norms: {where}: {name} {pname} has shape {tuple(p.shape)}, not ({last},)")
                    return False
        # residual add feeding the norm: a + b with both operands already of the result's shape and dtype
        add = fn.producer(x)
        if (self.residual and add is not None and add.op == "aten.add.Tensor" and not add.kwargs
                and len(add.args) == 2 and all(isinstance(t, Value) and t.type == xt for t in add.args)):
            a, b = add.args
            op = "elision.add_rms_norm.default" if norm.kind == "rmsnorm" else "elision.add_layer_norm.default"
            args = (a, b, weight, norm.eps) if norm.kind == "rmsnorm" else (a, b, weight, bias, norm.eps)
            anchor = fn.nodes[fn.index(add) + 1]
            fused = _node(fn, op, args, {}, TupleType((xt, xt)), norm.loc, anchor, "add_norm")
            normed = _node(fn, "getitem", (fused.result, 0), {}, xt, norm.loc, anchor, "normed")
            summed = _node(fn, "getitem", (fused.result, 1), {}, xt, add.loc, anchor, "residual")
            fn.replace_all_uses(out, normed.result)
            fn.replace_all_uses(x, summed.result)
            renamed[out], renamed[x] = normed.result, summed.result
            # the two getitems above read fused, not x; nothing else refers to the old add
            return True
        op = "elision.rms_norm.default" if norm.kind == "rmsnorm" else "elision.layer_norm.default"
        args = (x, weight, norm.eps) if norm.kind == "rmsnorm" else (x, weight, bias, norm.eps)
        anchor = fn.producer(out)
        fused = _node(fn, op, args, {}, xt, norm.loc, anchor, "norm")
        fn.replace_all_uses(out, fused.result)
        renamed[out] = fused.result
        return True


# --------------------------------------------------------------------------------------------- q/k/v
@register_pass
@dataclass(frozen=True)
class FuseQKV(Pass):
    """The q, k, v linears of one attention reading the same input -> one linear + split."""

    name: ClassVar[str] = "fuse-qkv"

    def run(self, module: Module) -> bool:
        changed = False
        for fn in list(module.functions.values()):
            mm = _map(module, fn)
            for a in mm.attentions:
                changed |= self._fuse(module, fn, a)
        if changed:
            _cleanup(module)
        return changed

    def _fuse(self, module: Module, fn: Function, a: Attention) -> bool:
        where = a.loc or f"%{a.output.name}"
        projs = [a.q_proj, a.k_proj, a.v_proj]
        if any(p is None for p in projs):
            _skip(module, f"fuse-qkv: {where}: q/k/v projections not all found")
            return False
        if a.packed_qkv or len({id(p) for p in projs}) != 3:
            _skip(module, f"fuse-qkv: {where}: q/k/v already come from one projection")
            return False
        if any(p.node.op != "aten.linear.default" for p in projs):
            _skip(module, f"fuse-qkv: {where}: projections are not aten.linear (matmul/addmm forms are left alone)")
            return False
        x = projs[0].node.args[0]
        if any(p.node.args[0] != x for p in projs):
            _skip(module, f"fuse-qkv: {where}: q, k and v read different inputs (cross-attention); not fused")
            return False
        ws = [module.params[p.weight] for p in projs]
        if len({(w.dtype, w.shape[1]) for w in ws}) != 1:
            _skip(module, f"fuse-qkv: {where}: weights differ in dtype or input size")
            return False
        has_bias = [p.bias is not None for p in projs]
        if any(has_bias) and not all(has_bias):
            _skip(module, f"fuse-qkv: {where}: only some projections have a bias")
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
        lin = _node(fn, "aten.linear.default", (x, wv, bv), {}, out_t, f"{prefix}.qkv_fused", anchor, "qkv")
        split_t = TupleType(tuple(p.output.type for p in projs))
        split = _node(fn, "aten.split_with_sizes.default", (lin.result, sizes, -1), {}, split_t, lin.loc, anchor,
                      "qkv_split")
        for i, p in enumerate(projs):
            part = _node(fn, "getitem", (split.result, i), {}, p.output.type, p.loc, anchor, "qkv_part")
            fn.replace_all_uses(p.output, part.result)
        return True


def _unique(module: Module, name: str) -> str:
    if name not in module.params:
        return name
    i = 1
    while f"{name}.{i}" in module.params:
        i += 1
    return f"{name}.{i}"


__all__ = ["DEFAULT_PIPELINE", "FuseAttention", "FuseNorms", "FuseQKV"]
