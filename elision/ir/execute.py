"""Executors: a reference interpreter (IR -> torch ops, one node at a time) and an emitter to ``torch.fx``."""
from __future__ import annotations

import torch
import torch.fx

from elision.ir.core import Function, IRError, Module, map_values
from elision.ir.ops import UnknownOpError, resolve_op
from elision.ir.types import TensorType


def _check_inputs(fn: Function, args: tuple) -> None:
    if len(args) != len(fn.inputs):
        names = ", ".join(v.name for v in fn.inputs)
        raise IRError(f"function @{fn.name} takes {len(fn.inputs)} inputs ({names}), got {len(args)}")
    bindings: dict[str, int] = {}
    for v, a in zip(fn.inputs, args):
        if not isinstance(v.type, TensorType):
            continue
        if not isinstance(a, torch.Tensor):
            raise IRError(f"input %{v.name} of @{fn.name} must be a tensor of type {v.type}, got {type(a).__name__}")
        if a.dim() != v.type.rank:
            raise IRError(f"input %{v.name} of @{fn.name} has rank {a.dim()} but the function expects {v.type}")
        for i, (want, got) in enumerate(zip(v.type.shape, a.shape)):
            if isinstance(want, int) and want != got:
                raise IRError(f"input %{v.name} of @{fn.name}: dimension {i} is {got}, expected {want} ({v.type})")
            if isinstance(want, str) and want.isidentifier():
                if bindings.setdefault(want, got) != got:
                    raise IRError(f"input %{v.name} of @{fn.name}: dimension {i} ({want}) is {got}, "
                                  f"but another input bound {want}={bindings[want]}")


def _resolve(fn: Function, n) -> object:
    try:
        return resolve_op(n.op)
    except UnknownOpError as e:
        raise IRError(f"@{fn.name}: %{n.result.name}: {e}") from None


def interpret(module: Module, fn_name: str = "forward", *args, check: bool = True) -> tuple:
    """Run function ``fn_name`` node by node with eager torch ops."""
    if fn_name not in module.functions:
        raise IRError(f"module has no function @{fn_name}; functions: {', '.join(module.functions)}")
    fn = module.functions[fn_name]
    if check:
        _check_inputs(fn, args)
    env = dict(zip(fn.inputs, args))
    lookup = env.__getitem__
    for n in fn.nodes:
        if n.op == "param":
            env[n.result] = module.params[n.args[0]]
            continue
        target = _resolve(fn, n)
        try:
            env[n.result] = target(*map_values(n.args, lookup), **map_values(n.kwargs, lookup))
        except Exception as e:  # point at the node and the model location
            where = f" (model location {n.loc})" if n.loc else ""
            raise IRError(f"@{fn.name}: executing %{n.result.name} = {n.op}{where} failed: {e}") from e
    return tuple(env[o] for o in fn.outputs)


class _ParamHolder(torch.nn.Module):
    pass


def to_fx(module: Module, fn_name: str = "forward") -> torch.fx.GraphModule:
    """Emit function ``fn_name`` as a ``torch.fx.GraphModule`` calling the same torch ops; returns a tuple."""
    if fn_name not in module.functions:
        raise IRError(f"module has no function @{fn_name}; functions: {', '.join(module.functions)}")
    fn = module.functions[fn_name]
    root = _ParamHolder()
    graph = torch.fx.Graph()
    env: dict = {}
    for v in fn.inputs:
        env[v] = graph.placeholder(v.name)
    attr_names: dict[str, str] = {}
    for n in fn.nodes:
        if n.op == "param":
            pname = n.args[0]
            if pname not in attr_names:
                attr = "p_" + "".join(c if c.isalnum() else "_" for c in pname)
                while hasattr(root, attr):
                    attr += "_"
                t = module.params[pname]
                if isinstance(t, torch.nn.Parameter):
                    root.register_parameter(attr, t)
                else:
                    root.register_buffer(attr, t)
                attr_names[pname] = attr
            env[n.result] = graph.get_attr(attr_names[pname])
            continue
        lookup = env.__getitem__
        fx_node = graph.call_function(_resolve(fn, n), map_values(n.args, lookup), map_values(n.kwargs, lookup))
        fx_node.name = n.result.name
        if n.loc:
            fx_node.meta["elision_loc"] = n.loc
        env[n.result] = fx_node
    graph.output(tuple(env[o] for o in fn.outputs))
    gm = torch.fx.GraphModule(root, graph, class_name=f"elision_{fn_name}")
    gm.elision_input_names = [v.name for v in fn.inputs]
    return gm
