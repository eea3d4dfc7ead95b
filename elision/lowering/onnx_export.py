"""Write an ONNX artifact directory: one `.onnx` per function, weights stored once, a versioned manifest.

Each function is exported with `torch.onnx.export(..., dynamo=True, opset_version=18)` (opset 18:
the opset-23 `Attention`/`RotaryEmbedding` fusions are rejected by ORT's CPU kernels, see
feasibility-notes.md). elision's custom ops (`torch.ops.elision.*`) are translated with the table from
`elision.lowering.onnx_ops` when that module is present.

Weights: every initializer of every function is moved into one external-data file, `weights.bin`,
deduplicated by content, so a prefill and a decode graph over the same parameters share one copy. The
`.onnx` files hold only graph structure plus (offset, length) references into that file; ONNX Runtime
reads them with the standard external-data mechanism.

Optional ORT fusions (`ort_fusions=True`): onnxscript's `optimize_for_ort` rewrites attention, norms,
GELU and rotary subgraphs into ONNX Runtime contrib ops (`com.microsoft.*`). The result is verified in
ORT against the unfused graph on the example inputs; if ORT rejects it or the numbers drift, the
unfused graph is kept and the manifest says why.

The manifest (`manifest.json`, reader: `elision.runtime.artifact`) records the format version, elision's
version, each function's inputs/outputs with symbolic dims, the pass pipeline, the source model hash,
the runtime settings a generation/decoding loop needs, and the sha256 of every file.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import inspect
import logging
import re
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import torch
from onnx import TensorProto, helper
from onnxscript.rewriter.ort_fusions import optimize_for_ort

from elision.errors import ElisionError
from elision.runtime.artifact import (FORMAT_VERSION, MANIFEST_NAME, WEIGHTS_NAME, TensorSpec, elision_version,
                                      sha256_file)
from elision.runtime.outputs import atomic_directory
from elision.runtime.precision import target_providers

__all__ = ["ArtifactWriter", "export_onnx", "export_program", "source_hash_of", "to_dynamic_shapes", "OnnxExportError",
           "FunctionExportInfo", "exporter_error_summary"]

log = logging.getLogger(__name__)

OPSET_VERSION = 18
_ALIGN = 64  # external-data offsets aligned for mmap-friendly reads
_FN_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_\-]*$")
_DERIVED_DIM = re.compile(r"^\s*([A-Za-z_]\w*)\s*([+-])\s*(\d+)\s*$")

DynamicDims = Mapping[int, Mapping[int, str]] | None
FunctionEntry = tuple[torch.nn.Module, tuple, DynamicDims]


class OnnxExportError(ElisionError, ValueError):
    """A function could not be exported; the message names the function and the cause."""


@dataclass(frozen=True)
class FunctionExportInfo:
    name: str
    file: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    ort_fusions: dict[str, Any]


def source_hash_of(model: torch.nn.Module) -> str:
    """sha256 over the model's class name and its state dict (names, dtypes, shapes, bytes)."""
    digest = hashlib.sha256(type(model).__qualname__.encode())
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        if t.dtype == torch.bfloat16:
            t = t.view(torch.int16)
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def to_dynamic_shapes(example_inputs: Sequence[Any], dynamic_dims: DynamicDims,
                      model: torch.nn.Module | None = None) -> tuple | None:
    """Turn `{input_index: {dim: "name"}}` into torch.export `dynamic_shapes` (one `Dim` per name).

    Names may be derived, `"seq + 1"`, relative to a plain name used elsewhere. Example sizes of 0 or 1
    are refused because torch.export specializes them to constants. Input indices count positional inputs;
    when `model.forward` ends in `*args`, the specs of the inputs it collects become one tuple, the shape
    torch.export wants for a variadic parameter.
    """
    if not dynamic_dims:
        return None
    dims: dict[str, Any] = {}

    def dim_for(label: str) -> Any:
        match = _DERIVED_DIM.match(label)
        if match:
            base, sign, offset = match.group(1), match.group(2), int(match.group(3))
            root = dims.setdefault(base, torch.export.Dim(base))
            return root + offset if sign == "+" else root - offset
        if not re.match(r"^[A-Za-z_]\w*$", label):
            raise OnnxExportError(f"dynamic dim name {label!r} must be an identifier or 'name + k'")
        return dims.setdefault(label, torch.export.Dim(label))

    shapes: list[Any] = []
    for index, value in enumerate(example_inputs):
        spec = dynamic_dims.get(index) or dynamic_dims.get(str(index))  # JSON round trips make keys strings
        if not spec:
            shapes.append(None)
            continue
        if not isinstance(value, torch.Tensor):
            raise OnnxExportError(f"dynamic dims given for input {index}, which is not a tensor")
        per_input = {}
        for axis, label in spec.items():
            axis = int(axis)
            if axis >= value.dim() or axis < -value.dim():
                raise OnnxExportError(f"input {index} has {value.dim()} dims; dynamic dim {axis} ({label!r}) is out of range")
            if value.shape[axis] < 2:
                raise OnnxExportError(
                    f"input {index} dim {axis} ({label!r}) has example size {value.shape[axis]}; dynamic dims need "
                    f"an example size >= 2 because torch.export turns sizes 0 and 1 into constants"
                )
            per_input[axis] = dim_for(str(label))
        shapes.append(per_input)
    fixed = _positional_before_varargs(model) if model is not None else None
    if fixed is not None:
        shapes = shapes[:fixed] + [tuple(shapes[fixed:])]
    return tuple(shapes)


def _positional_before_varargs(model: torch.nn.Module) -> int | None:
    """How many named positional parameters `model.forward` has before its `*args`; None without `*args`."""
    fixed = 0
    for param in inspect.signature(model.forward).parameters.values():
        if param.kind == inspect.Parameter.VAR_POSITIONAL:
            return fixed
        if param.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD):
            fixed += 1
    return None


def exporter_error_summary(error: BaseException) -> str:
    """One line saying why torch.onnx failed: its "Exception summary" line when present, else the first line."""
    text = str(error).strip()
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for i, line in enumerate(lines):
        if line.startswith("## Exception summary") and i + 1 < len(lines):
            return re.sub(r"\x1b\[[0-9;]*m", "", lines[i + 1])[:400]
    return re.sub(r"\x1b\[[0-9;]*m", "", lines[0])[:400] if lines else type(error).__name__


def _custom_translation_table() -> dict[Callable, Callable]:
    """elision op -> onnxscript translation, plus elision's translations of the aten ops torch.onnx translates
    wrongly (`elision.lowering.onnx_aten`)."""
    # Imported when exporting, not at module top: the translations register the kernel ops, which import triton.
    from elision.lowering.onnx_aten import aten_translation_table
    from elision.lowering.onnx_ops import custom_translation_table

    return {**aten_translation_table(), **custom_translation_table()}


_NP_NAMES = {
    TensorProto.FLOAT: "float32", TensorProto.FLOAT16: "float16", TensorProto.DOUBLE: "float64",
    TensorProto.BFLOAT16: "bfloat16", TensorProto.INT64: "int64", TensorProto.INT32: "int32",
    TensorProto.INT16: "int16", TensorProto.INT8: "int8", TensorProto.UINT8: "uint8", TensorProto.BOOL: "bool",
}


def index_ranges(model: onnx.ModelProto) -> dict[str, tuple[int, int]]:
    """Graph inputs used directly as the indices of a `Gather` over a weight table (token ids into an embedding):
    input name -> [0, rows). ONNX Runtime reads out of bounds for larger ids and wraps negative ones around, where
    the PyTorch model (`nn.Embedding`) refuses both; the runtime checks inputs against these ranges."""
    graph = model.graph
    tables = {t.name: tuple(t.dims) for t in graph.initializer}
    inputs = {i.name for i in graph.input if i.type.tensor_type.elem_type in (TensorProto.INT64, TensorProto.INT32)}
    ranges: dict[str, tuple[int, int]] = {}
    for node in graph.node:
        if node.op_type != "Gather" or node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        data, indices = node.input[0], node.input[1]
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        dims = tables.get(data)
        if indices not in inputs or not dims or len(dims) < 2 or not -len(dims) <= axis < len(dims):
            continue
        rows = int(dims[axis])
        ranges[indices] = (0, min(rows, ranges.get(indices, (0, rows))[1]))
    return ranges


def _value_specs(values: Sequence[onnx.ValueInfoProto],
                 ranges: Mapping[str, tuple[int, int]] | None = None) -> tuple[TensorSpec, ...]:
    specs = []
    for value in values:
        tensor_type = value.type.tensor_type
        shape: list[int | str] = []
        for i, dim in enumerate(tensor_type.shape.dim):
            if dim.HasField("dim_value"):
                shape.append(int(dim.dim_value))
            elif dim.HasField("dim_param"):
                shape.append(dim.dim_param)
            else:
                shape.append(f"{value.name}_dim{i}")
        dtype = _NP_NAMES.get(tensor_type.elem_type, TensorProto.DataType.Name(tensor_type.elem_type).lower())
        specs.append(TensorSpec(value.name, dtype, tuple(shape), (ranges or {}).get(value.name)))
    return tuple(specs)


class _SharedWeights:
    """Appends tensors to one external-data file, once per distinct content."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle = open(path, "wb")
        self.offset = 0
        self.by_digest: dict[tuple[str, int, tuple[int, ...]], tuple[int, int]] = {}
        self.bytes_referenced = 0

    def externalize(self, model: onnx.ModelProto, min_bytes: int = 64) -> None:
        """Move every initializer of `model` (>= min_bytes) into the shared file and point the proto at it."""
        for tensor in model.graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                if {e.key: e.value for e in tensor.external_data}.get("location") == self.path.name:
                    continue  # written by externalize_ir
                raise OnnxExportError(f"initializer {tensor.name} is already external; expected in-memory weights")
            # raw_data is already ONNX's little-endian external layout; typed fields need converting.
            data = tensor.raw_data if tensor.HasField("raw_data") else onnx.numpy_helper.to_array(tensor).tobytes()
            if len(data) < min_bytes:
                continue  # tiny constants (shapes, scalars) stay inline where the checker and ORT fold them
            key = (hashlib.sha256(data).hexdigest(), tensor.data_type, tuple(tensor.dims))
            offset, length = self._place(data, key)
            # Clear every in-memory payload field, then record where the bytes live.
            for field_name in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
                tensor.ClearField(field_name)
            del tensor.external_data[:]
            for key_name, value in (("location", self.path.name), ("offset", str(offset)), ("length", str(length))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key_name, value
            tensor.data_location = TensorProto.EXTERNAL

    def _place(self, data: bytes, key: tuple) -> tuple[int, int]:
        if key not in self.by_digest:
            pad = (-self.offset) % _ALIGN
            self.handle.write(b"\0" * pad)
            self.offset += pad
            self.handle.write(data)
            self.by_digest[key] = (self.offset, len(data))
            self.offset += len(data)
        offset, length = self.by_digest[key]
        self.bytes_referenced += length
        return offset, length

    def externalize_ir(self, model: onnx_ir.Model, min_bytes: int = 64) -> None:
        """`externalize` for an onnx_ir model, before serialization: each initializer's bytes are written out one
        tensor at a time and its value becomes a reference into the file, so the model's weights are never copied
        into a ModelProto (a full second copy of a large model's weights)."""
        for value in model.graph.initializers.values():
            tensor = value.const_value
            if tensor is None:
                continue
            data = tensor.tobytes()
            if len(data) < min_bytes:
                continue
            key = (hashlib.sha256(data).hexdigest(), int(tensor.dtype), tuple(tensor.shape.numpy()))
            offset, length = self._place(data, key)
            del data
            value.const_value = onnx_ir.ExternalTensor(self.path.name, offset, length, tensor.dtype, shape=tensor.shape,
                                                       name=value.name, base_dir=str(self.path.parent))

    def close(self) -> None:
        self.handle.close()


def _export_program(name: str, model: torch.nn.Module, example_inputs: tuple, dynamic_dims: DynamicDims,
                    optimize: bool = True):
    if not isinstance(model, torch.nn.Module):
        raise OnnxExportError(f"function {name!r}: expected an nn.Module or fx.GraphModule, got {type(model).__name__}")
    model.eval()
    dynamic_shapes = to_dynamic_shapes(example_inputs, dynamic_dims, model)
    exporter_log = logging.getLogger("torch.onnx")
    level = exporter_log.level
    try:
        # quiet by default: the exporter's FutureWarnings about pytree specs and its log lines about missing
        # torchvision ops are not the user's business
        exporter_log.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.onnx.export(
                model,
                tuple(example_inputs),
                dynamo=True,
                opset_version=OPSET_VERSION,
                dynamic_shapes=dynamic_shapes,
                custom_translation_table=_custom_translation_table() or None,
                optimize=optimize,
                verbose=False,
            )
    except Exception as e:  # the exporter wraps everything in its own error types
        raise OnnxExportError(f"function {name!r}: torch.onnx export failed: {exporter_error_summary(e)}") from e
    finally:
        exporter_log.setLevel(level)


def _rename_outputs(model: onnx.ModelProto, names: Sequence[str]) -> None:
    """Give the graph outputs stable names (the exporter names them after the producing op)."""
    graph = model.graph
    if len(names) != len(graph.output):
        raise OnnxExportError(f"{len(names)} output names given for {len(graph.output)} outputs")
    if len(set(names)) != len(names):
        raise OnnxExportError(f"output names must be distinct: {list(names)}")
    taken = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    clash = taken & set(names)
    if clash:
        raise OnnxExportError(f"output name(s) {sorted(clash)} collide with input or weight names")
    sources = {i.name for i in graph.input} | {t.name for t in graph.initializer}
    seen: set[str] = set()
    mapping: dict[str, str] = {}
    for out, new in zip(graph.output, names):
        old = out.name
        if old == new:
            seen.add(old)
            continue
        if old in sources or old in seen or old in mapping:
            # an input/weight returned as is, or one value returned twice: give it an Identity to rename
            graph.node.append(onnx.helper.make_node("Identity", [old], [new]))
        else:
            mapping[old] = new
        seen.add(old)
    for node in graph.node:
        node.output[:] = [mapping.get(o, o) for o in node.output]
        node.input[:] = [mapping.get(i, i) for i in node.input]
    for value in graph.value_info:
        value.name = mapping.get(value.name, value.name)
    for out, new in zip(graph.output, names):
        out.name = new


def _strip_stack_traces(model: onnx.ModelProto) -> None:
    """Drop per-node Python stack traces the exporter records: they are most of the file size."""
    for node in model.graph.node:
        kept = [p for p in node.metadata_props if p.key != "pkg.torch.onnx.stack_trace"]
        del node.metadata_props[:]
        node.metadata_props.extend(kept)


def _ort_outputs(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, feeds)


def _expand_simplified_layer_norm(node: onnx.NodeProto, serial: int, dtype: int | None) -> list[onnx.NodeProto]:
    """Standard-opset form of ORT's `SimplifiedLayerNormalization` (RMSNorm) node, `dtype` being its input's
    element type (None: unknown).

    onnxscript emits it in the default ONNX domain, where `onnx.checker` has no schema for it. The expansion is
    the exact pattern ORT's optimizer fuses back into its RMSNorm kernel when the session is created:
    [Cast to float] -> Pow(2) -> ReduceMean -> Add(eps) -> Sqrt -> Div -> [Cast back] -> Mul(scale). Mul(x, x)
    instead of Pow, or CastLike instead of Cast, leaves seven separate kernels running every step.
    """
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    axis = int(attrs.get("axis", -1))
    eps = float(attrs.get("epsilon", 1e-5))
    x, scale = node.input[0], node.input[1]
    p = f"_elision_rms{serial}_"
    is_float = dtype == TensorProto.FLOAT
    x32 = x if is_float else p + "x32"
    nodes = [] if is_float else [helper.make_node("Cast", [x], [x32], to=TensorProto.FLOAT)]
    nodes += [
        helper.make_node("Constant", [], [p + "two"], value=onnx.numpy_helper.from_array(np.array(2.0, np.float32))),
        helper.make_node("Pow", [x32, p + "two"], [p + "sq"]),
        helper.make_node("Constant", [], [p + "axes"], value=onnx.numpy_helper.from_array(np.array([axis], np.int64))),
        helper.make_node("ReduceMean", [p + "sq", p + "axes"], [p + "ms"], keepdims=1),
        helper.make_node("Constant", [], [p + "eps"], value=onnx.numpy_helper.from_array(np.array(eps, np.float32))),
        helper.make_node("Add", [p + "ms", p + "eps"], [p + "var"]),
        helper.make_node("Sqrt", [p + "var"], [p + "rms"]),
        helper.make_node("Div", [x32, p + "rms"], [p + "n32" if not is_float else p + "n"]),
    ]
    if not is_float:
        back = helper.make_node("Cast", [p + "n32"], [p + "n"], to=dtype) if dtype else \
            helper.make_node("CastLike", [p + "n32", x], [p + "n"])  # no type known: correct, but ORT keeps it unfused
        nodes.append(back)
    nodes.append(helper.make_node("Mul", [p + "n", scale], [node.output[0]]))
    return nodes


def _element_types(graph: onnx.GraphProto) -> dict[str, int]:
    """Element type of every value the graph declares (inputs, outputs, value_info, initializers)."""
    types = {v.name: v.type.tensor_type.elem_type for v in (*graph.input, *graph.output, *graph.value_info)
             if v.type.HasField("tensor_type") and v.type.tensor_type.elem_type}
    types.update((t.name, t.data_type) for t in graph.initializer)
    return types


def _standardize_default_domain(model: onnx.ModelProto) -> None:
    """Rewrite ORT-only ops that onnxscript put in the default domain into standard ops, or raise."""
    nodes: list[onnx.NodeProto] = []
    types: dict[str, int] | None = None
    for serial, node in enumerate(model.graph.node):
        if node.domain in ("", "ai.onnx") and not onnx.defs.has(node.op_type):
            if node.op_type == "SimplifiedLayerNormalization" and len(node.output) == 1:
                types = _element_types(model.graph) if types is None else types
                nodes.extend(_expand_simplified_layer_norm(node, serial, types.get(node.input[0])))
                continue
            raise OnnxExportError(f"fused graph uses {node.op_type}, which has no standard ONNX schema")
        nodes.append(node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _apply_ort_fusions(name: str, plain: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Try onnxscript's ORT fusions; keep them only if ORT accepts the result and it matches the plain graph."""
    try:
        reference = _ort_outputs(plain, feeds)
        fused_ir = onnx_ir.serde.deserialize_model(plain)
        _, counts = optimize_for_ort(fused_ir)
        fused = onnx_ir.serde.serialize_model(fused_ir)
        _standardize_default_domain(fused)
        onnx.checker.check_model(fused)
        got = _ort_outputs(fused, feeds)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        log.info("function %s: ORT fusions not applied: %s", name, first)
        return plain, {"applied": False, "reason": first[:300]}
    worst = 0.0
    for a, b in zip(reference, got):
        if a.dtype.kind == "f":
            scale = max(1.0, float(np.abs(a).max(initial=0.0)))
            worst = max(worst, float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max(initial=0.0)) / scale)
        elif not np.array_equal(a, b):
            worst = float("inf")
    fired = {k: int(v) for k, v in counts.items() if v}
    if worst > 1e-4:
        return plain, {"applied": False, "reason": f"fused graph drifted from the plain graph (rel err {worst:.2e})", "fusions": fired}
    return fused, {"applied": True, "fusions": fired, "max_rel_err": worst}


def _feeds_for(proto: onnx.ModelProto, example_inputs: tuple) -> dict[str, np.ndarray]:
    tensors = [t for t in example_inputs if isinstance(t, torch.Tensor)]
    names = [i.name for i in proto.graph.input]
    if len(names) != len(tensors):
        raise OnnxExportError(f"exported graph has {len(names)} inputs but {len(tensors)} example tensors were given")
    return {n: t.detach().cpu().numpy() for n, t in zip(names, tensors)}


class ArtifactWriter:
    """Writes an artifact directory function by function, atomically:

        with ArtifactWriter(out_dir) as writer:
            writer.add_proto(...) / writer.add_model(...)
            writer.finish(...)          # the manifest

    Files go to a temporary sibling of `out_dir` that replaces it only when the block ends after `finish`; an
    exception or Ctrl-C anywhere leaves a previous artifact at `out_dir` exactly as it was. Every initializer
    goes into the one shared `weights.bin` (deduplicated by content); the `.onnx` files keep only graph structure
    and references into it.
    """

    def __init__(self, out_dir: str | Path):
        self.target = Path(out_dir)
        self._stack = contextlib.ExitStack()
        self._finished = False

    def __enter__(self) -> "ArtifactWriter":
        self.out = self._stack.enter_context(
            atomic_directory(self.target, marker=MANIFEST_NAME, what="artifact directory"))
        self.weights = _SharedWeights(self.out / WEIGHTS_NAME)
        self._stack.callback(self.weights.close)  # closed before the directory is moved (or discarded)
        self.infos: list[FunctionExportInfo] = []
        return self

    def __exit__(self, kind, value, tb) -> bool:
        if kind is None and not self._finished:  # a caller's bug: never move a directory without a manifest in
            error = OnnxExportError("ArtifactWriter left without finish(): the artifact was not written")
            self._stack.__exit__(OnnxExportError, error, None)  # discards the temporary directory
            raise error
        return self._stack.__exit__(kind, value, tb)

    def add_proto(self, name: str, proto: onnx.ModelProto, ort_fusions: dict[str, Any] | None = None,
                  ranges: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Write function `name` (outputs already named); checks it with onnx.checker. `ranges`: index ranges of
        integer inputs (`index_ranges`), recorded so the runtime can refuse out-of-range token ids."""
        if not _FN_NAME.match(name):
            raise OnnxExportError(f"function name {name!r} is not a valid file name; use letters, digits, '_' and '-'")
        _strip_stack_traces(proto)
        proto.producer_name = "elision"
        proto.producer_version = elision_version()
        self.weights.externalize(proto)  # a no-op for weights already written by add_model
        file_name = f"{name}.onnx"
        onnx.save_model(proto, str(self.out / file_name))
        try:
            onnx.checker.check_model(str(self.out / file_name))
        except onnx.checker.ValidationError as e:
            raise OnnxExportError(f"function {name!r}: onnx.checker rejected the exported graph: {str(e).splitlines()[0]}") from e
        self.infos.append(FunctionExportInfo(name=name, file=file_name, inputs=_value_specs(proto.graph.input, ranges),
                                             outputs=_value_specs(proto.graph.output),
                                             ort_fusions=ort_fusions or {"applied": False, "reason": "not requested"}))

    def add_model(self, name: str, model: onnx_ir.Model, ort_fusions: dict[str, Any] | None = None,
                  ranges: Mapping[str, tuple[int, int]] | None = None) -> None:
        """`add_proto` for an onnx_ir model: its weights are written first, tensor by tensor (see `externalize_ir`).
        ORT-only ops that onnxscript puts in the default domain are expanded back to standard ops."""
        self.weights.externalize_ir(model)
        proto = onnx_ir.serde.serialize_model(model)
        _standardize_default_domain(proto)
        self.add_proto(name, proto, ort_fusions, ranges)

    def finish(self, *, pipeline: str, source_hash: str, runtime_settings: Mapping[str, Any],
               extra_files: Mapping[str, str | Path] | None = None, dtype: str = "float32",
               device: str | None = None) -> Path:
        """Hash every file and write `manifest.json`; returns the artifact directory (in place once the `with`
        block ends). `device`: where the artifact should run first ("cpu", "cuda"; None: CUDA where onnxruntime
        has it), recorded as the order of its `execution_providers`."""
        self.weights.close()
        try:
            settings_json = json.loads(json.dumps(dict(runtime_settings)))
        except TypeError as e:
            raise OnnxExportError(f"runtime_settings must be JSON-serializable: {e}") from None
        out = self.out
        files = {WEIGHTS_NAME: sha256_file(out / WEIGHTS_NAME)}
        files.update({info.file: sha256_file(out / info.file) for info in self.infos})
        for rel, source in (extra_files or {}).items():
            if not _FN_NAME.match(Path(rel).stem) or Path(rel).name != rel or rel in (MANIFEST_NAME, WEIGHTS_NAME):
                raise OnnxExportError(f"extra file name {rel!r} must be a plain file name (letters, digits, '_', '-', '.')")
            shutil.copyfile(source, out / rel)
            files[rel] = sha256_file(out / rel)
        manifest = {
            "format_version": FORMAT_VERSION,
            "elision_version": elision_version(),
            "producer": {"torch": torch.__version__, "onnx": onnx.__version__, "opset": OPSET_VERSION},
            "pipeline": pipeline,
            "source_hash": source_hash,
            "runtime_settings": settings_json,
            "dtype": dtype,
            "execution_providers": target_providers(dtype, device),
            "weights": {"file": WEIGHTS_NAME, "bytes": self.weights.offset,
                        "bytes_referenced": self.weights.bytes_referenced},
            "functions": {
                info.name: {
                    "file": info.file,
                    "inputs": [t.to_json() for t in info.inputs],
                    "outputs": [t.to_json() for t in info.outputs],
                    "ort_fusions": info.ort_fusions,
                }
                for info in self.infos
            },
            "files": files,
        }
        (out / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")
        self._finished = True
        return self.target


def export_program(name: str, model: torch.nn.Module, example_inputs: tuple, dynamic_dims: DynamicDims,
                   optimize: bool = True):
    """`torch.onnx.export(..., dynamo=True)` of one function; `.model` of the result is its onnx_ir model.
    `optimize=False` skips onnxscript's optimizer (for a caller that runs it itself, as the ORT lowering does)."""
    return _export_program(name, model, example_inputs, dynamic_dims, optimize)


def export_onnx(
    functions: Mapping[str, FunctionEntry],
    out_dir: str | Path,
    *,
    pipeline: str,
    source_hash: str,
    runtime_settings: Mapping[str, Any],
    ort_fusions: bool = False,
    output_names: Mapping[str, Sequence[str]] | None = None,
    progress: Callable[[str], None] | None = None,
    extra_files: Mapping[str, str | Path] | None = None,
    dtype: str = "float32",
    device: str | None = None,
) -> Path:
    """Export each function to `<out_dir>/<name>.onnx` with shared weights and write `manifest.json`.

    functions: name -> (module or fx.GraphModule, example inputs, dynamic dims `{input_index: {dim: name}}`).
    pipeline: the pass pipeline string applied before export (recorded, not run here).
    source_hash: hash of the source model (see `source_hash_of`). runtime_settings: JSON-serializable
    settings for the host loop (e.g. eos id, cache layout). ort_fusions: rewrite into ORT contrib ops
    when that verifies. output_names: per function, names for its outputs (default `output_0`, ...).
    extra_files: artifact file name -> source path, copied in and hashed like the graphs (e.g. a tokenizer).
    dtype: the floating dtype of the weights (recorded with the execution providers it targets). device: where it
    should run first (see `ArtifactWriter.finish`).
    Returns the artifact directory.
    """
    if not functions:
        raise OnnxExportError("no functions to export")
    for name in functions:
        if not _FN_NAME.match(name):
            raise OnnxExportError(f"function name {name!r} is not a valid file name; use letters, digits, '_' and '-'")
    for rel in extra_files or {}:
        if not _FN_NAME.match(Path(rel).stem) or Path(rel).name != rel or rel in (MANIFEST_NAME, WEIGHTS_NAME):
            raise OnnxExportError(f"extra file name {rel!r} must be a plain file name (letters, digits, '_', '-', '.')")
    try:
        json.dumps(dict(runtime_settings))
    except TypeError as e:
        raise OnnxExportError(f"runtime_settings must be JSON-serializable: {e}") from None

    # Everything is written into a temporary sibling and renamed into place at the end (ArtifactWriter): an export
    # that fails, or Ctrl-C, leaves a previous artifact at `out_dir` exactly as it was.
    with ArtifactWriter(out_dir) as writer:
        for name, entry in functions.items():
            if len(entry) != 3:
                raise OnnxExportError(f"function {name!r}: expected (module, example_inputs, dynamic_dims)")
            model, example_inputs, dynamic_dims = entry
            if progress:
                progress(f"exporting {name}")
            program = _export_program(name, model, tuple(example_inputs), dynamic_dims)
            ranges = index_ranges(program.model_proto)  # before ORT fusions fold the embedding Gathers away
            fusion_info: dict[str, Any] = {"applied": False, "reason": "not requested"}
            proto = program.model_proto
            if ort_fusions:
                try:
                    feeds = _feeds_for(proto, tuple(example_inputs))
                except OnnxExportError as e:
                    fusion_info = {"applied": False, "reason": f"cannot verify fusions: {e}"}
                else:
                    proto, fusion_info = _apply_ort_fusions(name, proto, feeds)
            del program
            names = (output_names or {}).get(name) or [f"output_{i}" for i in range(len(proto.graph.output))]
            _rename_outputs(proto, list(names))
            writer.add_proto(name, proto, fusion_info, ranges)
        return writer.finish(pipeline=pipeline, source_hash=source_hash, runtime_settings=runtime_settings,
                             extra_files=extra_files, dtype=dtype, device=device)
