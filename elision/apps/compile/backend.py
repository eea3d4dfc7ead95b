"""`torch.compile(model, backend="elision", options={...})`: the Dynamo backend.

Dynamo finds this function through the `torch_dynamo_backends` entry point declared in setup.py
(`elision = elision.apps.compile.backend:elision_backend`); `register()` does the same by hand where the
package is not installed (idempotent; importing this module registers nothing, because Dynamo's
entry-point loader registers the name itself after importing us and asserts it is not taken yet).

Per Dynamo graph:
  1. optimize: import the graph into elision's IR (`import_graph_module`), run the semantics-preserving
     pass pipeline (or `options["passes"]`), and turn it back into an FX module (`to_fx`);
  2. lower to the target: `torch` (the optimized FX module), `triton` (same module; elision ops dispatch
     to Triton kernels on CUDA, and say once that they run their torch reference on CPU), or
     `onnxruntime` (export the graph with torch.onnx, dynamic dims taken from Dynamo's SymInts, run
     in an ORT session).
Anything that fails falls back to eager for that graph (warning once, with the reason) unless
`options["strict"]` is set. Bad options (a pipeline that does not parse or holds an approximate pass included) are
user errors and raise `ValueError` immediately.

Options: target ("torch" | "onnxruntime" | "triton"), passes (pipeline string; "" = none),
strict (bool), ort_threads (int), ort_fusions (bool: onnxscript ORT fusions, verified).
"""
from __future__ import annotations

import itertools
import logging
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

__all__ = ["elision_backend", "register", "BackendOptions", "ElisionFallbackWarning", "TARGETS"]

log = logging.getLogger(__name__)

TARGETS = ("torch", "onnxruntime", "triton")
_graph_ids = itertools.count()
_warned: set[str] = set()


class ElisionFallbackWarning(UserWarning):
    """A graph (or a call of it) ran in eager PyTorch instead of the requested elision target."""


def _warn_once(key: str, message: str) -> None:
    if key in _warned:
        return
    _warned.add(key)
    log.warning(message)
    warnings.warn(message, ElisionFallbackWarning, stacklevel=3)


@dataclass(frozen=True)
class BackendOptions:
    target: str = "torch"
    passes: str | None = None  # None: elision's default semantics-preserving pipeline
    strict: bool = False
    ort_threads: int | None = None
    ort_fusions: bool = False

    @staticmethod
    def parse(options: Mapping[str, Any] | None, mode: str | None = None) -> "BackendOptions":
        options = dict(options or {})
        known = {"target", "passes", "strict", "ort_threads", "ort_fusions"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"elision backend: unknown option(s) {', '.join(unknown)}; known options: {', '.join(sorted(known))}")
        target = options.get("target", "torch")
        if target not in TARGETS:
            raise ValueError(f"elision backend: unknown target {target!r}; choose one of {', '.join(TARGETS)}")
        passes = options.get("passes")
        if passes is not None and not isinstance(passes, str):
            raise ValueError(f"elision backend: passes must be a pipeline string like 'canonicalize,cse', got {type(passes).__name__}")
        if passes is not None and passes.strip():
            from elision.apps.compile.api import check_pipeline
            from elision.errors import PassError

            try:  # a typo is the user's error, not a graph to run eager: refuse it before Dynamo traces anything
                check_pipeline(passes)
            except PassError as e:
                raise ValueError(f"elision backend: {e}") from None
        if mode not in (None, "default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs"):
            raise ValueError(f"elision backend: unknown mode {mode!r}")
        threads = options.get("ort_threads")
        return BackendOptions(
            target=target, passes=passes, strict=bool(options.get("strict", False)),
            ort_threads=None if threads is None else int(threads), ort_fusions=bool(options.get("ort_fusions", False)),
        )


# ------------------------------------------------------------------------------------- optimize step
def _default_pipeline() -> str:
    from elision.apps.compile.api import default_pipeline

    return default_pipeline()


def optimize_graph(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], passes: str | None):
    """Run elision's pipeline on a Dynamo graph. Returns (module, call) where `call(*dynamo_args)` returns
    the outputs as a tuple, and `module` is the nn.Module holding the graph (for ONNX export).

    This is the one switch point between "graph as Dynamo gave it" and "graph through elision's IR".
    """
    pipeline = _default_pipeline() if passes is None else passes
    if not pipeline.strip():
        return gm, _as_tuple_call(gm)
    from elision.frontend.trace import import_graph_module
    from elision.ir import to_fx
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    module = import_graph_module(gm, list(example_inputs))
    PassManager(parse_pipeline(pipeline)).run(module)
    fx = to_fx(module, "forward")
    dropped = frozenset(module.attrs.get("param_positions", ()))  # parameters live inside `fx`

    def call(*args):
        return tuple(fx(*[a for i, a in enumerate(args) if i not in dropped]))

    return _DroppingModule(fx, dropped), call


class _DroppingModule(torch.nn.Module):
    """`fx` called with Dynamo's full argument list, minus the positions its parameters came from."""

    def __init__(self, fx: torch.nn.Module, dropped: frozenset[int]) -> None:
        super().__init__()
        self.fx = fx
        self.dropped = dropped

    def forward(self, *args):
        return tuple(self.fx(*[a for i, a in enumerate(args) if i not in self.dropped]))


def _as_tuple_call(gm: torch.fx.GraphModule) -> Callable:
    def call(*args):
        out = gm(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)

    return call


# ------------------------------------------------------------------------------------- ORT lowering
class _OrtWrapper(torch.nn.Module):
    """Presents a Dynamo graph to the ONNX exporter as `forward(*runtime_tensors)`.

    Parameters become buffers (ONNX initializers, constant-folded by ORT); SymInt arguments are read
    back from the tensor dims they describe, so the ONNX graph has tensor inputs only.
    """

    def __init__(self, target: torch.nn.Module, n_args: int, tensor_positions: list[int],
                 consts: dict[int, torch.Tensor], symints: dict[int, tuple[int, int]]) -> None:
        super().__init__()
        self.target = target
        self.n_args = n_args
        self.tensor_positions = tensor_positions
        self.const_positions = sorted(consts)
        for pos, tensor in consts.items():
            self.register_buffer(f"const_{pos}", tensor.detach(), persistent=False)
        self.symints = symints

    def forward(self, *tensors):
        args: list[Any] = [None] * self.n_args
        for pos, t in zip(self.tensor_positions, tensors):
            args[pos] = t
        for pos in self.const_positions:
            args[pos] = getattr(self, f"const_{pos}")
        for pos, (src, dim) in self.symints.items():
            args[pos] = args[src].shape[dim]
        out = self.target(*args)
        return tuple(out) if isinstance(out, (list, tuple)) else (out,)


class _UnsupportedGraph(Exception):
    pass


def _classify_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """Split Dynamo's inputs into parameters (frozen into the ONNX graph), SymInts, and runtime tensors."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise _UnsupportedGraph(f"graph has {len(placeholders)} placeholders for {len(example_inputs)} inputs")
    consts: dict[int, torch.Tensor] = {}
    tensor_positions: list[int] = []
    sym_positions: dict[int, Any] = {}
    for i, (ph, value) in enumerate(zip(placeholders, example_inputs)):
        if isinstance(value, torch.nn.Parameter):
            consts[i] = value
        elif isinstance(value, torch.Tensor):
            tensor_positions.append(i)
        elif isinstance(value, torch.SymInt) or isinstance(ph.meta.get("example_value"), torch.SymInt):
            sym_positions[i] = ph.meta.get("example_value", value)
        else:
            raise _UnsupportedGraph(f"input {ph.name} is a {type(value).__name__}; the onnxruntime target takes tensors and SymInts")
    # Each SymInt must be a dim of some runtime tensor; remember which, and name that dim for export.
    symints: dict[int, tuple[int, int]] = {}
    dim_names: dict[int, dict[int, Any]] = {}
    for pos in tensor_positions:
        fake = placeholders[pos].meta.get("example_value")
        for d, size in enumerate(getattr(fake, "shape", ())):
            if isinstance(size, torch.SymInt):
                # DYNAMIC (not a named Dim): export infers ranges and equalities itself, where a named Dim's
                # default range can conflict with what the model code implies (e.g. max positions)
                dim_names.setdefault(pos, {})[d] = torch.export.Dim.DYNAMIC
    for pos, sym in sym_positions.items():
        expr = sym.node.expr if isinstance(sym, torch.SymInt) else None
        found = None
        for tpos in tensor_positions:
            fake = placeholders[tpos].meta.get("example_value")
            for d, size in enumerate(getattr(fake, "shape", ())):
                if isinstance(size, torch.SymInt) and expr is not None and size.node.expr == expr:
                    found = (tpos, d)
                    break
            if found:
                break
        if found is None:
            raise _UnsupportedGraph(f"SymInt input {placeholders[pos].name} ({expr}) is not a dim of any tensor input")
        symints[pos] = found
    return consts, tensor_positions, symints, dim_names


class OrtGraphRunner:
    """Runs one Dynamo graph in an ONNX Runtime session; eager for calls ORT cannot serve (autograd, mutated weights).

    The ONNX export happens on the first call, outside Dynamo's compile step: exporting inside it leaks
    torch.export's shape guards into the frame Dynamo is guarding ("Guard failed on the same frame").
    """

    def __init__(self, graph_id: str, module: torch.nn.Module, eager: Callable, example_inputs: Sequence[Any],
                 gm: torch.fx.GraphModule, opts: BackendOptions) -> None:
        self.graph_id = graph_id
        self.eager = eager
        self.opts = opts
        # export candidates, best first: the elision-optimized graph, then Dynamo's graph as given (used
        # when an elision op in the optimized graph has no ONNX translation yet)
        self.candidates = [("elision-optimized", module)] + ([("unoptimized", gm)] if module is not gm else [])
        self.lowered_from: str | None = None
        self.n_args = len(example_inputs)
        self.consts, self.tensor_positions, self.symints, self.dim_names = _classify_inputs(gm, example_inputs)
        self.const_versions = {pos: (t._version, t.data_ptr()) for pos, t in self.consts.items()}
        self.session = None
        self.input_names: list[str] = []
        self.failed: str | None = None

    def _export(self, module: torch.nn.Module, examples: tuple):
        from elision.lowering.onnx_export import OPSET_VERSION, _apply_ort_fusions, _custom_translation_table

        wrapper = _OrtWrapper(module, self.n_args, self.tensor_positions, self.consts, self.symints).eval()
        # forward(*tensors): torch.export sees one varargs argument, so the per-tensor specs nest one level
        dynamic_shapes = (tuple(self.dim_names.get(p) or None for p in self.tensor_positions),) if self.dim_names else None
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, examples, dynamo=True, opset_version=OPSET_VERSION,
                                        dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
                                        custom_translation_table=_custom_translation_table() or None)
        proto = program.model_proto
        if self.opts.ort_fusions:
            feeds = {i.name: t.numpy() for i, t in zip(proto.graph.input, examples)}
            proto, _ = _apply_ort_fusions(self.graph_id, program, feeds)
        return proto

    def _build(self, tensors: Sequence[torch.Tensor]) -> None:
        import onnxruntime as ort

        from elision.lowering.onnx_export import exporter_error_summary
        from elision.runtime.artifact import select_providers

        examples = tuple(t.detach() for t in tensors)
        errors = []
        for label, module in self.candidates:
            try:
                proto = self._export(module, examples)
                self.lowered_from = label
                break
            except Exception as e:
                if self.opts.strict:
                    raise
                errors.append(f"{label}: {type(e).__name__}: {exporter_error_summary(e)}")
        else:
            raise _UnsupportedGraph("; ".join(errors))
        if errors:
            _warn_once(f"{self.graph_id}:partial", f"elision backend: graph {self.graph_id} runs in onnxruntime without "
                                                   f"elision's rewrites: {errors[0]}")
        self.input_names = [i.name for i in proto.graph.input]
        if len(self.input_names) != len(self.tensor_positions):
            raise _UnsupportedGraph(f"ONNX graph has {len(self.input_names)} inputs for {len(self.tensor_positions)} tensors")
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.opts.ort_threads:
            options.intra_op_num_threads = self.opts.ort_threads
        self.session = ort.InferenceSession(proto.SerializeToString(), options, providers=select_providers())

    def _needs_eager(self, tensors: Sequence[torch.Tensor]) -> str | None:
        if torch.is_grad_enabled() and (any(t.requires_grad for t in tensors) or any(c.requires_grad for c in self.consts.values())):
            return "autograd is enabled and an input requires grad (onnxruntime runs inference only; call under torch.no_grad())"
        for pos, tensor in self.consts.items():
            if (tensor._version, tensor.data_ptr()) != self.const_versions[pos]:
                return "a parameter changed after compilation (the onnxruntime graph holds a snapshot of the weights)"
        return None

    def __call__(self, *args):
        tensors = [args[p] for p in self.tensor_positions]
        reason = self.failed or self._needs_eager(tensors)
        if reason is None and self.session is None:
            try:
                self._build(tensors)
            except Exception as e:
                if self.opts.strict:
                    raise
                from elision.lowering.onnx_export import exporter_error_summary

                self.failed = reason = f"onnxruntime lowering failed: {type(e).__name__}: {exporter_error_summary(e)}"
        if reason is not None:
            _warn_once(f"{self.graph_id}:call:{reason}", f"elision backend: graph {self.graph_id} runs eager: {reason}")
            return self.eager(*args)
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(self.input_names, tensors)}
        outputs = self.session.run(None, feeds)
        return tuple(torch.from_numpy(o) for o in outputs)


# ------------------------------------------------------------------------------------- the backend
def _graph_label(gm: torch.fx.GraphModule) -> str:
    n = sum(1 for node in gm.graph.nodes if node.op == "call_function" or node.op == "call_method" or node.op == "call_module")
    return f"#{next(_graph_ids)} ({n} ops)"


def _triton_note() -> None:
    if not torch.cuda.is_available():
        _warn_once(
            "triton:no-cuda",
            "elision backend: target 'triton' has no CUDA device here; elision ops run their torch reference "
            "implementations on CPU (the graph is otherwise the same as target 'torch')",
        )


def elision_backend(gm: torch.fx.GraphModule, example_inputs: Sequence[Any], *, options: Mapping[str, Any] | None = None,
                    mode: str | None = None) -> Callable:
    """Dynamo backend: optimize the graph with elision's pipeline and lower it to the chosen target."""
    opts = BackendOptions.parse(options, mode)
    graph_id = _graph_label(gm)
    try:
        module, call = optimize_graph(gm, example_inputs, opts.passes)
        if opts.target == "onnxruntime":
            runner = OrtGraphRunner(graph_id, module, _as_tuple_call(gm), example_inputs, gm, opts)
            return runner
        if opts.target == "triton":
            _triton_note()
        return call
    except Exception as e:  # any failure: this graph runs eager, the rest of the model is unaffected
        if opts.strict:
            raise
        from elision.lowering.onnx_export import exporter_error_summary

        _warn_once(f"{graph_id}:compile", f"elision backend: graph {graph_id} falls back to eager "
                                          f"(target {opts.target}): {type(e).__name__}: {exporter_error_summary(e)}")
        return gm.forward


def register(name: str = "elision") -> None:
    """Register the backend under `name` by hand (the entry point does this for installed elision). Idempotent."""
    from torch._dynamo.backends.registry import _COMPILER_FNS, register_backend

    if name not in _COMPILER_FNS:
        register_backend(compiler_fn=elision_backend, name=name)
