"""Renaming in a function: replace values everywhere, rename symbolic dims in every type, give a value a name."""
from __future__ import annotations

from elision.ir.core import Function, Value, map_values
from elision.ir.symbolic import from_sympy, symbol, to_sympy
from elision.ir.types import ScalarType, TensorType, Type


def remap(fn: Function, mapping: dict[Value, Value]) -> None:
    """Replace Values everywhere in ``fn`` (inputs, node results, arguments, outputs)."""
    if not mapping:
        return
    get = lambda v: mapping.get(v, v)  # noqa: E731
    fn.inputs = [get(v) for v in fn.inputs]
    for n in fn.nodes:
        n.result = get(n.result)
        n.args = map_values(n.args, get)
        n.kwargs = map_values(n.kwargs, get)
    fn.outputs = [get(v) for v in fn.outputs]


def _rename_type(t: Type, subs: dict) -> Type:
    def fix(d):
        if isinstance(d, int) or not subs:
            return d
        return from_sympy(to_sympy(d).subs(subs))

    if isinstance(t, TensorType):
        return TensorType(t.dtype, tuple(fix(d) for d in t.shape))
    if isinstance(t, ScalarType) and t.expr is not None and not t.expr.lstrip("-").isdigit():
        return ScalarType(t.kind, str(fix(t.expr)))
    return t


def rename_dims(fn: Function, names: dict[str, str]) -> None:
    """Rename symbolic dims in every type of ``fn`` (e.g. ``seq`` -> ``n``)."""
    subs = {symbol(a): symbol(b) for a, b in names.items() if a != b}
    if not subs:
        return
    mapping = {}
    memo: dict[Type, Type] = {}
    for v in fn.values():
        if v.type not in memo:
            memo[v.type] = _rename_type(v.type, subs)
        t = memo[v.type]
        if t != v.type:
            mapping[v] = Value(v.name, t)
    remap(fn, mapping)


def rename_value(fn: Function, v: Value, name: str) -> Value:
    if v.name == name:
        return v
    new = Value(fn.fresh_name(name), v.type)
    remap(fn, {v: new})
    return new
