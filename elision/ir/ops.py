"""Resolve IR op names to the Python callables that implement them.

``aten.linear.default`` -> ``torch.ops.aten.linear.default``; ``elision.attention.default`` -> the op registered by
elision's kernels; ``getitem`` -> ``operator.getitem``; ``py.operator.add`` / ``py.math.floor`` -> that function.
"""
from __future__ import annotations

import functools
import importlib
import operator
from typing import Callable

import torch

# Modules that register ``torch.ops.elision.*`` custom ops when imported.
CUSTOM_OP_MODULES = [
    "elision.kernels.ops",
    "elision.kernels.token_ops",
    "elision.apps.volume.ops",
]

_PY_PREFIX = "py."


class UnknownOpError(KeyError):
    pass


@functools.lru_cache(maxsize=1)
def load_custom_ops() -> None:
    for name in CUSTOM_OP_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise


def op_name(target) -> str:
    """The IR spelling of an FX call_function target."""
    if isinstance(target, torch._ops.OpOverload):
        return str(target)  # "aten.linear.default"
    if isinstance(target, torch._ops.OpOverloadPacket):
        return f"{target._qualified_op_name.replace('::', '.')}.default"
    if target is operator.getitem:
        return "getitem"
    if isinstance(target, torch._ops.HigherOrderOperator):
        raise UnknownOpError(f"higher-order operator {target.name()}")
    mod = getattr(target, "__module__", None)
    name = getattr(target, "__qualname__", None) or getattr(target, "__name__", None)
    if mod is None or name is None:
        raise UnknownOpError(f"callable {target!r}")
    if mod == "_operator":
        mod = "operator"
    qual = f"{_PY_PREFIX}{mod}.{name}"
    if resolve_op(qual) is not target:
        raise UnknownOpError(f"callable {target!r} (cannot be named reliably)")
    return qual


@functools.lru_cache(maxsize=None)
def resolve_op(op: str) -> Callable:
    if op == "getitem":
        return operator.getitem
    if op.startswith(_PY_PREFIX):
        path = op[len(_PY_PREFIX):]
        mod_name, _, attr = path.rpartition(".")
        # qualnames may be nested (module.Class.method): walk from the longest importable prefix
        parts = path.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            try:
                obj = importlib.import_module(".".join(parts[:cut]))
            except ImportError:
                continue
            try:
                for p in parts[cut:]:
                    obj = getattr(obj, p)
                return obj
            except AttributeError:
                continue
        raise UnknownOpError(f"python callable {path!r} cannot be imported")
    parts = op.split(".")
    if len(parts) != 3:
        raise UnknownOpError(f"op name {op!r} is not of the form namespace.name.overload")
    ns, name, overload = parts
    if ns == "elision" or not hasattr(getattr(torch.ops, ns), name):
        load_custom_ops()
    try:
        return getattr(getattr(getattr(torch.ops, ns), name), overload)
    except (AttributeError, RuntimeError):
        raise UnknownOpError(f"op {op!r} is not registered with torch") from None


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
