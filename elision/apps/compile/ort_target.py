"""The onnxruntime target of the backend: one Dynamo graph exported with torch.onnx and run in an ORT session.

Lowering happens on the first call, outside Dynamo's compile step (exporting inside it leaks torch.export's
shape guards into the frame Dynamo is guarding: "Guard failed on the same frame"). Candidates, best first:
elision's rewritten graph, then the graph as Dynamo gave it (for a graph whose elision ops have no ONNX
translation yet). A candidate is accepted only when it exports, ORT loads it, and its outputs on the first
call's inputs match the graph run eagerly within the dtype's tolerance. What was lowered, or why nothing was,
lands in the graph's `GraphRecord`; running eager is never silent (a warning on the first call, the record,
and `strict=True` raises).
"""
from __future__ import annotations

import warnings
from typing import Any, Sequence

import onnxruntime as ort
import torch

from elision.apps.compile.optimize import OptimizedGraph
from elision.apps.compile.records import GraphRecord, warn_once
from elision.apps.compile.select import outputs_match
from elision.lowering.onnx_export import (OPSET_VERSION, _apply_ort_fusions, _custom_translation_table,
                                          exporter_error_summary)
from elision.runtime.artifact import select_providers

__all__ = ["OrtGraphRunner", "UnsupportedGraph"]


class UnsupportedGraph(Exception):
    pass


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


def _classify_inputs(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]):
    """Split Dynamo's inputs into parameters (frozen into the ONNX graph), SymInts, and runtime tensors."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(example_inputs):
        raise UnsupportedGraph(f"graph has {len(placeholders)} placeholders for {len(example_inputs)} inputs")
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
            raise UnsupportedGraph(f"input {ph.name} is a {type(value).__name__}; the onnxruntime target takes tensors and SymInts")
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
            raise UnsupportedGraph(f"SymInt input {placeholders[pos].name} ({expr}) is not a dim of any tensor input")
        symints[pos] = found
    return consts, tensor_positions, symints, dim_names


def _one_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {exporter_error_summary(e)}"


class OrtGraphRunner:
    """Runs one Dynamo graph in an ONNX Runtime session; eager for calls ORT cannot serve (autograd, mutated weights)."""

    LOWERED = "onnxruntime"
    LOWERED_PLAIN = "onnxruntime (graph without elision's rewrites)"

    def __init__(self, record: GraphRecord, optimized: OptimizedGraph | None, gm: torch.fx.GraphModule,
                 example_inputs: Sequence[Any], *, strict: bool = False, ort_threads: int | None = None,
                 ort_fusions: bool = False, rewrite_error: str | None = None) -> None:
        self.record = record
        self.graph_id = record.graph_id
        self.gm = gm
        self.eager = gm.forward
        self.strict = strict
        self.ort_threads = ort_threads
        self.ort_fusions = ort_fusions
        self.candidates: list[tuple[str, torch.nn.Module]] = []
        if optimized is not None:
            self.candidates.append((self.LOWERED, optimized.module()))
        self.candidates.append((self.LOWERED_PLAIN, gm))
        if rewrite_error:
            record.dropped[self.LOWERED] = f"elision's rewrites failed: {rewrite_error}"
        record.candidates = [name for name, _ in self.candidates]
        self.n_args = len(example_inputs)
        self.consts, self.tensor_positions, self.symints, self.dim_names = _classify_inputs(gm, example_inputs)
        self.const_versions = {pos: (t._version, t.data_ptr()) for pos, t in self.consts.items()}
        self.session = None
        self.input_names: list[str] = []
        self.failed: str | None = None

    @property
    def elision_record(self) -> GraphRecord:
        return self.record

    def _export(self, module: torch.nn.Module, examples: tuple):
        wrapper = _OrtWrapper(module, self.n_args, self.tensor_positions, self.consts, self.symints).eval()
        # forward(*tensors): torch.export sees one varargs argument, so the per-tensor specs nest one level
        dynamic_shapes = (tuple(self.dim_names.get(p) or None for p in self.tensor_positions),) if self.dim_names else None
        with warnings.catch_warnings(), torch.no_grad():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(wrapper, examples, dynamo=True, opset_version=OPSET_VERSION,
                                        dynamic_shapes=dynamic_shapes, optimize=True, verbose=False,
                                        custom_translation_table=_custom_translation_table() or None)
        proto = program.model_proto
        if self.ort_fusions:
            feeds = {i.name: t.numpy() for i, t in zip(proto.graph.input, examples)}
            proto, _ = _apply_ort_fusions(self.graph_id, program, feeds)
        return proto

    def _session(self, proto):

        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        if self.ort_threads:
            options.intra_op_num_threads = self.ort_threads
        return ort.InferenceSession(proto.SerializeToString(), options, providers=select_providers())

    def _run_session(self, session, input_names: list[str], tensors: Sequence[torch.Tensor]) -> tuple:
        feeds = {name: t.detach().cpu().contiguous().numpy() for name, t in zip(input_names, tensors)}
        return tuple(torch.from_numpy(o) for o in session.run(None, feeds))

    def _build(self, args: Sequence[Any], tensors: Sequence[torch.Tensor]) -> tuple:
        """Lower the first candidate that exports, loads and matches eager on these inputs; returns its outputs."""
        examples = tuple(t.detach() for t in tensors)
        with torch.no_grad():
            want = self.eager(*args)
        errors = []
        for label, module in self.candidates:
            try:
                proto = self._export(module, examples)
                input_names = [i.name for i in proto.graph.input]
                if len(input_names) != len(self.tensor_positions):
                    raise UnsupportedGraph(f"ONNX graph has {len(input_names)} inputs for {len(self.tensor_positions)} tensors")
                session = self._session(proto)
                got = self._run_session(session, input_names, tensors)
                mismatch = outputs_match(got, want)
                if mismatch is not None:
                    raise UnsupportedGraph(f"onnxruntime output differs from eager: {mismatch}")
            except Exception as e:
                if self.strict:
                    raise
                errors.append(f"{label}: {_one_line(e)}")
                self.record.dropped[label] = _one_line(e)
                continue
            self.session, self.input_names = session, input_names
            self.record.runs = label
            self.record.reason = "first candidate that exports, loads and matches eager"
            if errors:
                self.record.fall_back(label, errors[0])
            return got
        raise UnsupportedGraph("; ".join(errors))

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
                return self._build(args, tensors)
            except Exception as e:
                if self.strict:
                    raise
                self.failed = reason = f"onnxruntime lowering failed: {_one_line(e) if not isinstance(e, UnsupportedGraph) else e}"
                self.record.fall_back("eager", reason, warn=False)
        if reason is not None:
            if self.failed is None:  # a per-call condition: this call runs eager, the session stays
                self.record.eager_calls += 1
            warn_once(f"{self.graph_id}:call:{reason}", f"elision backend: graph {self.graph_id} runs eager: {reason}")
            return self.eager(*args)
        return self._run_session(self.session, self.input_names, tensors)
