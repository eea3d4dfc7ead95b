"""GraphView: producer/user lookups over one function, plus the small dataflow queries the analyses need.

Built once per analysis run (the function must not change while a view is in use); ancestor sets are memoized,
so repeated reachability questions about the same value cost one walk.
"""
from __future__ import annotations

from typing import Iterable

from elision.analysis.model_map.ops import TRANSPARENT_OPS, is_full_slice
from elision.ir.core import Function, Module, Node, Value


class GraphView:
    """Producer/user lookups over one function, plus the small dataflow queries the matchers need."""

    def __init__(self, module: Module, fn: Function):
        self.module, self.fn = module, fn
        self.prod: dict[Value, Node] = fn.producers()
        # assertions (``_assert_tensor_metadata``) are not data uses: they would break single-user chains
        self.uses: dict[Value, list[Node]] = {}
        for n in fn.nodes:
            if n.op.startswith(("aten._assert", "aten.sym_constrain_range")):
                continue
            for i in n.inputs:
                self.uses.setdefault(i, []).append(n)
        self.order = {n.result: i for i, n in enumerate(fn.nodes)}
        self.inputs = set(fn.inputs)
        self._anc: dict[Value, frozenset] = {}

    def op(self, v: Value) -> str:
        p = self.prod.get(v)
        return p.op if p is not None else "input"

    def param_name(self, v: Value) -> str | None:
        """The parameter a value reads, looking through transposes and casts of the parameter."""
        for _ in range(4):
            p = self.prod.get(v)
            if p is None:
                return None
            if p.op == "param":
                return p.args[0]
            if p.op in ("aten.t.default", "aten.permute.default", "aten.transpose.int") or p.op in TRANSPARENT_OPS:
                v = p.args[0]
                continue
            return None
        return None

    def through(self, v: Value, ops: set[str] = TRANSPARENT_OPS) -> Value:
        """Walk back from ``v`` through ops in ``ops`` (first tensor argument) to the first other value."""
        while True:
            p = self.prod.get(v)
            if p is None or p.op not in ops or not p.args or not isinstance(p.args[0], Value):
                return v
            v = p.args[0]

    def skip_full_slices(self, v: Value) -> Value:
        """Walk back from ``v`` through slices that keep every element (``x[:, :]``)."""
        while (p := self.prod.get(v)) is not None and is_full_slice(p) and isinstance(p.args[0], Value):
            v = p.args[0]
        return v

    def forward_through(self, v: Value, ops: set[str] = TRANSPARENT_OPS) -> Value:
        """Follow single-user chains of ``ops`` forward from ``v``."""
        while True:
            us = self.uses.get(v, [])
            if len(us) != 1 or us[0].op not in ops or us[0].args[0] != v:
                return v
            v = us[0].result

    def ancestors(self, v: Value) -> frozenset:
        if v in self._anc:
            return self._anc[v]
        out: set[Value] = set()
        stack = [v]
        while stack:
            x = stack.pop()
            p = self.prod.get(x)
            if p is None:
                continue
            for i in p.inputs:
                if i not in out:
                    out.add(i)
                    stack.append(i)
        res = frozenset(out)
        self._anc[v] = res
        return res

    def upstream(self, values: Iterable[Value]) -> set[Value]:
        """``values`` and every value they are computed from."""
        out: set[Value] = set()
        for v in values:
            out |= self.ancestors(v) | {v}
        return out

    def nodes_between(self, start: Iterable[Value], end: Value) -> list[Node]:
        """Nodes on a path from any ``start`` value to ``end`` (excluding start producers, including end's)."""
        start = set(start)
        up = self.ancestors(end) | {end}
        keep = []
        reach = set(start)
        for n in self.fn.nodes:
            if n.result in up and any(i in reach for i in n.inputs):
                reach.add(n.result)
                keep.append(n)
        return keep
