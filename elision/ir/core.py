"""The IR's data structures: values in SSA form, nodes, functions, and a module of functions.

One node type covers everything: ``op`` names the operation (``aten.linear.default``, ``elision.attention.default``,
``param``, ``getitem``, ``py.operator.add``), ``args``/``kwargs`` mirror the op's Python signature with
:class:`Value` objects where tensors or symbolic scalars flow and plain constants elsewhere. Keeping the
torch calling convention means the interpreter and the FX emitter need no per-op tables: an op's semantics
are exactly those of the torch operator it names.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

import torch

from elision.ir.printer import format_function, format_module, format_node
from elision.ir.shape_infer import infer_node_type
from elision.ir.types import NONE, ScalarType, TensorType, TupleType, Type, dtype_name
from elision.ir.use_index import NodeList, UseIndex, collect_inputs, param_name
from elision.ir.values import IRError, Value, iter_values, map_values


class _Kwargs(dict):
    """A node's keyword arguments: a dict that tells its node when it is edited in place."""

    __slots__ = ("_node",)

    def __init__(self, node: "Node", items) -> None:
        super().__init__(items)
        self._node = node

    def __reduce_ex__(self, protocol):  # copies and pickles are plain dicts, attached to no node
        return (dict, (dict(self),))

    def copy(self) -> dict:
        return dict(self)

    def __setitem__(self, key, value) -> None:
        super().__setitem__(key, value)
        self._node._inputs_changed()

    def __delitem__(self, key) -> None:
        super().__delitem__(key)
        self._node._inputs_changed()

    def __ior__(self, other):
        super().__ior__(other)
        self._node._inputs_changed()
        return self

    def pop(self, *args):
        value = super().pop(*args)
        self._node._inputs_changed()
        return value

    def popitem(self):
        item = super().popitem()
        self._node._inputs_changed()
        return item

    def setdefault(self, key, default=None):
        value = super().setdefault(key, default)
        self._node._inputs_changed()
        return value

    def update(self, *args, **kwargs) -> None:
        super().update(*args, **kwargs)
        self._node._inputs_changed()

    def clear(self) -> None:
        super().clear()
        self._node._inputs_changed()


class Node:
    """``result = op(*args, **kwargs)``, traced from model location ``loc``.

    ``op``, ``args``, ``kwargs`` and ``result`` are properties: assigning them, or editing ``kwargs`` like a dict,
    keeps the def-use index of every function listing the node up to date. Lists nested inside ``args`` are
    values, not containers to edit in place: assign a new ``args`` instead (``verify`` reports in-place edits).
    """

    def __init__(self, op: str, args: tuple, kwargs: dict, result: Value, loc: str = "", meta: dict | None = None):
        self._owners: list = []  # functions whose node list holds this node (one, unless shared on purpose)
        self._op = op
        self._args = args
        self._kwargs = _Kwargs(self, kwargs or {})
        self._result = result
        self._inputs = collect_inputs(args, self._kwargs)
        self.loc = loc
        self.meta = {} if meta is None else meta

    # --- the indexed attributes ----------------------------------------------------------------
    @property
    def op(self) -> str:
        return self._op

    @op.setter
    def op(self, op: str) -> None:
        old = param_name(self._op, self._args)
        self._op = op
        self._param_changed(old)

    @property
    def args(self) -> tuple:
        return self._args

    @args.setter
    def args(self, args: tuple) -> None:
        old = param_name(self._op, self._args)
        self._args = args
        self._inputs_changed()
        self._param_changed(old)

    @property
    def kwargs(self) -> dict:
        return self._kwargs

    @kwargs.setter
    def kwargs(self, kwargs: dict) -> None:
        self._kwargs = _Kwargs(self, kwargs or {})
        self._inputs_changed()

    @property
    def result(self) -> Value:
        return self._result

    @result.setter
    def result(self, result: Value) -> None:
        old, self._result = self._result, result
        for fn in self._owners:
            fn._index.result_changed(self, old, result)

    def _inputs_changed(self) -> None:
        old, self._inputs = self._inputs, collect_inputs(self._args, self._kwargs)
        if old != self._inputs:
            for fn in self._owners:
                fn._index.inputs_changed(self, old, self._inputs)

    def _param_changed(self, old: str | None) -> None:
        new = param_name(self._op, self._args)
        if new != old:
            for fn in self._owners:
                fn._index.param_changed(self, old, new)

    # --- copying: a copy belongs to no function until one lists it --------------------------------
    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_owners", "_inputs")}
        state["_kwargs"] = dict(self._kwargs)
        return state

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._owners = []
        self._kwargs = _Kwargs(self, state["_kwargs"])
        self._inputs = collect_inputs(self._args, self._kwargs)

    # --- reading -------------------------------------------------------------------------------
    @property
    def inputs(self) -> list[Value]:
        return list(self._inputs)

    @property
    def is_param(self) -> bool:
        return self.op == "param"

    @property
    def param_name(self) -> str:
        assert self.op == "param"
        return self.args[0]

    def replace_input(self, old: Value, new: Value) -> None:
        if old not in self._inputs:
            return
        swap = lambda v: new if v == old else v  # noqa: E731
        if any(v == old for v in iter_values(self._args)):
            self.args = map_values(self._args, swap)
        if any(v == old for v in iter_values(self._kwargs)):
            self.kwargs = map_values(self._kwargs, swap)

    def __repr__(self) -> str:
        return f"Node({format_node(self)})"


class Function:
    """A named list of nodes in SSA form, with inputs and outputs.

    ``nodes`` is a :class:`NodeList` that keeps the function's def-use index current; assigning a new list to
    ``nodes`` is fine too (it is indexed anew). ``inputs`` and ``outputs`` are plain lists.
    """

    def __init__(self, name: str, inputs: list[Value], nodes: list[Node], outputs: list[Value],
                 module: "Module | None" = None):
        self.name = name
        self.inputs = inputs
        self.outputs = outputs
        self.module = module
        self._index = UseIndex(self)
        self._nodes = NodeList((), self._index)
        self.nodes = nodes

    @property
    def nodes(self) -> NodeList:
        return self._nodes

    @nodes.setter
    def nodes(self, nodes) -> None:
        new = NodeList(nodes, self._index)
        self._nodes._index = None  # whoever still holds the old list can no longer edit this function through it
        self._nodes = new
        self._index.attach(new)

    def __getstate__(self) -> dict:
        state = {k: v for k, v in self.__dict__.items() if k not in ("_index", "_nodes")}
        state["nodes"] = list(self._nodes)
        return state

    def __setstate__(self, state: dict) -> None:
        nodes = state.pop("nodes")
        self.__dict__.update(state)
        self._index = UseIndex(self)
        self._nodes = NodeList((), self._index)
        self.nodes = nodes

    def __repr__(self) -> str:
        return f"Function(name={self.name!r}, inputs={self.inputs!r}, nodes={list(self._nodes)!r}, outputs={self.outputs!r})"

    # --- lookups -------------------------------------------------------------------------------
    def producer(self, v: Value) -> Node | None:
        """The node defining ``v`` (None for function inputs and unknown values)."""
        return self._index.producer(v)

    def producers(self) -> dict[Value, Node]:
        return {n.result: n for n in self._nodes}

    def users(self, v: Value) -> list[Node]:
        """The nodes reading ``v``, in program order, each once."""
        return self._index.users(v)

    def use_map(self) -> dict[Value, list[Node]]:
        uses: dict[Value, list[Node]] = {}
        for n in self._nodes:
            for i in n._inputs:
                uses.setdefault(i, []).append(n)
        return uses

    def values(self) -> Iterator[Value]:
        yield from self.inputs
        for n in self._nodes:
            yield n.result

    def index(self, node: Node) -> int:
        try:
            return self._index.position(node)
        except KeyError:
            raise IRError(f"node {node!r} is not in function @{self.name}") from None

    # --- mutation ------------------------------------------------------------------------------
    def fresh_name(self, hint: str = "v") -> str:
        hint = "".join(c if (c.isalnum() or c == "_") else "_" for c in hint) or "v"
        return self._index.fresh_name(hint, {v.name for v in self.inputs})

    def new_value(self, type: Type, hint: str = "v") -> Value:
        return Value(self.fresh_name(hint), type)

    def replace_all_uses(self, old: Value, new: Value) -> None:
        for n in list(self._index.uses.get(old, ())):
            n.replace_input(old, new)
        self.outputs = [new if o == old else o for o in self.outputs]

    def insert_before(self, anchor: Node, nodes: list[Node]) -> None:
        i = self.index(anchor)
        self._nodes[i:i] = nodes

    def insert_after(self, anchor: Node, nodes: list[Node]) -> None:
        i = self.index(anchor) + 1
        self._nodes[i:i] = nodes

    def remove(self, node: Node) -> None:
        del self._nodes[self.index(node)]

    def add_node(self, op: str, args: tuple, kwargs: dict | None = None, type: Type | None = None,
                 loc: str = "", before: Node | None = None, after: Node | None = None,
                 hint: str | None = None) -> Node:
        """Create a node (inferring its result type when ``type`` is None) and insert it.

        Without ``before``/``after`` it is appended after the last node.
        """
        kwargs = kwargs or {}
        if type is None:
            type = infer_node_type(self, op, args, kwargs)
        node = Node(op, tuple(args), dict(kwargs), self.new_value(type, hint or op.split(".")[-2 if op.count(".") >= 2 else -1]), loc)
        if before is not None:
            self.insert_before(before, [node])
        elif after is not None:
            self.insert_after(after, [node])
        else:
            self._nodes.append(node)
        return node

    def param(self, name: str, before: Node | None = None) -> Value:
        """A value reading parameter ``name`` (reusing an existing param node when there is one)."""
        existing = self._index.param_node(name)
        if existing is not None:
            return existing.result
        if self.module is None or name not in self.module.params:
            raise IRError(f"function @{self.name}: unknown parameter {name!r}")
        t = self.module.params[name]
        node = Node("param", (name,), {}, self.new_value(TensorType(dtype_name(t.dtype), tuple(t.shape)), "p_" + name.split(".")[-1]), "")
        self._nodes.insert(0 if before is None else self.index(before), node)
        return node.result

    def copy(self) -> "Function":
        nodes = [Node(n.op, n.args, dict(n.kwargs), n.result, n.loc, dict(n.meta)) for n in self._nodes]
        return Function(self.name, list(self.inputs), nodes, list(self.outputs), self.module)

    def __str__(self) -> str:
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
        return format_module(self)

    __str__ = print


__all__ = ["IRError", "Value", "Node", "Function", "Module", "iter_values", "map_values",
           "TensorType", "ScalarType", "TupleType", "NONE"]
