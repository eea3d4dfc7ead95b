"""The Python API: ``elision.compile(model, example_inputs=..., passes=..., target=...)``."""
from __future__ import annotations

import inspect
import os
import warnings
from typing import Any

import torch
from torch.utils._pytree import tree_leaves
from transformers.utils import ModelOutput

from elision.apps.compile.optimize import SEMANTIC_PIPELINE, default_pipeline  # noqa: F401  (re-exported)
from elision.apps.compile.records import GraphRecord
from elision.apps.compile.select import FastestOf
from elision.apps.compile.torch_target import CANDIDATES
from elision.errors import ElisionError, PassError
from elision.frontend.model_spec import _input_names, default_example_inputs
from elision.frontend.trace import export_to_ir
from elision.frontend.placement import placement_for
from elision.ir.core import Module
from elision.ir.execute import to_fx
from elision.lowering.emit import ort_runner
from elision.passes.manager import PassManager
from elision.passes.pipeline import parse_pipeline
from elision.passes.tokens.outputs import token_outputs

TARGETS = ("torch", "onnxruntime", "triton")


def check_pipeline(pipeline: str | None, allow_approximate: bool = False) -> list:
    """Parse `pipeline` (None: the default pipeline) and check it may run, before anything is traced.

    Raises PassError for an unknown pass, a bad option, or an approximate pass without `allow_approximate`, so a typo
    costs milliseconds rather than a trace, and a model that cannot be traced does not hide a bad pipeline.
    """
    passes = parse_pipeline(default_pipeline() if pipeline is None else pipeline)
    approximate = [p.name for p in passes if p.approximate]
    if approximate and not allow_approximate:
        raise PassError(f"pass {approximate[0]!r} changes the model's output (approximate); it runs only when asked "
                        f"for explicitly (allow_approximate=True / --approximate)")
    return passes


class CompiledModule(torch.nn.Module):
    """Runs an IR function on a target; called with the same positional inputs as the original model.

    `elision_record` says what runs (for the torch and triton targets: one of elision's graph compiled
    by inductor, inductor on the original model, elision's graph on eager PyTorch and the original model,
    decided on the first call: inductor unless another is measurably faster; see `elision.apps.compile.select`).
    """

    def __init__(self, ir: Module, fn_name: str, runner, output_adapter, target: str, report: list[dict],
                 record: GraphRecord | None = None):
        super().__init__()
        self.ir = ir
        self.fn_name = fn_name
        self.target = target
        self.pass_report = report
        self.elision_record = record or GraphRecord(f"elision.compile @{fn_name}", target, runs=target)
        self._runner = runner
        self._adapt = output_adapter

    def forward(self, *args):
        return self._adapt(self._runner(*args))

    def extra_repr(self) -> str:
        return (f"target={self.target}, function=@{self.fn_name}, nodes={len(self.ir.functions[self.fn_name].nodes)}, "
                f"runs={self.elision_record.runs or '(decided on the first call)'}")


class _Flat(torch.nn.Module):
    """The original model called like the IR function: positional inputs in, the tuple of output tensors out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model
        self.kwargs = {"use_cache": False} if _takes_use_cache(model) else {}

    def forward(self, *args):
        return tuple(t for t in tree_leaves(self.model(*args, **self.kwargs)) if isinstance(t, torch.Tensor))


class _MarkDynamic:
    """Calls a torch.compile'd callable, marking the declared dynamic dims on the first call's inputs.

    One dynamic graph then serves every later shape (no static graph first, no recompile on the next size).
    """

    def __init__(self, compiled, dynamic_dims: dict | None) -> None:
        self.compiled = compiled
        self.dims = [(int(i), int(a)) for i, axes in (dynamic_dims or {}).items() for a in (axes or {})]
        self.marked = False

    def __call__(self, *args):
        if not self.marked:
            self.marked = True
            for i, axis in self.dims:
                if i < len(args) and isinstance(args[i], torch.Tensor) and args[i].dim() > axis and args[i].shape[axis] >= 2:
                    torch._dynamo.maybe_mark_dynamic(args[i], axis)
        return self.compiled(*args)


def torch_runner(ir: Module, fn_name: str, model: torch.nn.Module, dynamic_dims: dict | None, semantic: bool,
                 select: str, record: GraphRecord):
    """The torch/triton target: a `FastestOf` over elision's graph under inductor and the original model's routes.

    The original model's routes (inductor on it, and itself) are candidates only when the pipeline preserves its
    output (`semantic`); they are also the reference the other candidates are checked against on the first call.
    """
    if select != "fastest" and select not in CANDIDATES:
        raise ElisionError(f"unknown select {select!r}; choose one of fastest, {', '.join(CANDIDATES)}")
    wanted = CANDIDATES if select == "fastest" else (select,)
    fx = to_fx(ir, fn_name)
    flat = _Flat(model).eval()
    candidates = {}
    for name in wanted:
        if name == "elision+inductor":
            candidates[name] = _MarkDynamic(torch.compile(fx, backend="inductor"), dynamic_dims)
        elif name == "elision":
            candidates[name] = fx
        elif name == "inductor" and semantic:
            candidates[name] = _MarkDynamic(torch.compile(flat, backend="inductor"), dynamic_dims)
        elif name == "eager" and semantic:
            candidates[name] = flat
    if not candidates:
        raise ElisionError(f"select {select!r} runs the original model, which an approximate pipeline does not match")
    return FastestOf(candidates, record, reference="eager" if "eager" in candidates else None)


def _output_adapter(model: torch.nn.Module, example_inputs: tuple, marks: dict[str, int] | None = None):
    """Rebuild the original output structure: HF ModelOutput (primary field), a single tensor, or a tuple. A pruned
    or merged encoder's token marks ({field: output index}, `passes.tokens.outputs`: kept_mask, token_sizes) become
    fields of the ModelOutput."""
    with torch.no_grad():
        out = model(*example_inputs, use_cache=False) if _takes_use_cache(model) else model(*example_inputs)
    if isinstance(out, torch.Tensor):
        return lambda res: res[0]

    if isinstance(out, ModelOutput):
        cls, key = type(out), next(iter(out.keys()))

        def rebuild(res):
            built = cls(**{key: res[0]})
            for name, index in (marks or {}).items():
                built[name] = res[index]  # (batch, kept tokens) int64: kept_mask 1 where a slot is real tokens
            return built

        return rebuild
    return lambda res: tuple(res)


def _takes_use_cache(model) -> bool:
    try:
        return hasattr(model, "config") and "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _triton_note() -> None:
    if not torch.cuda.is_available() and os.environ.get("ELISION_FORCE_TRITON") != "1":
        warnings.warn("target 'triton': no CUDA device, elision ops run their torch reference "
                      "implementations (set ELISION_FORCE_TRITON=1 to run the Triton kernels under the interpreter)",
                      stacklevel=4)


def make_runner(ir: Module, fn_name: str, target: str, *, model: torch.nn.Module, record: GraphRecord,
                dynamic_dims: dict | None = None, semantic: bool = True, select: str = "fastest", **options):
    """callable(*inputs) -> tuple of outputs, running IR function `fn_name` on `target`."""
    if target in ("torch", "triton"):
        if target == "triton":
            _triton_note()
        return torch_runner(ir, fn_name, model, dynamic_dims, semantic, select, record)
    if target == "onnxruntime":
        record.runs = "onnxruntime"
        return ort_runner(ir, fn_name, **options)
    raise ElisionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def compile(model: torch.nn.Module, example_inputs: tuple | None = None, passes: str | None = None,
            target: str = "torch", dynamic_dims: dict | None = None, allow_approximate: bool = False,
            verify_each: bool = False, select: str = "fastest", dtype: str | None = None, device: str | None = None,
            threads: int | None = None, **options: Any) -> CompiledModule:
    """Trace ``model`` into the IR, run ``passes`` (default: the semantics-preserving pipeline), lower to ``target``.

    The result is called like the original model (same positional inputs) and returns the same output type
    (for Hugging Face models: a ModelOutput holding the primary output, e.g. ``.logits``). On the torch and
    triton targets the first call times the routes and keeps inductor on the original model unless another is
    measurably faster (``select`` names one instead: ``elision+inductor``,
    ``inductor``, ``elision`` or ``eager``); ``result.elision_record`` says which.

    ``dtype`` (float32 | float16 | bfloat16), ``device`` (cpu | cuda) and ``threads`` (torch intra-op threads)
    convert ``model`` and ``example_inputs`` in place before tracing (default: as they are); the compiled module
    then takes inputs in that dtype on that device.
    """
    if target not in TARGETS:
        raise ElisionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    pipeline = check_pipeline(passes, allow_approximate)  # before the trace: a typo must not cost one
    placement = placement_for(model, dtype, device, threads)
    model = placement.place_model(model).eval()
    if example_inputs is None:
        example_inputs, guessed = default_example_inputs(model)
        dynamic_dims = guessed if dynamic_dims is None else dynamic_dims
    example_inputs = placement.place_inputs(tuple(example_inputs))
    ir = export_to_ir(model, example_inputs, dynamic_dims, input_names=_input_names(model, len(example_inputs)))
    pm = PassManager(pipeline, verify_each=verify_each, allow_approximate=allow_approximate)
    pm.run(ir)
    ir.attrs["pipeline"] = ",".join(p.spec() for p in pm.passes)
    record = GraphRecord(f"elision.compile({type(model).__name__}) @forward", target)
    runner = make_runner(ir, "forward", target, model=model, record=record, dynamic_dims=dynamic_dims,
                         semantic=not any(p.approximate for p in pm.passes), select=select, threads=threads,
                         **options)
    adapter = _output_adapter(model, example_inputs, token_outputs(ir, "forward"))
    return CompiledModule(ir, "forward", runner, adapter, target, pm.report(), record)
