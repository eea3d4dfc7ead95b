"""Symbolic dimension expressions (strings in the IR, sympy where arithmetic is needed)."""
from __future__ import annotations

import functools
import re

import sympy

_IDENT = re.compile(r"[A-Za-z_][A-Za-z_0-9]*")
_FUNCS = {"Max": sympy.Max, "Min": sympy.Min, "floor": sympy.floor, "ceiling": sympy.ceiling,
          "FloorDiv": lambda a, b: sympy.floor(a / b), "Mod": sympy.Mod, "CeilDiv": lambda a, b: sympy.ceiling(a / b)}


def symbol(name: str) -> sympy.Symbol:
    return sympy.Symbol(name, integer=True, positive=True)


@functools.lru_cache(maxsize=4096)
def to_sympy(expr: str) -> sympy.Expr:
    names = {n: symbol(n) for n in _IDENT.findall(expr) if n not in _FUNCS}
    return sympy.sympify(expr, locals={**names, **_FUNCS})


def free_symbols(expr: str) -> set[str]:
    return {n for n in _IDENT.findall(expr) if n not in _FUNCS}


def from_sympy(e: sympy.Expr) -> int | str:
    e = sympy.simplify(e) if not e.is_Symbol else e
    if e.is_Integer:
        return int(e)
    return str(e)


def evaluate(expr: int | str, bindings: dict[str, int]) -> int:
    if isinstance(expr, int):
        return expr
    value = to_sympy(expr).subs({symbol(k): v for k, v in bindings.items()})
    if not value.is_Integer:
        missing = free_symbols(expr) - set(bindings)
        raise ValueError(f"cannot evaluate dimension {expr!r}: unbound symbols {sorted(missing)}")
    return int(value)
