"""The def-use index of `Function` equals a full rescan of the function after any sequence of edits.

Edits are made the ways passes make them: assigning node attributes, editing `node.kwargs` like a dict, splicing
`fn.nodes` like a list, assigning a new list to `fn.nodes`, and the `Function` helpers. After every edit each
query (producer, users, index, param, fresh_name) is compared with the scan the IR used before it had an index.
"""
from __future__ import annotations

import copy

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from elision.ir import IRError, Module, parse, verify
from elision.ir.core import Function, Node, Value, iter_values
from elision.ir.types import TensorType

T = TensorType("f32", (4,))
OPS = ["aten.add.Tensor", "aten.mul.Tensor", "aten.cat.default", "param"]


# --- the scans the index replaces ------------------------------------------------------------------
def _listed_once(fn: Function) -> list[Node]:
    seen: set[int] = set()
    return [n for n in fn.nodes if not (id(n) in seen or seen.add(id(n)))]


def scan_users(fn: Function, v: Value) -> list[Node]:
    return [n for n in _listed_once(fn) if v in list(iter_values(n.args)) + list(iter_values(n.kwargs))]


def scan_producer(fn: Function, v: Value) -> Node | None:
    return next((n for n in fn.nodes if n.result == v), None)


def scan_index(fn: Function, node: Node) -> int:
    return next(i for i, n in enumerate(fn.nodes) if n is node)


def scan_param(fn: Function, name: str) -> Node | None:
    return next((n for n in fn.nodes if n.op == "param" and n.args and n.args[0] == name), None)


def scan_fresh_name(fn: Function, hint: str) -> str:
    taken = {v.name for v in fn.values()}
    if hint not in taken:
        return hint
    i = 1
    while f"{hint}_{i}" in taken:
        i += 1
    return f"{hint}_{i}"


def assert_index_matches_scan(fn: Function) -> None:
    assert fn._index.mismatch() is None, fn._index.mismatch()
    values = set(fn.inputs) | {n.result for n in fn.nodes} | {v for n in fn.nodes for v in n.inputs}
    for v in values:
        assert fn.users(v) == scan_users(fn, v), v
        assert fn.producer(v) is scan_producer(fn, v), v
    for n in fn.nodes:
        assert fn.index(n) == scan_index(fn, n)
        if n.op == "param" and n.args and isinstance(n.args[0], str):
            assert fn._index.param_node(n.args[0]) is scan_param(fn, n.args[0])
    for hint in ("v", "add", "w"):
        assert fn.fresh_name(hint) == scan_fresh_name(fn, hint)


# --- random edits ------------------------------------------------------------------------------------
class Editor:
    def __init__(self, data) -> None:
        self.data = data
        inputs = [Value(f"x{i}", T) for i in range(3)]
        self.fn = Function("f", inputs, [], [inputs[0]])
        self.serial = 0
        self.spare: list[Node] = []  # removed nodes, which edits may list again

    def draw(self, strategy, label: str):
        return self.data.draw(strategy, label=label)

    def some_value(self) -> Value:
        pool = list(self.fn.inputs) + [n.result for n in self.fn.nodes] + [n.result for n in self.spare]
        return self.draw(st.sampled_from(pool), "value")

    def some_args(self) -> tuple:
        shape = self.draw(st.sampled_from(["pair", "list", "const", "nested"]), "args shape")
        if shape == "pair":
            return (self.some_value(), self.some_value())
        if shape == "list":
            return ([self.some_value() for _ in range(self.draw(st.integers(0, 3), "n"))], 0)
        if shape == "const":
            return (self.some_value(), 2.0)
        return ((self.some_value(), [self.some_value()]), {"k": 1})

    def new_node(self) -> Node:
        self.serial += 1
        # names are drawn from a small set so that equal results (a value defined twice) happen too
        name = self.draw(st.sampled_from([f"n{self.serial}", "v", "v_1", "v_2", "add", "add_1"]), "name")
        op = self.draw(st.sampled_from(OPS), "op")
        args = (self.draw(st.sampled_from(["a", "b"]), "param name"),) if op == "param" else self.some_args()
        kwargs = self.draw(st.sampled_from([{}, {"alpha": 2}]), "kwargs")
        if self.draw(st.booleans(), "value kwarg"):
            kwargs = {**kwargs, "other": self.some_value()}
        return Node(op, args, kwargs, Value(name, T))

    def some_node(self) -> Node | None:
        if not self.fn.nodes:
            return None
        return self.draw(st.sampled_from(list(self.fn.nodes)), "node")

    def position(self, extra: int = 1) -> int:
        return self.draw(st.integers(0, len(self.fn.nodes) - 1 + extra), "position")

    def step(self) -> None:
        fn, nodes = self.fn, self.fn.nodes
        kind = self.draw(st.sampled_from([
            "append", "insert", "slice_insert", "extend", "insert_before", "insert_after", "setitem",
            "slice_replace", "del", "del_slice", "pop", "remove", "fn_remove", "clear", "assign_list", "sort",
            "reverse", "set_args", "set_kwargs", "kwargs_item", "kwargs_del", "kwargs_update", "kwargs_pop",
            "set_result", "set_op", "replace_all_uses", "replace_input", "relist_spare", "duplicate", "iadd",
        ]), "edit")
        node = self.some_node()
        if kind == "append":
            nodes.append(self.new_node())
        elif kind == "insert":
            nodes.insert(self.draw(st.integers(-len(nodes) - 2, len(nodes) + 2), "i"), self.new_node())
        elif kind == "slice_insert":
            i = self.position()
            nodes[i:i] = [self.new_node() for _ in range(self.draw(st.integers(0, 3), "n"))]
        elif kind == "extend":
            nodes.extend(self.new_node() for _ in range(self.draw(st.integers(0, 3), "n")))
        elif kind == "iadd":
            fn.nodes += [self.new_node()]
        elif kind in ("insert_before", "insert_after") and node is not None:
            getattr(fn, kind)(node, [self.new_node() for _ in range(self.draw(st.integers(1, 2), "n"))])
        elif kind == "setitem" and nodes:
            i = self.draw(st.integers(-len(nodes), len(nodes) - 1), "i")
            self.spare.append(nodes[i])
            nodes[i] = self.new_node()
        elif kind == "slice_replace" and nodes:
            i, j = sorted(self.draw(st.tuples(st.integers(0, len(nodes)), st.integers(0, len(nodes))), "ij"))
            step = self.draw(st.sampled_from([1, 1, 2]), "step")
            old = nodes[i:j:step]
            self.spare.extend(old)
            new = [self.new_node() for _ in old] if step != 1 else [self.new_node() for _ in range(self.draw(st.integers(0, 3), "n"))]
            nodes[i:j:step] = new
        elif kind == "del" and nodes:
            i = self.draw(st.integers(-len(nodes), len(nodes) - 1), "i")
            self.spare.append(nodes[i])
            del nodes[i]
        elif kind == "del_slice" and nodes:
            i, j = sorted(self.draw(st.tuples(st.integers(0, len(nodes)), st.integers(0, len(nodes))), "ij"))
            self.spare.extend(nodes[i:j])
            del nodes[i:j]
        elif kind == "pop" and nodes:
            self.spare.append(nodes.pop(self.draw(st.integers(-len(nodes), len(nodes) - 1), "i")))
        elif kind == "remove" and node is not None:
            nodes.remove(node)
            self.spare.append(node)
        elif kind == "fn_remove" and node is not None:
            fn.remove(node)
            self.spare.append(node)
        elif kind == "clear" and self.draw(st.integers(0, 9), "rarely") == 0:
            self.spare.extend(nodes)
            nodes.clear()
        elif kind == "assign_list":
            keep = self.draw(st.lists(st.sampled_from(list(nodes)), unique_by=id), "keep") if nodes else []
            self.spare.extend(n for n in nodes if all(n is not k for k in keep))
            fn.nodes = keep + [self.new_node() for _ in range(self.draw(st.integers(0, 2), "n"))]
        elif kind == "sort":
            nodes.sort(key=lambda n: n.result.name)
        elif kind == "reverse":
            nodes.reverse()
        elif kind == "set_args" and node is not None:
            node.args = (self.draw(st.sampled_from(["a", "b"]), "p"),) if node.op == "param" else self.some_args()
        elif kind == "set_kwargs" and node is not None:
            node.kwargs = {"other": self.some_value()} if self.draw(st.booleans(), "b") else {}
        elif kind == "kwargs_item" and node is not None:
            node.kwargs[self.draw(st.sampled_from(["other", "x"]), "k")] = self.some_value()
        elif kind == "kwargs_del" and node is not None and node.kwargs:
            del node.kwargs[next(iter(node.kwargs))]
        elif kind == "kwargs_update" and node is not None:
            node.kwargs.update(y=self.some_value())
        elif kind == "kwargs_pop" and node is not None:
            node.kwargs.pop("other", None)
        elif kind == "set_result" and node is not None:
            node.result = Value(self.draw(st.sampled_from(["v", "v_1", "v_3", "r", node.result.name]), "name"), T)
        elif kind == "set_op" and node is not None:
            node.op = self.draw(st.sampled_from(OPS), "op")
            if node.op == "param" and self.draw(st.booleans(), "b"):
                node.args = ("a",)
        elif kind == "replace_all_uses":
            fn.replace_all_uses(self.some_value(), self.some_value())
        elif kind == "replace_input" and node is not None:
            node.replace_input(self.some_value(), self.some_value())
        elif kind == "relist_spare" and self.spare:
            back = self.spare.pop(self.draw(st.integers(0, len(self.spare) - 1), "k"))
            if all(back is not n for n in nodes):
                nodes.insert(self.position(), back)
        elif kind == "duplicate" and node is not None:
            nodes.insert(self.position(), node)  # listed twice, as a move (insert, then delete) does for a moment
            if self.draw(st.booleans(), "undo"):
                del nodes[max(i for i, n in enumerate(nodes) if n is node)]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.data())
def test_random_edits_keep_the_index_equal_to_a_rescan(data):
    editor = Editor(data)
    for _ in range(data.draw(st.integers(1, 40), label="edits")):
        editor.step()
        assert_index_matches_scan(editor.fn)


@settings(max_examples=100, deadline=None)
@given(st.data())
def test_shared_and_detached_node_lists(data):
    """A shallow copy of a function lists the same nodes: an edit of a node reaches both indexes. A list
    replaced by `fn.nodes = ...` is detached: editing it leaves the function alone."""
    editor = Editor(data)
    for _ in range(data.draw(st.integers(1, 10), label="edits")):
        editor.step()
    twin = copy.copy(editor.fn)
    old_list = editor.fn.nodes
    editor.fn.nodes = list(old_list)
    old_list.append(editor.new_node())
    assert all(n is not old_list[-1] for n in editor.fn.nodes)
    for _ in range(data.draw(st.integers(1, 10), label="more edits")):
        editor.step()
        assert_index_matches_scan(editor.fn)
        assert_index_matches_scan(twin)
    # a deep copy is a separate function with its own nodes
    deep = copy.deepcopy(editor.fn)
    assert_index_matches_scan(deep)
    assert all(a is not b for a, b in zip(deep.nodes, editor.fn.nodes))


def test_many_insertions_at_one_spot_renumber_the_order():
    x = Value("x", T)
    fn = Function("f", [x], [], [x])
    anchor = fn.add_node("aten.neg.default", (x,), type=T)
    last = fn.add_node("aten.neg.default", (anchor.result,), type=T)
    prev = anchor
    for i in range(200):  # each insertion halves the gap after the previous one: renumbering must step in
        prev = fn.add_node("aten.neg.default", (prev.result,), type=T, after=prev)
    assert fn.index(last) == len(fn.nodes) - 1 == 201
    assert [fn.index(n) for n in fn.nodes] == list(range(202))
    assert_index_matches_scan(fn)


def test_index_of_a_node_not_listed_is_an_ir_error():
    x = Value("x", T)
    fn = Function("f", [x], [], [x])
    with pytest.raises(IRError, match="not in function @f"):
        fn.index(Node("aten.neg.default", (x,), {}, Value("y", T)))


def test_verify_reports_an_argument_list_edited_in_place():
    module = parse("func @f(%x : f32[4], %y : f32[4]) {\n"
                   "  %c : f32[8] = aten.cat.default([%x, %x])\n"
                   "  return (%c)\n}\n")
    fn = module.functions["f"]
    verify(module)
    fn.nodes[0].args[0][1] = fn.inputs[1]  # bypasses the index: the node's inputs are now out of date
    with pytest.raises(IRError, match="edited in place"):
        verify(module)


def test_module_of_a_parsed_function_keeps_its_index():
    module = parse("func @f(%x : f32[4]) {\n"
                   "  %a : f32[4] = aten.neg.default(%x)\n"
                   "  %b : f32[4] = aten.add.Tensor(%a, %a)\n"
                   "  return (%b)\n}\n")
    fn = module.functions["f"]
    a, b = fn.nodes
    assert fn.users(a.result) == [b] and fn.producer(b.result) is b
    copied = Module.copy(module).functions["f"]
    assert copied.users(copied.nodes[0].result) == [copied.nodes[1]]
    assert_index_matches_scan(fn)
