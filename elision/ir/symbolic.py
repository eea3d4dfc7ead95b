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


# What a dimension expression may contain. sympify evaluates its text as Python, so text from an IR file must
# not reach it unless it is plain arithmetic: names, integers, + - * / % ** and calls of the functions above.
_DIM_TEXT = re.compile(r"[A-Za-z0-9_+\-*/%(), ]*")
_CALL = re.compile(r"([A-Za-z_][A-Za-z_0-9]*)\s*\(")
_POWER = re.compile(r"\*\*\s*(\(?)\s*(\d*)(?=(\s*\*\*)?)")
_MAX_POWERS = 2
_MAX_DIM_TEXT = 256
_MAX_EXPONENT = 64


def check_dim_expr(expr: str) -> None:
    """Raise ValueError unless ``expr`` is a dimension expression that is safe and cheap to hand to sympy."""
    if len(expr) > _MAX_DIM_TEXT:
        raise ValueError(f"dimension expression of {len(expr)} characters (at most {_MAX_DIM_TEXT})")
    if not _DIM_TEXT.fullmatch(expr):
        bad = sorted(set(expr) - set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_+-*/%(), "))
        raise ValueError(f"dimension expression {expr!r} contains {''.join(bad)!r}: only names, integers, "
                         f"+ - * / % ** and {', '.join(sorted(_FUNCS))}(...) are allowed")
    for name in _IDENT.findall(expr):
        if name.startswith("__"):
            raise ValueError(f"dimension expression {expr!r}: name {name!r} is not allowed")
    for m in _CALL.finditer(expr):
        if m.group(1) not in _FUNCS:
            raise ValueError(f"dimension expression {expr!r} calls {m.group(1)!r}; allowed: {', '.join(sorted(_FUNCS))}")
    powers = list(_POWER.finditer(expr))  # huge powers would make sympy compute for ever
    if len(powers) > _MAX_POWERS:
        raise ValueError(f"dimension expression {expr!r}: more than {_MAX_POWERS} powers")
    for m in powers:
        if m.group(1) or m.group(3) or not m.group(2) or int(m.group(2)) > _MAX_EXPONENT:
            raise ValueError(f"dimension expression {expr!r}: exponents must be integers up to {_MAX_EXPONENT}")


@functools.lru_cache(maxsize=4096)
def to_sympy(expr: str) -> sympy.Expr:
    check_dim_expr(expr)
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
