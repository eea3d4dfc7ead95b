"""Import FX graphs (from torch.export or Dynamo) into the IR."""
from __future__ import annotations

import re

import sympy
import torch
import torch.fx
from torch.export.graph_signature import InputKind

from elision.errors import UnsupportedOpError
from elision.ir.core import Function, Module, Node, Value
from elision.ir.ops import UnknownOpError, op_name
from elision.ir.shape_infer import type_of
from elision.ir.symbolic import from_sympy, to_sympy
from elision.ir.types import NONE, ScalarType, TensorType, TupleType, Type


def _loc_of(node: torch.fx.Node, strip_prefix: str) -> str:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return ""
    path = list(stack.values())[-1][0]
    if path.startswith("_empty_nn_module_stack"):
        return ""
    # dynamo spells paths like L['self'].layers[0].mlp or L__self___layers_0
    path = re.sub(r"^L\['self'\]\.?", "", path)
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = re.sub(r"\['([^']+)'\]", r".\1", path)
    if strip_prefix and (path == strip_prefix.rstrip(".") or path.startswith(strip_prefix)):
        path = path[len(strip_prefix):]
    return path


def _rename(ty: Type, subs: dict) -> Type:
    if not subs:
        return ty

    def fix(d):
        if isinstance(d, int):
            return d
        return from_sympy(to_sympy(d).subs(subs))

    if isinstance(ty, TensorType):
        return TensorType(ty.dtype, tuple(fix(d) for d in ty.shape))
    if isinstance(ty, ScalarType) and ty.expr is not None:
        return ScalarType(ty.kind, str(fix(int(ty.expr) if ty.expr.lstrip("-").isdigit() else ty.expr)))
    if isinstance(ty, TupleType):
        return TupleType(tuple(_rename(e, subs) for e in ty.elems))
    return ty


def _val_type(node: torch.fx.Node) -> Type:
    if "val" in node.meta:
        return type_of(node.meta["val"])
    if "example_value" in node.meta:
        return type_of(node.meta["example_value"])
    if "tensor_meta" in node.meta:
        tm = node.meta["tensor_meta"]
        return TensorType(type_of(torch.empty(0, dtype=tm.dtype)).dtype, tuple(tm.shape))
    return NONE


def import_graph(
    graph: torch.fx.Graph,
    *,
    fn_name: str,
    param_placeholders: dict[str, str],
    input_names: list[str] | None = None,
    symbol_names: dict[str, str] | None = None,
    strip_prefix: str = "",
    get_attr_names: dict[str, str] | None = None,
) -> Function:
    """Translate an FX graph whose call_function targets are torch ops into an IR function.

    ``param_placeholders`` maps placeholder names that are lifted parameters/buffers to parameter names;
    ``symbol_names`` renames sympy symbols (``s23`` -> ``batch``); ``get_attr_names`` maps get_attr targets
    to parameter names (Dynamo graphs).
    """
    subs = {sympy.Symbol(k, integer=True, positive=True): sympy.Symbol(v, integer=True, positive=True)
            for k, v in (symbol_names or {}).items()}
    subs.update({sympy.Symbol(k): sympy.Symbol(v, integer=True, positive=True) for k, v in (symbol_names or {}).items()})
    env: dict[torch.fx.Node, object] = {}
    inputs: list[Value] = []
    nodes: list[Node] = []
    outputs: list[Value] = []
    user_idx = 0
    used_names: set[str] = set()

    def fresh(name: str) -> str:
        name = re.sub(r"\W", "_", name)
        base, i = name, 1
        while name in used_names:
            name, i = f"{base}_{i}", i + 1
        used_names.add(name)
        return name

    for n in graph.nodes:
        if n.op == "placeholder":
            if n.name in param_placeholders:
                pname = param_placeholders[n.name]
                v = Value(fresh("p_" + pname), _rename(_val_type(n), subs))
                nodes.append(Node("param", (pname,), {}, v, ""))
            else:
                name = input_names[user_idx] if input_names and user_idx < len(input_names) else n.name
                user_idx += 1
                v = Value(fresh(name), _rename(_val_type(n), subs))
                inputs.append(v)
            env[n] = v
        elif n.op == "get_attr":
            pname = (get_attr_names or {}).get(n.target, n.target)
            v = Value(fresh(n.name), _rename(_val_type(n), subs))
            nodes.append(Node("param", (pname,), {}, v, ""))
            env[n] = v
        elif n.op == "call_function":
            loc = _loc_of(n, strip_prefix)
            try:
                op = op_name(n.target)
            except UnknownOpError as e:
                where = f" at model location '{loc}'" if loc else ""
                raise UnsupportedOpError(
                    f"unsupported op {e.args[0]}{where} (graph node {n.name}): the elision IR represents torch ops "
                    f"(aten.*, elision.*) and Python operators; rewrite that part of the model with torch ops, or "
                    f"use a torch.compile backend fallback"
                ) from None
            lookup = env.__getitem__
            args = _map_fx(n.args, lookup)
            kwargs = _map_fx(dict(n.kwargs), lookup)
            v = Value(fresh(n.name), _rename(_val_type(n), subs))
            nodes.append(Node(op, tuple(args), dict(kwargs), v, loc))
            env[n] = v
        elif n.op == "output":
            flat = n.args[0]
            if isinstance(flat, torch.fx.Node):
                flat = (flat,)
            for o in torch.utils._pytree.tree_leaves(flat):
                if isinstance(o, torch.fx.Node):
                    outputs.append(env[o])
                elif o is not None:
                    raise UnsupportedOpError(f"graph output {o!r} is a constant; only tensor outputs are supported")
        else:
            raise UnsupportedOpError(
                f"FX node {n.name} has kind {n.op!r} ({n.target}); import a graph of torch ops "
                f"(torch.export or make_fx output), not a module-level graph"
            )
    return Function(fn_name, inputs, nodes, outputs)


def _map_fx(obj, lookup):
    if isinstance(obj, torch.fx.Node):
        return lookup(obj)
    if isinstance(obj, (list, tuple)):
        out = [_map_fx(o, lookup) for o in obj]
        return out if isinstance(obj, list) else tuple(out)
    if isinstance(obj, dict):
        return {k: _map_fx(v, lookup) for k, v in obj.items()}
    if isinstance(obj, (slice, type(...))):
        raise UnsupportedOpError(f"argument {obj!r} cannot be represented in the IR")
    return obj


def import_exported_program(ep: "torch.export.ExportedProgram", *, fn_name: str = "forward",
                            input_names: list[str] | None = None, symbol_names: dict[str, str] | None = None,
                            strip_prefix: str = "") -> Module:
    sig = ep.graph_signature
    param_placeholders: dict[str, str] = {}
    params: dict[str, torch.Tensor] = {}
    for spec in sig.input_specs:
        if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER, InputKind.CONSTANT_TENSOR):
            target = spec.target
            pname = target[len(strip_prefix):] if strip_prefix and target.startswith(strip_prefix) else target
            param_placeholders[spec.arg.name] = pname
            t = ep.state_dict[target] if target in ep.state_dict else ep.constants[target]
            params[pname] = t.detach()
        elif spec.kind != InputKind.USER_INPUT:
            raise UnsupportedOpError(f"exported program input {spec.arg.name} has kind {spec.kind.name}; "
                                     f"only parameters, buffers, constants and user inputs are supported")
    fn = import_graph(ep.graph, fn_name=fn_name, param_placeholders=param_placeholders, input_names=input_names,
                      symbol_names=symbol_names, strip_prefix=strip_prefix)
    return Module({fn_name: fn}, params)
