"""The Python API: ``elision.compile(model, example_inputs=..., passes=..., target=...)``."""
from __future__ import annotations

from typing import Any

import torch

from elision.errors import ElisionError, PassError
from elision.ir.core import Module

SEMANTIC_PIPELINE = "canonicalize,cse,constant-fold,dce"
TARGETS = ("torch", "onnxruntime", "triton")


def default_pipeline() -> str:
    """The semantics-preserving pipeline: classic cleanups plus the fusions when they are available."""
    try:
        from elision.passes.fusion import DEFAULT_PIPELINE

        return DEFAULT_PIPELINE
    except ImportError:
        return SEMANTIC_PIPELINE


def check_pipeline(pipeline: str | None, allow_approximate: bool = False) -> list:
    """Parse `pipeline` (None: the default pipeline) and check it may run, before anything is traced.

    Raises PassError for an unknown pass, a bad option, or an approximate pass without `allow_approximate`, so a typo
    costs milliseconds rather than a trace, and a model that cannot be traced does not hide a bad pipeline.
    """
    from elision.passes.pipeline import parse_pipeline

    passes = parse_pipeline(default_pipeline() if pipeline is None else pipeline)
    approximate = [p.name for p in passes if p.approximate]
    if approximate and not allow_approximate:
        raise PassError(f"pass {approximate[0]!r} changes the model's output (approximate); it runs only when asked "
                        f"for explicitly (allow_approximate=True / --approximate)")
    return passes


class CompiledModule(torch.nn.Module):
    """Runs an IR function on a target; called with the same positional inputs as the original model."""

    def __init__(self, ir: Module, fn_name: str, runner, output_adapter, target: str, report: list[dict]):
        super().__init__()
        self.ir = ir
        self.fn_name = fn_name
        self.target = target
        self.pass_report = report
        self._runner = runner
        self._adapt = output_adapter

    def forward(self, *args):
        return self._adapt(self._runner(*args))

    def extra_repr(self) -> str:
        return f"target={self.target}, function=@{self.fn_name}, nodes={len(self.ir.functions[self.fn_name].nodes)}"


def _output_adapter(model: torch.nn.Module, example_inputs: tuple):
    """Rebuild the original output structure: HF ModelOutput (primary field), a single tensor, or a tuple."""
    with torch.no_grad():
        out = model(*example_inputs, use_cache=False) if _takes_use_cache(model) else model(*example_inputs)
    if isinstance(out, torch.Tensor):
        return lambda res: res[0]
    try:
        from transformers.utils import ModelOutput
    except ImportError:  # pragma: no cover
        ModelOutput = ()
    if ModelOutput and isinstance(out, ModelOutput):
        cls, key = type(out), next(iter(out.keys()))
        return lambda res: cls(**{key: res[0]})
    return lambda res: tuple(res)


def _takes_use_cache(model) -> bool:
    import inspect

    try:
        return hasattr(model, "config") and "use_cache" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def make_runner(ir: Module, fn_name: str, target: str, **options):
    if target in ("torch", "triton"):
        from elision.ir.execute import to_fx

        if target == "triton":
            import os

            if not torch.cuda.is_available() and os.environ.get("ELISION_FORCE_TRITON") != "1":
                import warnings

                warnings.warn("target 'triton': no CUDA device, elision ops run their torch reference "
                              "implementations (set ELISION_FORCE_TRITON=1 to run the Triton kernels under the interpreter)",
                              stacklevel=3)
        gm = to_fx(ir, fn_name)
        return gm
    if target == "onnxruntime":
        from elision.lowering.emit import ort_runner

        return ort_runner(ir, fn_name, **options)
    raise ElisionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")


def compile(model: torch.nn.Module, example_inputs: tuple | None = None, passes: str | None = None,
            target: str = "torch", dynamic_dims: dict | None = None, allow_approximate: bool = False,
            verify_each: bool = False, **options: Any) -> CompiledModule:
    """Trace ``model`` into the IR, run ``passes`` (default: the semantics-preserving pipeline), lower to ``target``.

    The result is called like the original model (same positional inputs) and returns the same output type
    (for Hugging Face models: a ModelOutput holding the primary output, e.g. ``.logits``).
    """
    from elision.frontend.model_spec import _input_names, default_example_inputs
    from elision.frontend.trace import export_to_ir
    from elision.passes.manager import PassManager
    if target not in TARGETS:
        raise ElisionError(f"unknown target {target!r}; choose one of {', '.join(TARGETS)}")
    pipeline = check_pipeline(passes, allow_approximate)  # before the trace: a typo must not cost one
    model.eval()
    if example_inputs is None:
        example_inputs, guessed = default_example_inputs(model)
        dynamic_dims = guessed if dynamic_dims is None else dynamic_dims
    example_inputs = tuple(example_inputs)
    ir = export_to_ir(model, example_inputs, dynamic_dims, input_names=_input_names(model, len(example_inputs)))
    pm = PassManager(pipeline, verify_each=verify_each, allow_approximate=allow_approximate)
    pm.run(ir)
    ir.attrs["pipeline"] = ",".join(p.spec() for p in pm.passes)
    runner = make_runner(ir, "forward", target, **options)
    return CompiledModule(ir, "forward", runner, _output_adapter(model, example_inputs), target, pm.report())
