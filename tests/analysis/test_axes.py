"""The per-op axis rules shared by token-axis classes (token pruning) and the query-axis proof (volume decoding)."""
from __future__ import annotations

from elision.analysis.axes import Link, axis_rule
from elision.ir.core import Node, Value
from elision.ir.types import TensorType, TupleType


def _t(*shape, dtype="f32") -> Value:
    return Value("x", TensorType(dtype, shape))


def _node(op: str, args: tuple, result: Value, **kwargs) -> Node:
    return Node(op, args, kwargs, result)


def _links(rule) -> set[tuple]:
    return {(ln.source.name, ln.axis, ln.result_axis, ln.mixes, ln.part, ln.result_part) for ln in rule.links}


def test_reshape_keeps_axes_with_the_same_size_and_element_count_before_them():
    x = Value("x", TensorType("f32", ("batch", 50, 64)))
    out = Value("y", TensorType("f32", ("batch", 50, 4, 16)))
    rule = axis_rule(_node("aten.view.default", (x, [-1, 50, 4, 16]), out))
    assert _links(rule) == {("x", 0, 0, False, None, None), ("x", 1, 1, False, None, None)}  # 64 was split
    merged = Value("z", TensorType("f32", ("batch*50", 64)))
    rule = axis_rule(_node("aten.view.default", (x, [-1, 64]), merged))
    assert _links(rule) == {("x", 2, 1, False, None, None)} and "merges or splits" in rule.verb


def test_softmax_and_norms_keep_the_axis_but_mix_along_it():
    x = Value("x", TensorType("f32", (2, "n", 8)))
    rule = axis_rule(_node("aten._softmax.default", (x, -1, False), Value("y", x.type)))
    assert ("x", 2, 2, True, None, None) in _links(rule) and ("x", 1, 1, False, None, None) in _links(rule)
    w = Value("w", TensorType("f32", (8,)))
    rule = axis_rule(_node("aten.layer_norm.default", (x, [8], w, w, 1e-5, False), Value("y", x.type)))
    assert ("x", 2, 2, True, None, None) in _links(rule) and ("w", 0, 2, False, None, None) in _links(rule)


def test_reductions_drop_or_keep_the_reduced_axis():
    x = Value("x", TensorType("f32", (2, "n", 8)))
    rule = axis_rule(_node("aten.mean.dim", (x, [1], True), Value("y", TensorType("f32", (2, 1, 8)))))
    assert _links(rule) == {("x", 0, 0, False, None, None), ("x", 2, 2, False, None, None)}
    assert rule.verb == "reduces over"
    rule = axis_rule(_node("aten.sum.dim_IntList", (x, [2]), Value("y", TensorType("f32", (2, "n")))))
    assert _links(rule) == {("x", 0, 0, False, None, None), ("x", 1, 1, False, None, None)}


def test_matmul_and_attention_tie_the_contracted_axes():
    a, b = Value("a", TensorType("f32", (2, "n", 8))), Value("b", TensorType("f32", (2, 8, 5)))
    rule = axis_rule(_node("aten.matmul.default", (a, b), Value("y", TensorType("f32", (2, "n", 5)))))
    assert rule.ties == [(a, 2, b, 1)]
    assert ("a", 1, 1, False, None, None) in _links(rule) and ("b", 2, 2, False, None, None) in _links(rule)
    q = Value("q", TensorType("f32", (1, 4, "n", 8)))
    k, v = Value("k", TensorType("f32", (1, 4, 16, 8))), Value("v", TensorType("f32", (1, 4, 16, 8)))
    rule = axis_rule(_node("aten.scaled_dot_product_attention.default", (q, k, v), Value("o", q.type)))
    assert _links(rule) == {("q", a, a, False, None, None) for a in range(3)}
    assert rule.ties == [(k, 2, v, 2)] and rule.verb_for(k).startswith("keys/values depend on the queries")


def test_tuple_results_link_their_parts_and_getitem_reads_them():
    x = Value("x", TensorType("f32", (1, "n", 12)))
    parts = Value("s", TupleType((TensorType("f32", (1, "n", 4)),) * 3))
    rule = axis_rule(_node("aten.split.Tensor", (x, 4, -1), parts))
    assert {(ln.axis, ln.result_axis, ln.result_part) for ln in rule.links} == \
        {(a, a, p) for a in (0, 1) for p in range(3)}
    rule = axis_rule(_node("getitem", (parts, 2), Value("g", TensorType("f32", (1, "n", 4)))))
    assert rule.links == [Link(parts, a, a, part=2) for a in range(3)]


def test_ops_without_a_rule_are_unknown():
    x = Value("x", TensorType("f32", (2, 3)))
    assert axis_rule(_node("aten.fft_fft.default", (x,), Value("y", x.type))) is None
