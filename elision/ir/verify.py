"""IR verifier: definitions before uses, unique names, parameter references, and (optionally) types/shapes."""
from __future__ import annotations

from elision.ir.core import Function, IRError, Module
from elision.ir.ops import UnknownOpError, check_op
from elision.ir.shape_infer import propagate, type_of
from elision.ir.symbolic import to_sympy
from elision.ir.types import TensorType


def verify(module: Module, check_types: bool = False) -> None:
    for fn in module.functions.values():
        verify_function(fn, module, check_types)


def verify_function(fn: Function, module: Module, check_types: bool = False) -> None:
    stale = fn._index.mismatch()
    if stale is not None:
        raise IRError(f"@{fn.name}: the def-use index disagrees with the nodes about {stale}")
    defined = set()
    names: set[str] = set()
    for v in fn.inputs:
        if v.name in names:
            raise IRError(f"@{fn.name}: input %{v.name} is declared twice")
        defined.add(v)
        names.add(v.name)
    for n in fn.nodes:
        for i in n.inputs:
            if i not in defined:
                what = "defined later" if any(m.result == i for m in fn.nodes) else "never defined"
                raise IRError(f"@{fn.name}: %{n.result.name} = {n.op} uses %{i.name}, which is {what}")
        try:
            check_op(n.op)
        except UnknownOpError as e:
            raise IRError(f"@{fn.name}: %{n.result.name}: {e}") from None
        if n.result.name in names:
            raise IRError(f"@{fn.name}: value %{n.result.name} is defined twice")
        if n.op == "param":
            if not (len(n.args) == 1 and isinstance(n.args[0], str)):
                raise IRError(f"@{fn.name}: %{n.result.name} = param(...) must name exactly one parameter")
            pname = n.args[0]
            if pname not in module.params:
                raise IRError(f"@{fn.name}: %{n.result.name} reads unknown parameter {pname!r}")
            if module.param_type(pname) != n.result.type:
                raise IRError(f"@{fn.name}: %{n.result.name} declares type {n.result.type} but parameter "
                              f"{pname!r} is {module.param_type(pname)}")
        defined.add(n.result)
        names.add(n.result.name)
    for o in fn.outputs:
        if o not in defined:
            raise IRError(f"@{fn.name}: returns %{o.name}, which is never defined")
    if check_types:
        _check_types(fn, module)


def _check_types(fn: Function, module: Module) -> None:
    _, env = propagate(fn, module)
    for n in fn.nodes:
        got = type_of(env[n.result])
        want = n.result.type
        if isinstance(want, TensorType) and isinstance(got, TensorType):
            if want.dtype != got.dtype or want.rank != got.rank or any(
                _dims_differ(a, b) for a, b in zip(want.shape, got.shape)
            ):
                where = f" at {n.loc}" if n.loc else ""
                raise IRError(f"@{fn.name}: %{n.result.name} = {n.op}{where} declares {want} but computes {got}")


def _dims_differ(a, b) -> bool:
    if a == b:
        return False

    try:
        return bool((to_sympy(str(a)) - to_sympy(str(b))).simplify() != 0)
    except Exception:
        return True
