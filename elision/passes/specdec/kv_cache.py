"""``kv-cache``: add ``@prefill`` and ``@decode`` next to a decoder LM's traced ``@forward``, over explicit per-layer
KV tensors (see the package docstring)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.analysis.model_map import AttentionSite, DecoderMap, build_model_map
from elision.ir.core import Function, Module, Value
from elision.ir.types import ScalarType, TensorType
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.classic.dce import eliminate_dead_code
from elision.passes.specdec.emit import Emitter, dim_add, specdec_attrs, trace_device
from elision.passes.specdec.rename import rename_dims, rename_value

SDPA = "aten.scaled_dot_product_attention.default"


def decoder_of(module: Module, source: str) -> DecoderMap:
    """The model map's decoder view of ``@source``, or a PassError saying what kv-cache is missing."""
    if source not in module.functions:
        raise PassError(f"kv-cache: module has no function @{source}; functions: {', '.join(module.functions)}")
    mm = build_model_map(module, source)
    if mm.decoder is None:
        raise PassError(mm.decoder_problem)
    return mm.decoder


def _add_kv_outputs(fn: Function, dmap: DecoderMap) -> None:
    """Name each layer's new K/V ``k_i``/``v_i`` and return them after the logits."""
    outs = [dmap.logits]
    for s in dmap.sites:
        # a K that is also V (or shared across layers) gets its own identity-free alias via rename only once
        k = rename_value(fn, s.k_src, f"k_{s.layer}")
        v = rename_value(fn, s.v_src, f"v_{s.layer}")
        outs += [k, v]
    fn.outputs = outs


def build_prefill(module: Module, source: str = "forward") -> Function:
    dmap = decoder_of(module, source)
    fn = module.functions[source].copy()
    fn.name = "prefill"
    _add_kv_outputs(fn, dmap)
    eliminate_dead_code(fn)
    return fn


def build_decode(module: Module, source: str = "forward", window: int = 0) -> Function:
    dmap = decoder_of(module, source)
    fn = module.functions[source].copy()  # values are shared with the source; nodes are found by their results
    fn.name = "decode"
    ids = fn.inputs[0]
    B, S = dmap.batch_dim, dmap.seq_dim
    if not isinstance(S, str):
        raise PassError(f"@{source}: the sequence length of input_ids is the constant {S}; export the model with a "
                        f"dynamic sequence dim (dynamic_dims={{0: {{0: 'batch', 1: 'seq'}}}})")
    T = dim_add("past", S)
    fdt = dmap.dtype
    # ---- past K/V inputs
    pasts: list[Value] = []
    for s in dmap.sites:
        for kind, src in (("k", s.k_src), ("v", s.v_src)):
            pasts.append(Value(fn.fresh_name(f"past_{kind}_{s.layer}"),
                               TensorType(src.type.dtype, (B, s.kv_heads, "past", s.head_dim))))
            fn.inputs.append(pasts[-1])
    # ---- positions past .. past + n - 1 and the causal bias over the past + n slots
    device = trace_device(fn)
    first_real = next(i for i, n in enumerate(fn.nodes) if n.op != "param")
    e = Emitter(fn, first_real)
    i64 = lambda *shape: TensorType("i64", shape)  # noqa: E731
    past_len = e("aten.sym_size.int", (pasts[0], 2), ScalarType("int", "past"), "past_len")
    n_len = e("aten.sym_size.int", (ids, 1), ScalarType("int", S), "n_len")
    q_ar = e("aten.arange.default", (n_len,), i64(S), "q_arange", dict(dtype=torch.int64, device=device))
    q_pos = e("aten.add.Tensor", (q_ar, past_len), i64(S), "q_pos")
    positions = e("aten.unsqueeze.default", (q_pos, 0), i64(1, S), "positions", tag="positions")
    total = e("py.operator.add", (past_len, n_len), ScalarType("int", str(T)), "kv_len")
    kv_pos = e("aten.arange.default", (total,), i64(T), "kv_pos", dict(dtype=torch.int64, device=device))
    row = e("aten.unsqueeze.default", (kv_pos, 0), i64(1, T), "kv_row")
    col = e("aten.unsqueeze.default", (q_pos, 1), i64(S, 1), "q_col")
    allowed = e("aten.le.Tensor", (row, col), TensorType("bool", (S, T)), "causal")
    if window and window > 0:
        lo = e("aten.sub.Tensor", (col, window), i64(S, 1), "window_lo")
        inwin = e("aten.gt.Tensor", (row, lo), TensorType("bool", (S, T)), "in_window")
        allowed = e("aten.logical_and.default", (allowed, inwin), TensorType("bool", (S, T)), "allowed")
    tdt = TensorType(fdt, ()).torch_dtype
    zero = e("aten.scalar_tensor.default", (0.0,), TensorType(fdt, ()), "zero", dict(dtype=tdt, device=device))
    ninf = e("aten.scalar_tensor.default", (float("-inf"),), TensorType(fdt, ()), "neg_inf", dict(dtype=tdt, device=device))
    bias2 = e("aten.where.self", (allowed, zero, ninf), TensorType(fdt, (S, T)), "bias2d")
    bias3 = e("aten.unsqueeze.default", (bias2, 0), TensorType(fdt, (1, S, T)), "bias3d")
    bias = e("aten.unsqueeze.default", (bias3, 0), TensorType(fdt, (1, 1, S, T)), "causal_bias", tag="bias")
    for root in dmap.positions:
        fn.replace_all_uses(root, positions)
    # ---- every attention reads cat(past, new)
    for s in dmap.sites:
        node = fn.producer(s.node.result)
        pk, pv = pasts[2 * s.layer], pasts[2 * s.layer + 1]
        e = Emitter(fn, fn.index(node), node.loc)
        kv = []
        for past, src, kind in ((pk, s.k_src, "k"), (pv, s.v_src, "v")):
            full = e("aten.cat.default", ([past, src], 2), TensorType(src.type.dtype, (B, s.kv_heads, T, s.head_dim)),
                     f"{kind}_all_{s.layer}", tag="kv_cat")
            kv.append(_repeat_heads(e, full, s, B, T))
        args = list(node.args)
        args[1], args[2] = kv
        kwargs = dict(node.kwargs)
        if len(args) > 3:
            args[3] = bias
        elif node.op == SDPA:
            kwargs["attn_mask"] = bias
        else:
            kwargs["bias"] = bias
        # the bias already encodes causality: a traced is_causal=True must not apply a second (misaligned) mask
        if node.op == SDPA and len(args) > 5:
            args[5] = False
        if "is_causal" in kwargs:
            kwargs["is_causal"] = False
        node.args, node.kwargs = tuple(args), kwargs
    _add_kv_outputs(fn, dmap)
    eliminate_dead_code(fn)
    return fn


def _repeat_heads(e: Emitter, kv: Value, s: AttentionSite, B, T) -> Value:
    """GQA: [b, kv_heads, L, d] -> [b, heads, L, d], exactly as HF's repeat_kv (unsqueeze, expand, reshape)."""
    if s.heads == s.kv_heads:
        return kv
    if s.heads % s.kv_heads:
        raise PassError(f"attention at {s.node.loc}: {s.heads} query heads is not a multiple of {s.kv_heads} KV heads")
    rep = s.heads // s.kv_heads
    dt = kv.type.dtype
    b = e("aten.sym_size.int", (kv, 0), ScalarType("int", str(B)), "b")
    length = e("aten.sym_size.int", (kv, 2), ScalarType("int", str(T)), "kv_len")
    u = e("aten.unsqueeze.default", (kv, 2), TensorType(dt, (B, s.kv_heads, 1, T, s.head_dim)), "unsqueeze")
    x = e("aten.expand.default", (u, [b, s.kv_heads, rep, length, s.head_dim]),
          TensorType(dt, (B, s.kv_heads, rep, T, s.head_dim)), "expand")
    c = e("aten.clone.default", (x,), x.type, "clone", dict(memory_format=torch.contiguous_format))
    return e("aten.reshape.default", (c, [b, s.heads, length, s.head_dim]), TensorType(dt, (B, s.heads, T, s.head_dim)),
             "rep")


def _finish(module: Module, fn: Function, seq_dim) -> Function:
    if isinstance(seq_dim, str) and seq_dim != "n":
        rename_dims(fn, {seq_dim: "n"})
    module.add_function(fn)
    return fn


@register_pass
@dataclass(frozen=True)
class KVCache(Pass):
    """Add ``@prefill`` and ``@decode`` over explicit per-layer KV tensors (see the module docstring).

    ``window`` > 0 adds a sliding-window limit to ``@decode``'s causal mask (Mistral-style models);
    ``@verify`` takes the mask as an input and is not affected.
    """

    name: ClassVar[str] = "kv-cache"
    source: str = "forward"
    window: int = 0

    def run(self, module: Module) -> bool:
        dmap = decoder_of(module, self.source)
        _finish(module, build_prefill(module, self.source), dmap.seq_dim)
        _finish(module, build_decode(module, self.source, self.window), dmap.seq_dim)
        s0 = dmap.sites[0]
        specdec_attrs(module).update({
            "num_layers": dmap.num_layers, "kv_heads": s0.kv_heads, "heads": s0.heads, "head_dim": s0.head_dim,
            "layer_prefix": dmap.layer_prefix, "dtype": dmap.dtype, "window": self.window,
        })
        return True


# =============================================================================================== tree-verify
