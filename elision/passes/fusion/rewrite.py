"""What the fusion passes share: a fresh model map per function, node insertion, parameter reads placed before
their first use, the record of what was left alone and why, and the final clean-up."""
from __future__ import annotations

from elision.analysis.cache import analyses
from elision.analysis.model_map import ModelMap, build_model_map
from elision.ir.core import Function, Module, Node, Value
from elision.passes.classic.dce import eliminate_dead_code, remove_unused_params

FLOAT_DTYPES = ("f32", "f16", "bf16", "f64")


def record_skip(module: Module, msg: str) -> None:
    """Note in ``module.attrs["fusion_skipped"]`` why a candidate was left alone (each reason once)."""
    module.attrs.setdefault("fusion_skipped", [])
    if msg not in module.attrs["fusion_skipped"]:
        module.attrs["fusion_skipped"].append(msg)


def fresh_map(module: Module, fn: Function) -> ModelMap:
    # the graph may have been changed by an earlier rewrite in the same pass: never use a stale map
    analyses().invalidate()
    return build_model_map(module, fn.name)


def insert_node(fn: Function, op: str, args: tuple, kwargs: dict | None, ty, loc: str, before: Node,
                hint: str) -> Node:
    n = Node(op, tuple(args), dict(kwargs or {}), fn.new_value(ty, hint), loc)
    fn.insert_before(before, [n])
    return n


def first_use(fn: Function, values: list[Value]) -> Node:
    vs = set(values)
    for n in fn.nodes:
        if vs & set(n.inputs):
            return n
    raise AssertionError("value without users")


def param_before(fn: Function, name: str, anchor: Node) -> Value:
    """A value reading parameter ``name`` that is defined before ``anchor``.

    An existing read is reused; when it sits after ``anchor`` (constant folding turns a computed weight such as
    Gemma's ``1 + w`` into a parameter read where the computation was) it moves up: a param node has no inputs,
    so it can be defined anywhere earlier.
    """
    v = fn.param(name, before=anchor)
    node = fn.producer(v)
    if fn.index(node) > fn.index(anchor):
        fn.remove(node)
        fn.insert_before(anchor, [node])
    return v


def clean_up(module: Module) -> None:
    for f in module.functions.values():
        eliminate_dead_code(f)
    remove_unused_params(module)
