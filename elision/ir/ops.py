"""Resolve IR op names to the Python callables that implement them, against explicit allow-lists.

``aten.linear.default`` -> ``torch.ops.aten.linear.default``; ``elision.attention.default`` -> the op registered by
elision's kernels; ``getitem`` -> ``operator.getitem``; ``py.operator.add`` / ``py.math.floor`` -> that function.

IR text comes from files, so an op name must never reach an arbitrary callable: ``py.*`` names resolve only
through :data:`PYTHON_CALLABLES` (the pure functions torch.export puts in graphs for symbolic-size arithmetic and
checks), and torch ops only in the namespaces of :data:`TORCH_NAMESPACES`, less the ops that touch files.
Nothing is imported by name.
"""
from __future__ import annotations

import functools
import math
import operator
from typing import Callable

import torch

from elision.ir.values import IRError

_PY_PREFIX = "py."


class UnknownOpError(IRError):
    """An op name that does not resolve, or is not allowed; ``args[0]`` names the op."""


def _named(module: str, obj, names: tuple[str, ...]) -> dict[str, Callable]:
    return {f"{module}.{n}": getattr(obj, n) for n in names if hasattr(obj, n)}


# Python callables IR may call (``py.<module>.<name>``): symbolic-size arithmetic, comparisons and checks.
PYTHON_CALLABLES: dict[str, Callable] = {
    **_named("operator", operator, (
        "add", "sub", "mul", "truediv", "floordiv", "mod", "pow", "neg", "pos", "abs", "eq", "ne", "lt", "le", "gt",
        "ge", "and_", "or_", "xor", "not_", "invert", "lshift", "rshift", "truth", "getitem")),
    **_named("math", math, ("floor", "ceil", "trunc", "sqrt", "log", "log2", "exp", "isnan", "isinf", "isfinite")),
    **{f"builtins.{f.__name__}": f for f in (abs, min, max, round)},
    **_named("torch", torch, (
        "sym_int", "sym_float", "sym_max", "sym_min", "sym_not", "sym_ite", "sym_sqrt", "sym_sum", "_sym_sqrt",
        "_sym_log2", "_sym_cos", "_sym_sin", "_sym_tan", "_sym_cosh", "_sym_sinh", "_sym_tanh", "_sym_acos",
        "_sym_asin", "_sym_atan", "_check", "_check_is_size", "sym_constrain_range",
        "sym_constrain_range_for_size")),
}
_PYTHON_NAMES: dict[Callable, str] = {f: name for name, f in PYTHON_CALLABLES.items()}

# torch op namespaces IR may call (``<namespace>.<name>.<overload>``)
TORCH_NAMESPACES = ("aten", "prims", "elision")
# ops in those namespaces that reach outside the tensors they are given
FORBIDDEN_TORCH_OPS = {"aten.from_file": "reads a file named by its argument"}


@functools.lru_cache(maxsize=1)
def load_custom_ops() -> None:
    """Register ``torch.ops.elision.*``. Imported on first use, not at module top: the kernel ops import triton
    (about two seconds), which IR code that never meets an elision op should not pay."""
    import elision.kernels.ops  # noqa: F401  (registers attention, the norms, sparse cross-attention)


def op_name(target) -> str:
    """The IR spelling of an FX call_function target."""
    if isinstance(target, torch._ops.OpOverload):
        name = str(target)  # "aten.linear.default"
    elif isinstance(target, torch._ops.OpOverloadPacket):
        name = f"{target._qualified_op_name.replace('::', '.')}.default"
    else:
        name = None
    if name is not None:
        check_op(name)  # refused at import, not when the IR is loaded again
        return name
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.HigherOrderOperator):
        raise UnknownOpError(f"higher-order operator {target.name()}")
    try:
        return _PY_PREFIX + _PYTHON_NAMES[target]
    except (KeyError, TypeError):  # TypeError: an unhashable callable object
        mod = getattr(target, "__module__", None)
        name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None) or repr(target)
        raise UnknownOpError(f"Python callable {mod}.{name} (not on the allow-list of Python callables the IR may "
                             f"call: symbolic-size arithmetic and checks)") from None


def check_op(op: str) -> None:
    """Raise UnknownOpError unless ``op`` is a name the IR may call (allow-lists only; imports nothing)."""
    if op in ("param", "getitem"):
        return
    if op.startswith(_PY_PREFIX):
        if op[len(_PY_PREFIX):] not in PYTHON_CALLABLES:
            raise UnknownOpError(f"op {op!r} names a Python callable that is not on elision's allow-list (operator, "
                                 f"math and torch.sym_* arithmetic, torch._check); IR cannot call arbitrary Python")
        return
    parts = op.split(".")
    # aten has dunder op names (aten.__and__.Tensor); overload names never start with "__"
    if len(parts) != 3 or not all(p.isidentifier() for p in parts) or parts[2].startswith("__"):
        raise UnknownOpError(f"op name {op!r} is not of the form namespace.name.overload")
    if parts[0] not in TORCH_NAMESPACES:
        raise UnknownOpError(f"op {op!r}: namespace {parts[0]!r} is not allowed in elision IR "
                             f"(allowed: {', '.join(TORCH_NAMESPACES)})")
    why = FORBIDDEN_TORCH_OPS.get(f"{parts[0]}.{parts[1]}")
    if why:
        raise UnknownOpError(f"op {op!r} is not allowed in elision IR: it {why}")


@functools.lru_cache(maxsize=None)
def resolve_op(op: str) -> Callable:
    check_op(op)
    if op == "getitem":
        return operator.getitem
    if op.startswith(_PY_PREFIX):
        return PYTHON_CALLABLES[op[len(_PY_PREFIX):]]
    ns, name, overload = op.split(".")
    if ns == "elision":
        load_custom_ops()
    try:
        target = getattr(getattr(getattr(torch.ops, ns), name), overload)
    except (AttributeError, RuntimeError):
        raise UnknownOpError(f"op {op!r} is not registered with torch") from None
    if not isinstance(target, torch._ops.OpOverload):
        raise UnknownOpError(f"op {op!r} is not a torch operator overload")
    return target


# Ops with effects beyond their result: never removed or deduplicated by DCE/CSE.
_EFFECTFUL_PREFIXES = ("aten._assert", "aten.sym_constrain_range", "aten._print", "py.torch._check")


def is_effectful(op: str) -> bool:
    if op.startswith(_EFFECTFUL_PREFIXES):
        return True
    if op.startswith("aten."):
        name = op.split(".")[1]
        return name.endswith("_") and not name.startswith("_") or name in {"copy_", "resize_"}
    return False


# Ops whose result changes from call to call; never folded or deduplicated.
_NONDETERMINISTIC = {"aten.rand", "aten.randn", "aten.randint", "aten.bernoulli", "aten.dropout",
                     "aten.native_dropout", "aten.normal", "aten.uniform", "aten.multinomial", "aten.randperm",
                     "aten.empty", "aten.empty_like", "aten.empty_strided"}


def is_deterministic(op: str) -> bool:
    base = ".".join(op.split(".")[:2])
    if base.startswith(("aten.rand", "aten.normal", "aten.bernoulli")):  # rand, rand_like, randn_like, randint_like ...
        return False
    return base not in _NONDETERMINISTIC
