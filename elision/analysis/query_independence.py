"""Query-independence analysis and invariant hoisting on traced (aten-level FX) field decoders.

`query_independence(gm, query_input, query_dim)` proves that a decoder treats query points
independently: it tracks, for every value, which of its dims carries the query axis, and fails at any op
that mixes values along it (reductions, softmax/norms over it, matmul/attention contracting over it,
sort/topk/cumsum/index/cat/slice along it, reshapes that merge it with another non-unit axis, and any
op it does not know). Evaluating any subset of query points is legal iff the proof holds and the
output carries the query axis.

`split_invariants(gm, query_input)` is hoist-invariants on the same graph: every node that does not
depend on the query input is moved into a `latents_side` graph computed once per shape; the rest is a
`field_chunk` graph that takes the query points plus the hoisted values. Works on torch.export graphs
and on elision IR through `elision.ir.to_fx`.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

# elementwise ops: output dims broadcast from the inputs (right-aligned)
_ELEMENTWISE = {
    "add", "sub", "mul", "div", "neg", "sin", "cos", "exp", "log", "tanh", "sigmoid", "relu", "gelu", "silu",
    "pow", "sqrt", "rsqrt", "abs", "clamp", "clamp_min", "clamp_max", "where", "erf", "to", "_to_copy",
    "type_as", "reciprocal", "square", "maximum", "minimum", "sign", "clone", "contiguous", "alias",
    "detach", "lift_fresh_copy", "dropout", "gt", "lt", "ge", "le", "eq", "ne", "logical_not", "masked_fill",
    "rsub", "hardtanh", "leaky_relu", "softplus", "mish", "elu", "copy", "_assert_tensor_metadata",
}
_REDUCTIONS = {"sum", "mean", "amax", "amin", "max", "min", "var", "std", "prod", "logsumexp", "norm",
               "var_mean", "linalg_vector_norm", "any", "all", "argmax", "argmin"}
_MIX_ALONG_DIM = {"softmax", "_softmax", "log_softmax", "_log_softmax", "cumsum", "cumprod", "sort", "topk",
                  "argsort", "flip", "roll", "cummax", "cummin", "kthvalue", "median"}


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
    query_dims: dict[str, int | None] = field(default_factory=dict)  # node -> query dim (None: invariant)
    invariant_nodes: list[str] = field(default_factory=list)

    def explain(self) -> str:
        if self.ok:
            return f"query-independent; {len(self.invariant_nodes)} query-invariant nodes can be hoisted"
        return "not query-independent:\n  " + "\n  ".join(str(v) for v in self.violations)


def _opname(node: fx.Node) -> str:
    t = node.target
    if t is operator.getitem or t == "getitem":
        return "getitem"
    if isinstance(t, str):  # elision IR op names: "aten.linear.default", "elision.attention.default"
        parts = t.split(".")
        return parts[1] if len(parts) >= 2 and parts[0] in ("aten", "elision", "prims") else parts[-1]
    name = getattr(t, "__name__", str(t))
    # aten.linear.default -> "linear"; OpOverload names look like "linear.default"
    if hasattr(t, "_schema"):
        name = t._schema.name.split("::")[-1]
    return name.split(".")[0]


def _loc(node: fx.Node) -> str:
    if node.meta.get("loc"):
        return str(node.meta["loc"])
    stack = node.meta.get("nn_module_stack")
    if stack:
        return list(stack.values())[-1][0]
    return str(node.meta.get("loc", ""))


def _shape(x: Any) -> tuple | None:
    meta = getattr(x, "meta", None)
    if not isinstance(meta, dict):
        return None
    if "shape" in meta:  # IR view: static or symbolic (string) dims
        return meta["shape"]
    v = meta.get("val")
    if isinstance(v, torch.Tensor):
        return tuple(v.shape)
    return None


def _norm_dim(d: int, ndim: int) -> int:
    return d + ndim if d < 0 else d


def _as_dims(arg: Any, ndim: int) -> list[int]:
    if arg is None:
        return list(range(ndim))
    if isinstance(arg, int):
        return [_norm_dim(arg, ndim)]
    return [_norm_dim(int(a), ndim) for a in arg]


def _is_one(s: Any) -> bool:
    try:
        return int(s) == 1
    except (TypeError, ValueError):
        return False


def _reshape_map(in_shape: tuple, out_shape: tuple, qd: int) -> int | None:
    """Output dim that holds exactly the input query dim, or None if the reshape merges/splits it.

    Dims of size 1 may be merged freely; the query dim must keep its size and the product of the
    non-unit sizes before it must be equal.
    """
    before_in = [s for s in in_shape[:qd] if not _is_one(s)]
    for j, s in enumerate(out_shape):
        if str(s) != str(in_shape[qd]):
            continue
        before_out = [t for t in out_shape[:j] if not _is_one(t)]
        if [str(a) for a in before_in] == [str(b) for b in before_out]:
            return j
    return None


def query_independence(gm: fx.GraphModule, query_input: int = 0, query_dim: int = 1,
                       output_index: int = 0) -> QueryIndependenceReport:
    """Prove per-query independence of `gm`'s output `output_index` w.r.t. placeholder `query_input`."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    user_inputs = [n for n in placeholders if not (n.name.startswith("p_") or n.name.startswith("b_")
                                                   or n.name.startswith("c_"))]
    if query_input >= len(user_inputs):
        raise ValueError(f"query_input {query_input} out of range: graph has {len(user_inputs)} user inputs")
    qdims: dict[fx.Node, Any] = {}
    violations: list[Violation] = []
    qdims[user_inputs[query_input]] = query_dim

    def fail(n: fx.Node, why: str) -> None:
        violations.append(Violation(n.name, _opname(n), why, _loc(n)))
        qdims[n] = "bad"

    for n in gm.graph.nodes:
        if n.op in ("placeholder", "get_attr"):
            qdims.setdefault(n, None)
            continue
        if n.op == "output":
            continue
        ins = [a for a in n.all_input_nodes]
        carried = {a: qdims.get(a) for a in ins if qdims.get(a) is not None}
        if any(v == "bad" for v in carried.values()):
            qdims[n] = "bad"  # already reported upstream
            continue
        if not carried:
            qdims[n] = None
            continue
        op = _opname(n)
        val = n.meta.get("val")
        if op == "sym_size" or n.meta.get("scalar") or isinstance(val, (torch.SymInt, int, float, bool)):
            qdims[n] = None  # a size or scalar: shape information, not per-query data
            continue
        out_shape = _shape(n)
        a0 = n.args[0] if n.args else None
        known0 = a0 is not None and not isinstance(a0, (list, tuple, dict, slice)) and a0 in qdims
        q0 = qdims.get(a0) if known0 else None
        in0 = _shape(a0) if known0 else None

        if op == "getitem":
            src = n.args[0]
            v = qdims.get(src)
            qdims[n] = v[n.args[1]] if isinstance(v, tuple) else v
        elif op in _ELEMENTWISE:
            if out_shape is None:
                fail(n, "unknown output shape")
                continue
            dims = set()
            for a, d in carried.items():
                sa = _shape(a)
                if sa is None:
                    continue
                dims.add(d + len(out_shape) - len(sa))
            if len(dims) != 1:
                fail(n, f"inputs carry the query axis in different dims {sorted(dims)}")
            else:
                qdims[n] = dims.pop()
        elif op in ("linear",):
            if q0 is None or len(carried) > 1 or q0 == len(in0) - 1:
                fail(n, "contracts over the query axis (weights depend on queries or query axis is the "
                        "feature dim)")
            else:
                qdims[n] = q0
        elif op in ("layer_norm", "native_layer_norm", "rms_norm", "group_norm"):
            norm = n.args[1]
            k = len(norm) if isinstance(norm, (list, tuple)) else 1
            if q0 is None or q0 >= len(in0) - k or len(carried) > 1:
                fail(n, "normalises over the query axis")
            else:
                qdims[n] = (q0, None, None) if op == "native_layer_norm" else q0
        elif op in _REDUCTIONS:
            dims = _as_dims(n.args[1] if len(n.args) > 1 else n.kwargs.get("dim"), len(in0))
            keep = bool(n.args[2]) if len(n.args) > 2 else bool(n.kwargs.get("keepdim", False))
            if q0 in dims:
                fail(n, "reduces over the query axis")
            else:
                qdims[n] = q0 if keep else q0 - sum(1 for d in dims if d < q0)
        elif op in _MIX_ALONG_DIM:
            d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", -1)
            if op in ("sort", "topk", "argsort", "kthvalue", "median") and len(n.args) > 2 and op == "topk":
                d = n.args[2] if len(n.args) > 2 else -1
            dims = _as_dims(d, len(in0))
            if q0 in dims:
                fail(n, f"{op} mixes values along the query axis")
            else:
                qdims[n] = (q0, q0) if op in ("sort", "topk", "kthvalue", "median", "cummax", "cummin") else q0
        elif op in ("view", "reshape", "_unsafe_view"):
            j = _reshape_map(in0, out_shape, q0) if (in0 and out_shape) else None
            if j is None:
                fail(n, f"reshape {list(in0 or [])} -> {list(out_shape or [])} merges the query axis with "
                        "another axis")
            else:
                qdims[n] = j
        elif op in ("flatten",):
            start = _norm_dim(n.args[1] if len(n.args) > 1 else 0, len(in0))
            end = _norm_dim(n.args[2] if len(n.args) > 2 else -1, len(in0))
            if start <= q0 <= end and any(not _is_one(in0[d]) for d in range(start, end + 1) if d != q0):
                fail(n, "flatten merges the query axis with another axis")
            else:
                qdims[n] = q0 if q0 < start else start if q0 <= end else q0 - (end - start)
        elif op in ("permute",):
            perm = [_norm_dim(p, len(in0)) for p in n.args[1]]
            qdims[n] = perm.index(q0)
        elif op in ("transpose",):
            d0, d1 = _norm_dim(n.args[1], len(in0)), _norm_dim(n.args[2], len(in0))
            qdims[n] = d1 if q0 == d0 else d0 if q0 == d1 else q0
        elif op in ("t",):
            qdims[n] = 1 - q0
        elif op in ("unsqueeze",):
            d = _norm_dim(n.args[1], len(in0) + 1)
            qdims[n] = q0 + 1 if d <= q0 else q0
        elif op in ("squeeze",):
            dims = _as_dims(n.args[1] if len(n.args) > 1 else None, len(in0))
            dims = [d for d in dims if _is_one(in0[d])]
            if q0 in dims and not _is_one(in0[q0]):
                fail(n, "squeezes the query axis")
            else:
                qdims[n] = q0 - sum(1 for d in dims if d < q0)
        elif op in ("expand", "expand_as"):
            qdims[n] = q0 + (len(out_shape) - len(in0)) if out_shape else q0
        elif op in ("split", "split_with_sizes", "chunk", "unbind", "tensor_split"):
            d = _norm_dim(n.args[2] if len(n.args) > 2 else n.kwargs.get("dim", 0), len(in0))
            if d == q0:
                fail(n, f"{op} splits the query axis")
            else:
                outs = n.meta.get("val")
                cnt = len(outs) if isinstance(outs, (list, tuple)) else 1
                qdims[n] = tuple([q0] * cnt)
        elif op in ("slice", "select", "narrow", "index_select", "gather", "index", "take", "scatter"):
            d = _norm_dim(n.args[1] if len(n.args) > 1 and isinstance(n.args[1], int) else 0, len(in0))
            if op in ("index", "take", "gather", "scatter") or d == q0 or len(carried) > 1:
                fail(n, f"{op} indexes along the query axis")
            else:
                sliced = _shape(n)
                qdims[n] = q0 - (1 if op == "select" and d < q0 else 0) if sliced is not None else q0
        elif op in ("cat", "stack", "concat"):
            tensors = n.args[0]
            d = n.args[1] if len(n.args) > 1 else n.kwargs.get("dim", 0)
            nd = len(_shape(tensors[0]) or ())
            d = _norm_dim(d, nd + (1 if op == "stack" else 0))
            qs = {qdims.get(t) for t in tensors}
            if len(qs) != 1 or None in qs:
                fail(n, f"{op} combines query-dependent and query-invariant tensors")
            else:
                q = qs.pop()
                if op == "cat" and d == q:
                    fail(n, "concatenates along the query axis")
                else:
                    qdims[n] = q + 1 if op == "stack" and d <= q else q
        elif op in ("matmul", "bmm", "mm"):
            a, b = n.args[0], n.args[1]
            qa, qb = qdims.get(a), qdims.get(b)
            sa, sb = _shape(a), _shape(b)
            if qb is not None and qb == len(sb) - 2 or qa is not None and qa == len(sa) - 1:
                fail(n, "matmul contracts over the query axis")
            elif qa is not None and qb is not None:
                fail(n, "both matmul operands depend on the queries (query-query interaction)")
            elif qa is not None:
                qdims[n] = qa + len(out_shape) - len(sa)
            else:
                qdims[n] = len(out_shape) - 1 if qb == len(sb) - 1 else qb + len(out_shape) - len(sb)
        elif op in ("scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
                    "_scaled_dot_product_attention_math", "_scaled_dot_product_flash_attention",
                    "_scaled_dot_product_efficient_attention", "attention", "sparse_cross_attention"):
            q, k, v = n.args[0], n.args[1], n.args[2]
            if qdims.get(k) is not None or qdims.get(v) is not None:
                fail(n, "keys/values depend on the queries (attention mixes along the query axis)")
            elif qdims.get(q) != len(_shape(q)) - 2:
                fail(n, "the query axis is not the attention's sequence axis")
            else:
                base = qdims.get(q)
                qdims[n] = (base, base) if op.startswith("_scaled") else base
        else:
            fail(n, f"op {op!r} is not known to preserve per-query independence")

    out_node = next(n for n in gm.graph.nodes if n.op == "output")
    outs = out_node.args[0]
    out = outs[output_index] if isinstance(outs, (list, tuple)) else outs
    if not violations and qdims.get(out) is None:
        violations.append(Violation(out.name, "output", "the output does not depend on the query points"))
    invariant = [n.name for n in gm.graph.nodes if n.op == "call_function" and qdims.get(n) is None]
    return QueryIndependenceReport(ok=not violations, violations=violations,
                                   query_dims={n.name: (v if isinstance(v, int) else None)
                                               for n, v in qdims.items()},
                                   invariant_nodes=invariant)


def export_field(model: torch.nn.Module, example_inputs: tuple, dynamic_queries: bool = True
                 ) -> torch.export.ExportedProgram:
    """torch.export (non-strict) with the query count dynamic; sdpa/linear stay whole."""
    n = torch.export.Dim("queries", min=2, max=2 ** 24)
    dyn = ({1: n}, None) if dynamic_queries else None
    with torch.no_grad():
        ep = torch.export.export(model.eval(), example_inputs, dynamic_shapes=dyn, strict=False)
    return ep


def check_query_independent(model: torch.nn.Module, example_inputs: tuple) -> QueryIndependenceReport:
    ep = export_field(model, example_inputs)
    return query_independence(ep.graph_module, query_input=0, query_dim=1)


def _cache_key(model: torch.nn.Module) -> str | None:
    cfg = getattr(model, "config", None)
    to_json = getattr(cfg, "to_json", None)
    if to_json is None:
        return None  # unknown architecture identity: always re-prove
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}|{to_json()}|torch {torch.__version__}"


def cached_query_independence(model: torch.nn.Module, example_inputs: tuple) -> QueryIndependenceReport:
    """The proof depends on the architecture (class + config), not the weights: cache verdicts on disk
    (~/.cache/elision/query_independence.json); failures are never cached."""
    import json
    import os
    from pathlib import Path
    key = _cache_key(model)
    path = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "elision" / "query_independence.json"
    cache: dict = {}
    if key is not None and path.is_file():
        try:
            cache = json.loads(path.read_text())
        except (OSError, ValueError):
            cache = {}
        if cache.get(key, {}).get("ok"):
            return QueryIndependenceReport(ok=True, invariant_nodes=cache[key]["invariant_nodes"])
    report = check_query_independent(model, example_inputs)
    if key is not None and report.ok:
        cache[key] = {"ok": True, "invariant_nodes": report.invariant_nodes}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(cache))
        except OSError:
            pass
    return report


# ------------------------------------------------------------------------------------ hoisting

@dataclass
class SplitField:
    latents_side: fx.GraphModule   # (latents) -> hoisted values
    field_chunk: fx.GraphModule    # (points, *hoisted) -> outputs
    hoisted: list[str]


def split_invariants(ep: torch.export.ExportedProgram, query_input: int = 0) -> SplitField:
    """Hoist every node that does not depend on the query input into a separate once-per-shape graph."""
    gm = ep.module()  # parameters become attributes, inputs are the user inputs
    graph = gm.graph
    inputs = [n for n in graph.nodes if n.op == "placeholder"]
    qnode = inputs[query_input]
    dep: set[fx.Node] = {qnode}
    for n in graph.nodes:
        if any(a in dep for a in n.all_input_nodes):
            dep.add(n)
    # Values computed without the query input but consumed by query-dependent nodes cross the split.
    crossing = []
    for n in graph.nodes:
        if n in dep or n.op == "output" or n.op == "get_attr":
            continue
        if n.op == "placeholder" and n is qnode:
            continue
        if any(u in dep and u.op != "output" for u in n.users):
            crossing.append(n)
    # latents side: copy all non-dependent nodes, output the crossing values
    lat_g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in graph.nodes:
        if n.op == "placeholder" and n is not qnode:
            env[n] = lat_g.placeholder(n.name)
        elif n.op in ("call_function", "call_method", "get_attr", "call_module") and n not in dep:
            env[n] = lat_g.node_copy(n, lambda a: env[a])
    lat_g.output(tuple(env[c] for c in crossing))
    # field chunk: points + crossing values as inputs
    fc_g = fx.Graph()
    env2: dict[fx.Node, fx.Node] = {qnode: fc_g.placeholder(qnode.name)}
    for c in crossing:
        env2[c] = fc_g.placeholder(f"hoisted_{c.name}")
    for n in graph.nodes:
        if n in dep and n is not qnode and n.op != "output":
            env2[n] = fc_g.node_copy(n, lambda a: env2[a] if a in env2 else _attr(fc_g, a, env2))
        elif n.op == "output":
            fc_g.output(fx.map_arg(n.args[0], lambda a: env2[a]))

    return SplitField(fx.GraphModule(gm, lat_g), fx.GraphModule(gm, fc_g), [c.name for c in crossing])


def _attr(g: fx.Graph, a: fx.Node, env: dict) -> fx.Node:
    if a.op == "get_attr":
        env[a] = g.get_attr(a.target)
        return env[a]
    raise KeyError(a.name)
