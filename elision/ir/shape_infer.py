"""Type inference by running ops on fake tensors whose sizes are symbolic (sympy symbols named as in the IR).

Functions and modules are read by attribute and their classes are not imported: ``Function.add_node`` infers
the types of new nodes with :func:`infer_node_type`.
"""
from __future__ import annotations

import itertools

import sympy
import torch
from torch._dispatch.python import enable_python_dispatcher
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv
from torch.utils._sympy.numbers import int_oo
from torch.utils._sympy.value_ranges import ValueRanges

from elision.ir.ops import resolve_op
from elision.ir.symbolic import from_sympy, symbol, to_sympy
from elision.ir.types import NONE, ScalarType, TensorType, TupleType, Type, dtype_name
from elision.ir.values import IRError, Value, map_values


def _primes():
    for n in itertools.count(17):
        if sympy.isprime(n):
            yield n


class SymbolicContext:
    """A fake-tensor world in which the IR's named dims are real sympy symbols.

    ``ranges`` ({dim name: [low, high]}, None for unbounded; a module's ``dim_ranges`` attribute) bounds the dims
    as torch.export found them, e.g. ``seq <= max_position_embeddings``: an op that slices a fixed-size table by a
    dim then types as export did."""

    def __init__(self, ranges: dict | None = None) -> None:
        self.shape_env = ShapeEnv()
        self.mode = FakeTensorMode(shape_env=self.shape_env, allow_non_fake_inputs=True)
        self._hints = _primes()
        self._syms: dict[str, sympy.Symbol] = {}
        self._ranges = dict(ranges or {})

    def _sym(self, name: str) -> sympy.Symbol:
        if name not in self._syms:
            s = symbol(name)
            # like torch.export's dims: >= 2 so 0/1 broadcasting questions have an answer
            low, high = (list(self._ranges.get(name) or ()) + [None, None])[:2]
            low = max(2, int(low)) if low is not None else 2
            hint = next(self._hints)
            if high is not None and hint > int(high):  # a distinct prime hint does not fit: the largest size does
                hint = int(high)
            self.shape_env.backed_var_to_val[s] = sympy.Integer(max(hint, low))
            # through ShapeEnv's own bookkeeping, which a guard refining this range later (seq <= 128) updates
            self.shape_env._update_var_to_range(s, ValueRanges(low, int(high) if high is not None else int_oo))
            self._syms[name] = s
        return self._syms[name]

    def dim(self, d: int | str):
        if isinstance(d, int):
            return d
        expr = to_sympy(d)
        for s in expr.free_symbols:
            self._sym(s.name)
        expr = expr.subs({s: self._syms[s.name] for s in expr.free_symbols})
        hint = int(expr.subs(self.shape_env.backed_var_to_val))
        return self.shape_env.create_symintnode(expr, hint=hint)

    def fake(self, ty: Type):
        if isinstance(ty, TensorType):
            with self.mode:
                return torch.empty(tuple(self.dim(d) for d in ty.shape), dtype=ty.torch_dtype)
        if isinstance(ty, ScalarType):
            if ty.kind == "int" and ty.expr is not None:
                return self.dim(int(ty.expr) if ty.expr.lstrip("-").isdigit() else ty.expr)
            raise IRError(f"cannot make a fake value for scalar type {ty} without an expression")
        if isinstance(ty, TupleType):
            return tuple(self.fake(e) for e in ty.elems)
        return None

    def from_param(self, t: torch.Tensor):
        with self.mode:
            return torch.empty(tuple(t.shape), dtype=t.dtype)

    def run(self, op: str, args, kwargs):
        # the Python dispatcher, as torch.export traces with it: without it a C++ composite kernel called from an
        # op's meta function takes the concrete-int path and refuses symbolic sizes (baddbmm's meta expands its
        # input to the symbolic batch: "SymIntArrayRef expected to contain only concrete integers", BLOOM's ALiBi)
        with enable_python_dispatcher(), self.mode:
            return resolve_op(op)(*args, **kwargs)


def type_of(val) -> Type:
    """IR type of a real, fake or symbolic value."""
    if isinstance(val, torch.Tensor):
        return TensorType(dtype_name(val.dtype), tuple(_dim_of(d) for d in val.shape))
    if isinstance(val, torch.SymInt):
        return ScalarType("int", str(_dim_of(val)))
    if isinstance(val, bool):
        return ScalarType("bool")
    if isinstance(val, int):
        return ScalarType("int", str(val))
    if isinstance(val, (float, torch.SymFloat)):
        return ScalarType("float")
    if isinstance(val, torch.SymBool):
        return ScalarType("bool")
    if isinstance(val, (tuple, list)):
        return TupleType(tuple(type_of(v) for v in val))
    if val is None:
        return NONE
    raise IRError(f"cannot type value of Python type {type(val).__name__}")


def _dim_of(d) -> int | str:
    if isinstance(d, int):
        return d
    return from_sympy(d.node.expr)


def propagate(fn, module=None, upto=None) -> tuple[SymbolicContext, dict]:
    """Run function ``fn`` on fake inputs; returns the context and the fake value of every Value (up to node
    ``upto``). ``module`` holds the parameters (default: ``fn.module``)."""
    module = module or fn.module
    ctx = SymbolicContext(_dim_ranges(module))
    env: dict[Value, object] = {v: ctx.fake(v.type) for v in fn.inputs}
    for n in fn.nodes:
        if n is upto:
            break
        if n.op == "param":
            env[n.result] = ctx.from_param(module.params[n.args[0]])
            continue
        lookup = env.__getitem__
        try:
            env[n.result] = ctx.run(n.op, map_values(n.args, lookup), map_values(n.kwargs, lookup))
        except Exception as e:
            where = f" at {n.loc}" if n.loc else ""
            raise IRError(f"@{fn.name}: cannot infer the type of %{n.result.name} = {n.op}{where}: {e}") from e
    return ctx, env


def _dim_ranges(module) -> dict:
    attrs = getattr(module, "attrs", None) or {}
    return attrs.get("dim_ranges") or {}


def infer_node_type(fn, op: str, args: tuple, kwargs: dict) -> Type:
    """Type of a new node ``op(*args, **kwargs)`` whose Value arguments come from function ``fn``."""
    ctx = SymbolicContext(_dim_ranges(fn.module))
    cache: dict[Value, object] = {}

    def fake_of(v: Value):
        if v in cache:
            return cache[v]
        p = fn.producer(v)
        if p is not None and p.op == "param" and fn.module is not None and p.args[0] in fn.module.params:
            cache[v] = ctx.from_param(fn.module.params[p.args[0]])
        else:
            cache[v] = ctx.fake(v.type)
        return cache[v]

    try:
        out = ctx.run(op, map_values(args, fake_of), map_values(kwargs, fake_of))
    except Exception as e:
        raise IRError(f"@{fn.name}: cannot infer the result type of {op}: {e}") from e
    return type_of(out)
