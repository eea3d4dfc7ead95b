"""Trace a model with torch.export (or take Dynamo's graph) and import it into the IR."""
from __future__ import annotations

import hashlib
import inspect
import re
from typing import Any

import torch
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.export import Dim
from torch.fx.experimental.proxy_tensor import make_fx

from elision.errors import ExportError, UnsupportedOpError
from elision.frontend.fx_import import import_exported_program, import_graph
from elision.frontend.model_spec import _input_names
from elision.ir.core import Module

WRAPPED = "inner"


class _Traceable(torch.nn.Module):
    """Calls the user model positionally and returns a flat tuple of tensors.

    Hugging Face models are called with ``use_cache=False`` (no cache objects in the graph) and return their
    primary output (logits / last hidden state)."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        setattr(self, WRAPPED, model)
        self._hf = hasattr(model, "config") and hasattr(model, "can_generate")
        try:
            self._use_cache = "use_cache" in inspect.signature(model.forward).parameters
        except (TypeError, ValueError):
            self._use_cache = False

    def forward(self, *args):
        model = getattr(self, WRAPPED)
        out = model(*args, use_cache=False) if (self._hf and self._use_cache) else model(*args)
        if self._hf and not isinstance(out, torch.Tensor):
            return (out[0],)
        return tuple(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def _dynamic_shapes(example_inputs: tuple, dynamic_dims: dict | None):
    if not dynamic_dims:
        return None, {}

    dims: dict[str, Any] = {}
    spec = []
    for i, x in enumerate(example_inputs):
        want = dynamic_dims.get(i) or dynamic_dims.get(str(i)) or {}
        d = {}
        for axis, name in want.items():
            axis = int(axis)
            if not isinstance(x, torch.Tensor) or axis >= x.dim():
                raise ExportError(f"dynamic dim {name!r} names axis {axis} of input {i}, which has shape "
                                  f"{tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__}")
            if x.shape[axis] < 2:
                raise ExportError(f"example input {i} has size {x.shape[axis]} on dynamic axis {axis} ({name}); "
                                  f"use an example of size >= 2 so torch.export does not specialize it")
            # Dim.DYNAMIC lets export infer the valid range (e.g. seq <= max_position_embeddings) instead of
            # failing on a guessed one; names are attached after export from the placeholders' symbols.
            dims.setdefault(name, Dim.DYNAMIC)
            d[axis] = dims[name]
        spec.append(d or None)
    return tuple(spec), dims


def export_to_ir(model: torch.nn.Module, example_inputs: tuple, dynamic_dims: dict | None = None,
                 fn_name: str = "forward", input_names: list[str] | None = None) -> Module:
    """Trace ``model`` with torch.export (non-strict) and import it as IR function ``fn_name``.

    Decompositions are minimal (functional inference IR) so ``scaled_dot_product_attention``, ``linear`` and
    elision's own ops stay whole. Requested dynamic dims are checked to be still symbolic after export.
    """
    example_inputs = tuple(example_inputs)
    wrapper = _Traceable(model).eval()
    dyn, _ = _dynamic_shapes(example_inputs, dynamic_dims)
    try:
        with torch.no_grad():
            ep = torch.export.export(wrapper, example_inputs, dynamic_shapes=(dyn,) if dyn is not None else None, strict=False)
            ep = ep.run_decompositions({})
    except UnsupportedOpError:
        raise
    except Exception as e:
        special = _specialization_message(str(e), dynamic_dims or {})
        if special:
            raise ExportError(special) from e
        msg = str(e).strip().splitlines()
        head = " ".join(msg[:6])[:1500]
        raise ExportError(f"torch.export failed on {type(model).__name__}: {head}") from e

    # map export's symbols (s23) to the user's names (batch), and check nothing was specialized
    symbol_names: dict[str, str] = {}
    user_phs = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name in
                {s.arg.name for s in ep.graph_signature.input_specs if s.kind.name == "USER_INPUT"}]
    for i, ph in enumerate(user_phs):
        want = (dynamic_dims or {}).get(i) or {}
        val = ph.meta.get("val")
        for axis, name in want.items():
            size = val.shape[int(axis)]
            if isinstance(size, int):
                raise ExportError(f"dimension {name!r} (axis {axis} of input {i}) was specialized to {size} during "
                                  f"export: the model's code treats it as a constant; pass a different example size "
                                  f"or remove {name!r} from dynamic_dims")
            expr = size.node.expr
            if expr.is_Symbol:
                symbol_names.setdefault(expr.name, name)
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        if getattr(sym, "name", None) in symbol_names:
            lo, hi = vr.lower, vr.upper
            finite = lambda b: b.is_Integer  # noqa: E731  (int_oo is not)
            ranges[symbol_names[sym.name]] = [int(lo) if finite(lo) else None, int(hi) if finite(hi) else None]
    if input_names is None:
        input_names = _input_names(model, len(example_inputs))
    module = import_exported_program(ep, fn_name=fn_name, input_names=input_names, symbol_names=symbol_names,
                                     strip_prefix=WRAPPED + ".")
    module.attrs.update({
        "source_model": type(model).__name__,
        "inputs": list(input_names),
        "dynamic_dims": {str(k): {str(a): n for a, n in v.items()} for k, v in (dynamic_dims or {}).items()},
        "dim_ranges": ranges,
    })
    return module


def _specialization_message(text: str, dynamic_dims: dict) -> str | None:
    """Turn export's 'you marked L['args'][0].size()[1] as dynamic but ... constant (2)' into dim names."""
    m = re.search(r"L\['args'\]\[(\d+)\]\.size\(\)\[(\d+)\] as dynamic but your code specialized it to be a constant \((\d+)\)", text)
    if not m:
        return None
    i, axis, value = int(m.group(1)), int(m.group(2)), int(m.group(3))
    name = ((dynamic_dims.get(i) or {}).get(axis)) or f"axis {axis}"
    return (f"dimension {name!r} (axis {axis} of input {i}) was specialized to {value} during export: the model's code "
            f"treats it as a constant; pass a different example size or remove {name!r} from dynamic_dims")


def weights_hash(model: torch.nn.Module) -> str:
    """sha256 over parameter names, shapes, dtypes and bytes: identifies the source model in artifacts."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode() + str(t.dtype).encode())
        h.update(t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _source_to_param_name(source: str) -> str:
    """``L['self']._modules['model']._parameters['weight']`` -> ``model.weight`` (Dynamo's source of a lifted param)."""
    name = re.sub(r"^L\['self'\]\.?", "", source)
    name = re.sub(r"\._(?:modules|parameters|buffers)\['([^']+)'\]", r".\1", name)
    name = re.sub(r"\[(\d+)\]", r".\1", name)
    name = re.sub(r"^L\['([^']+)'\]", r"\1", name)
    return name.strip(".") or source


def import_graph_module(gm: torch.fx.GraphModule, example_inputs: list, fn_name: str = "forward") -> Module:
    """Import a Dynamo GraphModule (what a torch.compile backend receives).

    Dynamo graphs call torch functions and modules; they are lowered to torch ops with ``make_fx`` over the same
    fake inputs (SymInt dims stay symbolic), then imported like an export. Inputs that Dynamo passes as real
    tensors (parameters and buffers of inlined modules) become IR parameters; their positions are recorded in
    ``module.attrs["param_positions"]`` so a caller can drop them from each call's arguments.
    """

    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    # Dynamo keeps its own fake values (with symbolic sizes) on the placeholders; prefer them to the example inputs,
    # which may be real tensors with concrete sizes.
    fakes = [ph.meta.get("example_value", ph.meta.get("val")) for ph in placeholders]
    if len(fakes) != len(example_inputs) or any(f is None for f in fakes):
        fakes = list(example_inputs)
    fake_mode = next((f.fake_mode for f in fakes if isinstance(f, FakeTensor)), None) \
        or detect_fake_mode(example_inputs) or FakeTensorMode(allow_non_fake_inputs=True)
    params: dict[str, torch.Tensor] = {}
    param_positions: dict[int, str] = {}
    flat = []
    for i, (x, fake) in enumerate(zip(example_inputs, fakes)):
        ph = placeholders[i] if i < len(placeholders) else None
        grapharg = ph.meta.get("grapharg") if ph is not None else None
        source = getattr(grapharg, "source", None) if grapharg is not None else None
        src = source.name if source is not None else ""
        src = str(src() if callable(src) else src)  # a method in older torch, a property in newer
        is_state = isinstance(x, torch.nn.Parameter) or any(k in src for k in ("_parameters", "_buffers", "L['self']"))
        if is_state and isinstance(x, torch.Tensor) and not isinstance(x, FakeTensor):
            name = _source_to_param_name(src) if src else f"arg{i}"
            params[name] = x.detach()
            param_positions[i] = name
        if isinstance(fake, FakeTensor) and fake.fake_mode is not fake_mode:
            fake = None if not isinstance(x, torch.Tensor) or isinstance(x, FakeTensor) else x
            if fake is None:
                raise ExportError(f"input {i} of the Dynamo graph lives in another fake-tensor mode")
        if isinstance(fake, torch.Tensor) and not isinstance(fake, FakeTensor):
            fake = fake_mode.from_tensor(fake, static_shapes=True)
        flat.append(fake)
    try:
        # pre_dispatch keeps composite ops such as scaled_dot_product_attention whole, as torch.export does; below
        # that level SDPA becomes the CPU flash kernel, which the attention fusion does not recognise
        with fake_mode:
            traced = make_fx(gm, tracing_mode="real", pre_dispatch=True)(*flat)
        input_names = [re.sub(r"\W", "_", _source_to_param_name(str(p.meta["grapharg"].source.name)))
                       if p.meta.get("grapharg") is not None and getattr(p.meta["grapharg"], "source", None) is not None
                       else p.name for p in placeholders]
    except UnsupportedOpError:
        raise
    except Exception as e:
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ExportError(f"cannot lower the Dynamo graph to torch ops: {first}") from e
    phs = [n for n in traced.graph.nodes if n.op == "placeholder"]
    param_placeholders = {phs[i].name: name for i, name in param_positions.items()}
    func = import_graph(traced.graph, fn_name=fn_name, param_placeholders=param_placeholders,
                        input_names=[n for i, n in enumerate(input_names) if i not in param_positions])
    module = Module({fn_name: func}, params)
    for node in traced.graph.nodes:  # constants make_fx kept as attributes
        if node.op == "get_attr":
            t = getattr(traced, node.target)
            module.params[node.target] = t.detach() if isinstance(t, torch.Tensor) else t
    module.attrs["param_positions"] = sorted(param_positions)
    return module
