"""Classifying attention masks (causal / bidirectional / custom) by evaluating the mask subgraph.

A mask never depends on activation values, only on shapes (and on a padding-mask input, which is fed all-ones,
i.e. no padding), so running its subgraph on small synthetic inputs is exact for the shapes tried and robust to
however the model spells it.
"""
from __future__ import annotations

import torch

from elision.analysis.model_map.graph_view import GraphView
from elision.analysis.model_map.records import Attention
from elision.analysis.model_map.state import MapState
from elision.ir.core import Value, map_values
from elision.ir.ops import resolve_op
from elision.ir.symbolic import evaluate
from elision.ir.types import ScalarType, TensorType


def _example_value(v: Value, bindings: dict[str, int], gen: torch.Generator):
    t = v.type
    if isinstance(t, TensorType):
        shape = [evaluate(d, bindings) for d in t.shape]
        if t.dtype in ("i64", "i32", "i16", "i8", "u8"):
            return torch.ones(shape, dtype=t.torch_dtype)  # token 1 / "attend" for padding masks
        if t.dtype == "bool":
            return torch.ones(shape, dtype=torch.bool)
        return torch.randn(shape, generator=gen).to(t.torch_dtype)
    if isinstance(t, ScalarType) and t.kind == "int" and t.expr is not None:
        return evaluate(int(t.expr) if t.expr.lstrip("-").isdigit() else t.expr, bindings)
    raise ValueError(f"cannot make an example for %{v.name} : {t}")


def evaluate_values(g: GraphView, targets: list[Value], sizes: dict[str, int]) -> dict[Value, object]:
    """Run the nodes that ``targets`` depend on, with synthetic inputs whose symbolic dims are ``sizes``."""
    need: set[Value] = set(targets)
    for t in targets:
        need |= g.ancestors(t)
    gen = torch.Generator().manual_seed(0)
    env: dict[Value, object] = {}
    syms: set[str] = set()
    for v in g.fn.inputs:
        if isinstance(v.type, TensorType):
            syms |= v.type.symbols()
    bindings = {s: sizes.get(s, 7) for s in syms}
    for v in g.fn.inputs:
        if v in need:
            env[v] = _example_value(v, bindings, gen)
    for n in g.fn.nodes:
        if n.result not in need:
            continue
        if n.op == "param":
            env[n.result] = g.module.params[n.args[0]]
            continue
        env[n.result] = resolve_op(n.op)(*map_values(n.args, env.__getitem__), **map_values(n.kwargs, env.__getitem__))
    return {t: env[t] for t in targets}


class _ArbitraryBias(Exception):
    """The mask is a general additive bias, not a keep/drop pattern."""


def _classify_mask(allowed: torch.Tensor) -> str:
    lq, lk = allowed.shape[-2], allowed.shape[-1]
    a = allowed.reshape(-1, lq, lk)
    if bool(a.all()):
        return "bidirectional"
    causal = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    if bool((a == causal).all()):
        return "causal"
    return "custom"


def _allowed_from_mask(value: torch.Tensor, form: str, fill: float | None) -> torch.Tensor:
    if form in ("sdpa-bool", "where-keep"):
        return value.bool() if value.dtype == torch.bool else value != 0
    if form == "masked_fill":
        drop = value.bool()
        return ~drop if fill is not None and fill < -1e3 else torch.ones_like(drop)
    # additive float
    return value.float() > -1e3


def classify_masks(st: MapState, attentions: list[Attention]) -> None:
    g = st.g
    cache: dict[tuple, tuple[str, bool]] = {}
    for a in attentions:
        if a.mask is None:
            if a.mask_kind != "causal":
                a.mask_kind, a.causal = "bidirectional", False
            continue
        key = (a.mask, a.mask_form, a.mask_fill)
        if key not in cache:
            from_input = bool((g.ancestors(a.mask) | {a.mask}) & g.inputs)
            kinds = set()
            try:
                for size in (5, 8):
                    # shapes: inputs' symbolic dims all set to `size`; fixed dims keep their size
                    val = evaluate_values(g, [a.mask], {s: size for s in st.input_symbols()})[a.mask]
                    if not isinstance(val, torch.Tensor):
                        raise ValueError("mask is not a tensor")
                    if _float_input_feeds(st, a.mask):
                        raise _ArbitraryBias("it is computed from a floating-point model input")
                    if a.mask_form == "additive" and val.is_floating_point() and bool(
                            ((val != 0) & (val > -1e3)).any()):
                        raise _ArbitraryBias("it holds values other than 0 and -inf")
                    allowed = _allowed_from_mask(val, a.mask_form, a.mask_fill)
                    kinds.add(_classify_mask(allowed))
                kind = kinds.pop() if len(kinds) == 1 else "custom"
            except _ArbitraryBias as e:
                kind = "custom"
                st.notes.append(f"attention at {a.loc}: %{a.mask.name} is an arbitrary additive score bias "
                                  f"({e}); causal flag left unset")
            except Exception as e:  # noqa: BLE001 - reported, not hidden
                kind = "unknown"
                st.notes.append(f"attention mask %{a.mask.name} (used at {a.loc}) could not be evaluated to "
                                  f"classify it: {type(e).__name__}: {str(e)[:120]}")
            cache[key] = (kind, from_input)
        kind, from_input = cache[key]
        if a.mask_kind == "causal":  # is_causal=True plus a mask
            kind = "causal" if kind in ("causal", "bidirectional") else kind
        a.mask_kind = kind
        a.mask_depends_on_input = from_input and _depends_on_user_input_values(st, a.mask)
        a.causal = {"causal": True, "bidirectional": False}.get(kind)
        if kind == "custom" and not any(a.mask.name in u and "bias" in u for u in st.notes):
            st.notes.append(f"attention at {a.loc}: mask %{a.mask.name} is neither causal nor full "
                              f"(sliding window / prefix / block mask?); causal flag left unset")


def _float_input_feeds(st: MapState, v: Value) -> bool:
    """A floating-point model input's *values* (not only its shape) reach ``v``."""
    g = st.g
    floats = {i for i in g.inputs if isinstance(i.type, TensorType) and i.type.dtype in ("f32", "f16", "bf16", "f64")}
    if v in floats:
        return True
    anc = g.ancestors(v) | {v}
    return any(n.result in anc and n.op != "aten.sym_size.int" and floats & set(n.inputs) for n in st.fn.nodes)


def _depends_on_user_input_values(st: MapState, v: Value) -> bool:
    """True when ``v`` reads an input's *values* (not just its shape through sym_size)."""
    g = st.g
    if v in g.inputs:
        return True
    anc = g.ancestors(v) | {v}
    for n in st.fn.nodes:
        if n.result in anc and n.op not in ("aten.sym_size.int",) and any(i in g.inputs for i in n.inputs):
            return True
    return False
