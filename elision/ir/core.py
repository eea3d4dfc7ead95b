"""The IR's data structures: values in SSA form, nodes, functions, and a module of functions.

One node type covers everything: ``op`` names the operation (``aten.linear.default``, ``elision.attention.default``,
``param``, ``getitem``, ``py.operator.add``), ``args``/``kwargs`` mirror the op's Python signature with
:class:`Value` objects where tensors or symbolic scalars flow and plain constants elsewhere. Keeping the
torch calling convention means the interpreter and the FX emitter need no per-op tables: an op's semantics
are exactly those of the torch operator it names.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch

from elision.ir.types import NONE, ScalarType, TensorType, TupleType, Type, dtype_name


class IRError(Exception):
    """Malformed IR; the message names the function, the node and what is wrong."""


@dataclass(frozen=True)
class Value:
    name: str
    type: Type

    def __str__(self) -> str:
        return f"%{self.name}"

    def __repr__(self) -> str:
        return f"Value(%{self.name}: {self.type})"


def iter_values(obj: Any) -> Iterator[Value]:
    """All Values inside a (nested) args structure, in order."""
    if isinstance(obj, Value):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_values(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_values(o)


def map_values(obj: Any, fn: Callable[[Value], Any]) -> Any:
    """Rebuild a (nested) args structure with every Value replaced by ``fn(value)``."""
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, list):
        return [map_values(o, fn) for o in obj]
    if isinstance(obj, tuple):
        return tuple(map_values(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_values(v, fn) for k, v in obj.items()}
    return obj


@dataclass(eq=False)
class Node:
    op: str
    args: tuple
    kwargs: dict
    result: Value
    loc: str = ""
    meta: dict = field(default_factory=dict)

    @property
    def inputs(self) -> list[Value]:
        return list(iter_values(self.args)) + list(iter_values(self.kwargs))

    @property
    def is_param(self) -> bool:
        return self.op == "param"

    @property
    def param_name(self) -> str:
        assert self.op == "param"
        return self.args[0]

    def replace_input(self, old: Value, new: Value) -> None:
        swap = lambda v: new if v == old else v  # noqa: E731
        self.args = map_values(self.args, swap)
        self.kwargs = map_values(self.kwargs, swap)

    def __repr__(self) -> str:
        from elision.ir.printer import format_node

        return f"Node({format_node(self)})"


@dataclass(eq=False)
class Function:
    name: str
    inputs: list[Value]
    nodes: list[Node]
    outputs: list[Value]
    module: "Module | None" = field(default=None, repr=False)

    # --- lookups -------------------------------------------------------------------------------
    def producer(self, v: Value) -> Node | None:
        for n in self.nodes:
            if n.result == v:
                return n
        return None

    def producers(self) -> dict[Value, Node]:
        return {n.result: n for n in self.nodes}

    def users(self, v: Value) -> list[Node]:
        return [n for n in self.nodes if v in n.inputs]

    def use_map(self) -> dict[Value, list[Node]]:
        uses: dict[Value, list[Node]] = {}
        for n in self.nodes:
            for i in n.inputs:
                uses.setdefault(i, []).append(n)
        return uses

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        for n in self.nodes:
            yield n.result

    def index(self, node: Node) -> int:
        for i, n in enumerate(self.nodes):
            if n is node:
                return i
        raise IRError(f"node {node!r} is not in function @{self.name}")

    # --- mutation ------------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        taken = {v.name for v in self.values()}
        hint = "".join(c if (c.isalnum() or c == "_") else "_" for c in hint) or "v"
        if hint not in taken:
            return hint
        for i in itertools.count(1):
            if f"{hint}_{i}" not in taken:
                return f"{hint}_{i}"
        raise AssertionError("unreachable")

    def new_value(self, type: Type, hint: str = "v") -> Value:
        return Value(self.fresh_name(hint), type)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for n in self.nodes:
            if old in n.inputs:
                n.replace_input(old, new)
        self.outputs = [new if o == old else o for o in self.outputs]

    def insert_before(self, anchor: Node, nodes: list[Node]) -> None:
        i = self.index(anchor)
        self.nodes[i:i] = nodes

    def insert_after(self, anchor: Node, nodes: list[Node]) -> None:
        i = self.index(anchor) + 1
        self.nodes[i:i] = nodes

    def remove(self, node: Node) -> None:
        del self.nodes[self.index(node)]

    def add_node(self, op: str, args: tuple, kwargs: dict | None = None, type: Type | None = None,
                 loc: str = "", before: Node | None = None, after: Node | None = None,
                 hint: str | None = None) -> Node:
        """Create a node (inferring its result type when ``type`` is None) and insert it.

        Without ``before``/``after`` it is appended after the last node.
        """
        kwargs = kwargs or {}
        if type is None:
            from elision.ir.shape_infer import infer_node_type

            type = infer_node_type(self, op, args, kwargs)
        node = Node(op, tuple(args), dict(kwargs), self.new_value(type, hint or op.split(".")[-2 if op.count(".") >= 2 else -1]), loc)
        if before is not None:
            self.insert_before(before, [node])
        elif after is not None:
            self.insert_after(after, [node])
        else:
            self.nodes.append(node)
        return node

    def param(self, name: str, before: Node | None = None) -> Value:
        """A value reading parameter ``name`` (reusing an existing param node when there is one)."""
        for n in self.nodes:
            if n.op == "param" and n.args[0] == name:
                return n.result
        if self.module is None or name not in self.module.params:
            raise IRError(f"function @{self.name}: unknown parameter {name!r}")
        t = self.module.params[name]
        node = Node("param", (name,), {}, self.new_value(TensorType(dtype_name(t.dtype), tuple(t.shape)), "p_" + name.split(".")[-1]), "")
        self.nodes.insert(0 if before is None else self.index(before), node)
        return node.result

    def copy(self) -> "Function":
        nodes = [Node(n.op, n.args, dict(n.kwargs), n.result, n.loc, dict(n.meta)) for n in self.nodes]
        return Function(self.name, list(self.inputs), nodes, list(self.outputs), self.module)

    def __str__(self) -> str:
        from elision.ir.printer import format_function

        return format_function(self)


@dataclass(eq=False)
class Module:
    functions: dict[str, Function] = field(default_factory=dict)
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    # free-form facts a pass or the front end wants to keep (input names, dynamic dims, source hash)
    attrs: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for f in self.functions.values():
            f.module = self

    def add_function(self, fn: Function) -> Function:
        fn.module = self
        self.functions[fn.name] = fn
        return fn

    def param_type(self, name: str) -> TensorType:
        t = self.params[name]
        return TensorType(dtype_name(t.dtype), tuple(t.shape))

    def node_count(self) -> int:
        return sum(len(f.nodes) for f in self.functions.values())

    def copy(self) -> "Module":
        """Copy of the graph structure; parameter tensors are shared, not cloned."""
        m = Module({}, dict(self.params), dict(self.attrs))
        for f in self.functions.values():
            m.add_function(f.copy())
        return m

    def print(self) -> str:
        from elision.ir.printer import format_module

        return format_module(self)

    __str__ = print


__all__ = ["IRError", "Value", "Node", "Function", "Module", "iter_values", "map_values",
           "TensorType", "ScalarType", "TupleType", "NONE"]
