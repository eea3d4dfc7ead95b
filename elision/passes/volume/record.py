"""What the volume passes record in a module, for each other and for the coarse-to-fine decoding driver.

Everything lives in ``module.attrs["runtime.volume"]``: a ``runtime.*`` attribute, so an ONNX artifact carries it in
its runtime settings and a driver can run the artifact without the IR.

  field        {function, query_input, query_dim}: the function mapping query points to field values
  query_independent   {function, invariant_nodes}                                  query-independence
  split        {function, prepare, evaluate, state: [hoisted value names]}           hoist-invariants
  sparse       the sparse-volume options (levels, band, dilation, iso)              sparse-volume
  adaptive_kv  the adaptive-kv options + {query_heads, evaluate_gathered, keys, values, scale, tokens}
                                                                                     adaptive-kv
  functions    name -> {inputs: [names], outputs: [names], query: name of the query-points input}
"""
from __future__ import annotations

from dataclasses import dataclass

from elision.errors import PassError
from elision.ir.core import Function, Module
from elision.ir.types import TensorType

VOLUME_ATTR = "runtime.volume"


@dataclass(frozen=True)
class FieldOptions:
    """Options of the passes that name the field: the function mapping query points to field values, and which of
    its inputs holds the points."""

    function: str = "forward"
    query_input: int = 0


def volume_record(module: Module) -> dict:
    return module.attrs.setdefault(VOLUME_ATTR, {})


def record_function(module: Module, fn: Function, query: str | None) -> None:
    """Record `fn`'s signature (input and output value names, which input takes the query points)."""
    volume_record(module).setdefault("functions", {})[fn.name] = {
        "inputs": [v.name for v in fn.inputs], "outputs": [v.name for v in fn.outputs], "query": query}


def field_function(module: Module, pass_name: str, function: str | None = None, query_input: int = 0,
                   query_dim: int = 1) -> tuple[Function, int, int]:
    """(function, query input index, query axis) of the field: `function` (None: the one a pass named before, else
    @forward) itself, or -- once hoist-invariants split it -- its query side @evaluate, whose first input is the query
    points (what @prepare computes does not read them, so the proof of the query side is the proof of the whole)."""
    rec = volume_record(module)
    field = rec.get("field")
    if function is None:
        function = field["function"] if field is not None else "forward"
        if field is not None:
            query_input, query_dim = field["query_input"], field["query_dim"]
    if function in module.functions:
        fn = module.functions[function]
        if not 0 <= query_input < len(fn.inputs):
            raise PassError(f"{pass_name}: query_input {query_input} out of range: @{function} has "
                            f"{len(fn.inputs)} inputs")
        rec["field"] = {"function": function, "query_input": query_input, "query_dim": query_dim}
        return fn, query_input, query_dim
    split = rec.get("split")
    if split is not None and split["function"] == function:
        return module.functions[split["evaluate"]], 0, query_dim
    raise PassError(f"{pass_name}: the module has no function @{function}; functions: {', '.join(module.functions)}")


def check_one_value_per_query(fn: Function, query_input: int, query_dim: int, pass_name: str) -> None:
    """The driver's contract: query points [1, N, 3] (N dynamic) in, one value per point out ([1, N] or [1, N, 1])."""
    q, out = fn.inputs[query_input], fn.outputs[0]
    qt, ot = q.type, out.type
    if not (isinstance(qt, TensorType) and qt.rank == 3 and query_dim == 1 and qt.shape[0] == 1 and qt.shape[2] == 3
            and isinstance(qt.shape[1], str)):
        raise PassError(f"{pass_name}: @{fn.name} must take the query points as [1, N, 3] with N dynamic (input "
                        f"%{q.name} is {qt}, query axis {query_dim}); trace the decoder with the query count dynamic")
    if not (isinstance(ot, TensorType) and qt.shape[1] in ot.shape
            and all(d == 1 for d in ot.shape if d != qt.shape[1])):
        raise PassError(f"{pass_name}: @{fn.name} must return one value per query point ([1, N]), "
                        f"but returns %{out.name} : {ot}")
