"""Rotary tables for GroupQueryAttention, computed by running the graph's own cos/sin subgraph.

The exported graph computes the rotary `cos`/`sin` `[batch, 1, n, head_dim]` from the position ids (and constants:
`inv_freq`, attention scaling, whatever the model's rope variant needs). GroupQueryAttention instead takes tables
`[max_positions, head_dim / 2]` and gathers rows by position. Rather than recognising each rope variant, the
subgraph itself is cut out and run once in ONNX Runtime on positions `0 .. max_positions - 1`: the tables hold
exactly what the unfused graph computes at every position, whatever the formula.

The subgraph qualifies when it depends on one integer graph input (the positions) and constants only, and its
two halves along the last axis are equal (`cat(freqs, freqs)`, the non-interleaved rotary GQA implements).
"""
from __future__ import annotations

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort  # the tables must be what ONNX Runtime computes for the unfused graph

__all__ = ["RopeTables", "RopeTableError", "rope_tables"]


class RopeTableError(ValueError):
    """The cos/sin values do not come from the position ids alone, or are not a non-interleaved rotary table."""


class RopeTables:
    """`cos`/`sin` [max_positions, head_dim / 2] and the graph input holding the position ids."""

    def __init__(self, cos: np.ndarray, sin: np.ndarray, positions: ir.Value):
        self.cos, self.sin, self.positions = cos, sin, positions


def _ancestors(outputs: list[ir.Value]) -> tuple[set[ir.Node], set[ir.Value]]:
    """Nodes computing `outputs` and the leaves they read (graph inputs and initializers)."""
    nodes: set[ir.Node] = set()
    leaves: set[ir.Value] = set()
    stack = list(outputs)
    while stack:
        value = stack.pop()
        node = value.producer()
        if node is None:
            leaves.add(value)
            continue
        if node in nodes:
            continue
        nodes.add(node)
        stack.extend(v for v in node.inputs if v is not None)
    return nodes, leaves


def _subgraph_model(graph: ir.Graph, opsets: dict[str, int], position: ir.Value, outputs: list[ir.Value],
                    nodes: set[ir.Node], constants: list[ir.Value]) -> onnx.ModelProto:
    ordered = [ir.serde.serialize_node(n) for n in graph if n in nodes]  # graph order is topological
    inits = []
    for value in constants:
        # numpy first: an externally stored tensor would otherwise stay a reference to a file the session cannot see
        inits.append(onnx.numpy_helper.from_array(value.const_value.numpy(), value.name))
    proto_graph = onnx.helper.make_graph(
        ordered, "rope_tables",
        [onnx.helper.make_tensor_value_info(position.name, onnx.TensorProto.INT64, [1, None])],
        [onnx.helper.make_tensor_value_info(o.name, o.dtype.value if o.dtype else onnx.TensorProto.FLOAT, None)
         for o in outputs],
        inits)
    return onnx.helper.make_model(proto_graph, opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])


def _table(values: np.ndarray, what: str) -> np.ndarray:
    table = values.reshape(values.shape[-2], values.shape[-1]) if values.ndim >= 2 and \
        int(np.prod(values.shape[:-2])) == 1 else None
    if table is None:
        raise RopeTableError(f"rotary {what} has shape {list(values.shape)} for one sequence of positions; "
                             "expected [1, 1, positions, head_dim]")
    half = table.shape[1] // 2
    if table.shape[1] % 2 or not np.array_equal(table[:, :half], table[:, half:]):
        raise RopeTableError(f"rotary {what} is not cat(freqs, freqs): partial or interleaved rotary is not supported")
    return np.ascontiguousarray(table[:, :half])


def rope_tables(model: ir.Model, cos: ir.Value, sin: ir.Value, max_positions: int) -> RopeTables:
    """Run the subgraph computing `cos`/`sin` on positions 0 .. max_positions - 1 (see the module docstring)."""

    nodes, leaves = _ancestors([cos, sin])
    graph = model.graph
    inputs = [v for v in leaves if v.is_graph_input()]
    constants = [v for v in leaves if not v.is_graph_input()]
    missing = [v.name for v in constants if v.const_value is None]
    if len(inputs) != 1 or missing:
        found = ", ".join(v.name for v in inputs) or "no graph input"
        raise RopeTableError(f"rotary cos/sin must depend on the position ids alone; they read {found}"
                             + (f" and non-constant values {missing}" if missing else ""))
    position = inputs[0]
    if position.dtype != ir.DataType.INT64 or position.shape is None or position.shape.rank() != 2:
        raise RopeTableError(f"rotary positions come from {position.name!r}, which is not an int64 [batch, n] input")
    opsets = dict(model.opset_imports)
    proto = _subgraph_model(graph, opsets, position, [cos, sin], nodes, constants)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    feeds = {position.name: np.arange(max_positions, dtype=np.int64)[None]}
    cos_values, sin_values = session.run([cos.name, sin.name], feeds)
    return RopeTables(_table(cos_values, "cos"), _table(sin_values, "sin"), position)
