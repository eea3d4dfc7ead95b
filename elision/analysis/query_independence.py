"""Query-independence of a field decoder: does every query point's value depend on that point alone?

`query_independence(fn, query_input, query_dim)` follows the query axis (axis `query_dim` of input `query_input`)
forward through an IR function with the per-op axis rules of `elision.analysis.axes`, and fails at any op that
combines values along it: a reduction, softmax or norm over it, a matmul or attention contracting over it (keys and
values computed from the queries), a sort, cumulative sum, index or slice along it, a reshape that merges it with
another axis, a concatenation of query-dependent with query-invariant tensors, and any op without a rule. Evaluating
any subset of query points (chunks, the cells of a sparse level, tiles of adaptive KV) is legal iff the proof holds
and the output carries the query axis.

Values that do not depend on the query input are query-invariant: the hoist-invariants pass computes them once per
shape. Sizes and other scalars (``sym_size`` of the points) are shape information, not per-query data.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from elision.analysis.axes import axis_rule, base_op
from elision.analysis.cache import analyses
from elision.ir.core import Function, Module, Node, Value
from elision.ir.types import TensorType, TupleType


@dataclass
class Violation:
    node: str
    op: str
    reason: str
    loc: str = ""

    def __str__(self) -> str:
        where = f" at {self.loc}" if self.loc else ""
        return f"{self.op} ({self.node}){where}: {self.reason}"


@dataclass
class QueryIndependenceReport:
    ok: bool
    violations: list[Violation] = field(default_factory=list)
    query_dims: dict[str, int | None] = field(default_factory=dict)  # value -> its query axis (None: invariant)
    invariant_nodes: list[str] = field(default_factory=list)

    def explain(self) -> str:
        if self.ok:
            return f"query-independent; {len(self.invariant_nodes)} query-invariant nodes can be hoisted"
        return "not query-independent:\n  " + "\n  ".join(str(v) for v in self.violations)


_BAD = "bad"  # the value already failed upstream (reported once, where it happened)


def _query_axes(node: Node, carried: dict[Value, object]) -> tuple[object, str | None]:
    """(query axis of the result -- an int, or a tuple per element of a tuple result --, or the reason it fails)."""
    op = base_op(node.op)
    rule = axis_rule(node)
    if rule is None:
        return None, f"op {op!r} is not known to preserve per-query independence"
    if op in ("cat", "concat", "stack") and any(carried.get(v) is None for v in node.args[0]):
        return None, f"{op} combines query-dependent and query-invariant tensors"
    landed: dict[int | None, set[int]] = {}
    for v, axes in carried.items():
        per_part = enumerate(axes) if isinstance(axes, tuple) else [(None, axes)]
        for part, axis in per_part:
            if axis is None:
                continue
            if part is None and any((a == v and ia == axis) or (b == v and ib == axis) for a, ia, b, ib in rule.ties):
                return None, f"{rule.verb_for(v)} the query axis"  # contracted (also when v is used twice)
            links = [ln for ln in rule.links if ln.source == v and ln.part == part and ln.axis == axis]
            if not links or any(ln.mixes for ln in links):
                return None, f"{rule.verb_for(v)} the query axis"
            for ln in links:
                landed.setdefault(ln.result_part, set()).add(ln.result_axis)
    if any(len(axes) > 1 for axes in landed.values()):
        dims = sorted(a for axes in landed.values() for a in axes)
        return None, f"inputs carry the query axis in different dims {dims}"
    if isinstance(node.result.type, TupleType):
        return tuple(next(iter(landed[p])) if p in landed else None for p in range(len(node.result.type.elems))), None
    return next(iter(landed[None])), None


def query_independence(fn: Function, query_input: int = 0, query_dim: int = 1,
                       output_index: int = 0) -> QueryIndependenceReport:
    """Prove per-query independence of `fn`'s output `output_index` w.r.t. axis `query_dim` of input `query_input`."""
    if not 0 <= query_input < len(fn.inputs):
        raise ValueError(f"query_input {query_input} out of range: @{fn.name} has {len(fn.inputs)} inputs")
    axes: dict[Value, object] = {fn.inputs[query_input]: query_dim}
    violations: list[Violation] = []
    for n in fn.nodes:
        carried = {v: axes[v] for v in n.inputs if axes.get(v) is not None}
        if not carried or n.op == "param":
            continue
        if any(a == _BAD for a in carried.values()):
            axes[n.result] = _BAD
            continue
        if not isinstance(n.result.type, (TensorType, TupleType)):
            continue  # a size or another scalar: shape information, not per-query data
        result, why = _query_axes(n, carried)
        if why is not None:
            violations.append(Violation(n.result.name, base_op(n.op).removeprefix("elision."), why, n.loc))
            axes[n.result] = _BAD
        else:
            axes[n.result] = result
    out = fn.outputs[output_index]
    if not violations and axes.get(out) is None:
        violations.append(Violation(out.name, "output", "the output does not depend on the query points"))
    invariant = [n.result.name for n in fn.nodes if n.op != "param" and axes.get(n.result) is None]
    return QueryIndependenceReport(ok=not violations, violations=violations,
                                   query_dims={v.name: a if isinstance(a, int) else None for v, a in axes.items()},
                                   invariant_nodes=invariant)


def cached_query_independence(module: Module, function: str, query_input: int = 0,
                              query_dim: int = 1) -> QueryIndependenceReport:
    """The proof for `module.functions[function]`, kept until a pass changes the module (the analysis cache)."""
    return analyses().get(f"query-independence:{function}:{query_input}:{query_dim}", module,
                          lambda m: query_independence(m.functions[function], query_input, query_dim))
