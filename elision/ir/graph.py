"""networkx views of IR functions, for graph algorithms (dominators, reachability, partitioning, matching)."""
from __future__ import annotations

import networkx as nx

from elision.ir.core import Function, Node, Value

INPUT = "__input__"
OUTPUT = "__output__"


def to_networkx(fn: Function) -> nx.DiGraph:
    """Directed graph with one vertex per value name; edges run from producer to consumer.

    Vertex attributes: ``op`` (``"input"`` for function inputs), ``node`` (the :class:`Node`), ``type``.
    A synthetic source ``__input__`` feeds every input and param, and ``__output__`` consumes every output,
    so dominator queries have a single entry and exit.
    """
    g = nx.DiGraph()
    g.add_node(INPUT, op="source")
    for v in fn.inputs:
        g.add_node(v.name, op="input", node=None, type=v.type)
        g.add_edge(INPUT, v.name)
    for n in fn.nodes:
        g.add_node(n.result.name, op=n.op, node=n, type=n.result.type, loc=n.loc)
        if not n.inputs:
            g.add_edge(INPUT, n.result.name)
        for i in n.inputs:
            g.add_edge(i.name, n.result.name)
    g.add_node(OUTPUT, op="sink")
    for o in fn.outputs:
        g.add_edge(o.name, OUTPUT)
    return g


def dominators(fn: Function) -> dict[str, str]:
    """Immediate dominator of each value (by name), from the synthetic input source."""
    return nx.immediate_dominators(to_networkx(fn), INPUT)


def post_dominators(fn: Function) -> dict[str, str]:
    return nx.immediate_dominators(to_networkx(fn).reverse(copy=True), OUTPUT)


def ancestors(fn: Function, v: Value) -> set[str]:
    return nx.ancestors(to_networkx(fn), v.name) - {INPUT}


def descendants(fn: Function, v: Value) -> set[str]:
    return nx.descendants(to_networkx(fn), v.name) - {OUTPUT}


def depends_on_inputs(fn: Function) -> set[Value]:
    """Values that (transitively) depend on a function input; the rest are constant per parameter set."""
    dep: set[Value] = set(fn.inputs)
    for n in fn.nodes:
        if any(i in dep for i in n.inputs):
            dep.add(n.result)
    return dep


def nodes_between(fn: Function, sources: set[Value], sink: Value) -> list[Node]:
    """Nodes on some path from any of ``sources`` to ``sink`` (inclusive of sink's producer), in order."""
    g = to_networkx(fn)
    up = nx.ancestors(g, sink.name) | {sink.name}
    down: set[str] = set()
    for s in sources:
        down |= nx.descendants(g, s.name) | {s.name}
    keep = up & down
    return [n for n in fn.nodes if n.result.name in keep]
