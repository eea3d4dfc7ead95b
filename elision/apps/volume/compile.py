"""Compile a field decoder for volume decoding: trace it to elision's IR, run the pass pipeline, lower it.

  compile_field(model, "query-independence,hoist-invariants,sparse-volume", backend="torch" | "onnxruntime")

traces `model.forward(points [1, N, 3], latents [1, M, E])` with the query count N dynamic (torch.export), runs the
passes through the pass manager (`--dump-ir DIR` writes the IR before and after each), and lowers every function of
the result to torch FX or, through the ONNX artifact writer, to ONNX Runtime sessions. `load_field_artifact(dir)`
drives an artifact written earlier (`elision compile MODEL --passes ... --emit onnx`) the same way, without torch
models. `compiled_field` memoises compilation per model object, so repeated decodes pay for it once.
"""
from __future__ import annotations

import tempfile
import time
import weakref
from pathlib import Path
from typing import Any

import onnxruntime as ort
import torch

from elision.apps.volume.lowered import LoweredField, ort_runner, torch_runner
from elision.frontend.trace import export_to_ir
from elision.ir.core import Module
from elision.ir.execute import to_fx
from elision.lowering.emit import emit_onnx
from elision.passes.manager import PassManager
from elision.passes.pipeline import parse_pipeline
from elision.passes.volume import VOLUME_ATTR, volume_record
from elision.runtime.artifact import ArtifactError, load_artifact

DEFAULT_PIPELINE = "query-independence,hoist-invariants,sparse-volume"
BACKENDS = ("torch", "onnxruntime")
QUERIES = "queries"  # the dynamic dim of the traced query points


def _example_latents(model: torch.nn.Module, latents: torch.Tensor | None) -> torch.Tensor:
    config = getattr(model, "config", None)
    if latents is None and hasattr(config, "num_latents") and hasattr(config, "embed_dim"):
        return torch.randn(1, config.num_latents, config.embed_dim, generator=torch.Generator().manual_seed(0))
    if latents is None:
        raise ValueError(f"{type(model).__name__} has no VecSet config: pass example latents to trace it with")
    return latents.reshape(1, *latents.shape[-2:])


def trace_field(model: torch.nn.Module, latents: torch.Tensor | None = None) -> Module:
    """IR @forward(points [1, queries, 3], latents) of a field decoder, in the dtype and on the device it runs on."""
    param = next(model.parameters())
    points = torch.rand(1, 8, 3, generator=torch.Generator().manual_seed(0)) * 2 - 1
    example = (points.to(param.device, param.dtype), _example_latents(model, latents).to(param.device, param.dtype))
    return export_to_ir(model.eval(), example, dynamic_dims={0: {1: QUERIES}})


def _complete_record(ir: Module) -> dict:
    """The volume record with every function's signature, including an unsplit @forward's (no pass recorded it)."""
    rec = volume_record(ir)
    rec.setdefault("field", {"function": "forward", "query_input": 0, "query_dim": 1})
    functions = rec.setdefault("functions", {})
    field = rec["field"]
    if field["function"] in ir.functions and field["function"] not in functions:
        fn = ir.functions[field["function"]]
        functions[fn.name] = {"inputs": [v.name for v in fn.inputs], "outputs": [v.name for v in fn.outputs],
                              "query": fn.inputs[field["query_input"]].name}
    return rec


def _latents_shape(ir_inputs: dict[str, tuple], rec: dict) -> tuple:
    split = rec.get("split")
    fn = rec["functions"][split["prepare"] if split else rec["field"]["function"]]
    (name,) = [n for n in fn["inputs"] if n != fn["query"]]
    return ir_inputs[name]


def _layout_free(ir: Module) -> Module:
    """A copy of `ir` whose views are reshapes. torch.export records a reshape as a view when the traced tensor's
    strides allowed one, but the driver feeds other layouts: grid points from `nonzero` come column-major, and the
    hoisted keys and values are made contiguous once per shape (SDPA's fused CPU kernel reads them faster), which
    changes the layout of the attention's output. A reshape is a view wherever a view is possible."""
    out = ir.copy()
    for fn in out.functions.values():
        for n in fn.nodes:
            if n.op == "aten.view.default":
                n.op = "aten.reshape.default"
    return out


def compile_field(model: torch.nn.Module, passes: str = DEFAULT_PIPELINE, *, backend: str = "torch",
                  latents: torch.Tensor | None = None, dump_ir: str | Path | None = None,
                  threads: int | None = 2) -> LoweredField:
    """Trace `model`, run `passes`, lower to `backend` ('torch': FX on the model's device and dtype; 'onnxruntime': an
    ONNX artifact in a temporary directory run by onnxruntime on the CPU, fp32)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    pipeline = parse_pipeline(passes)  # a bad pipeline fails before tracing
    param = next(model.parameters())
    if backend == "onnxruntime" and (param.device.type != "cpu" or param.dtype != torch.float32):
        raise ValueError("the ONNX Runtime backend runs fp32 models on the CPU; move the model there first")
    t0 = time.perf_counter()
    ir = trace_field(model, latents)
    t1 = time.perf_counter()
    PassManager(pipeline, dump_dir=dump_ir).run(ir)
    spec = ",".join(p.spec() for p in pipeline)
    ir.attrs["pipeline"] = spec
    rec = _complete_record(ir)
    t2 = time.perf_counter()
    shapes = {v.name: tuple(v.type.shape) for fn in ir.functions.values() for v in fn.inputs}
    if backend == "torch":
        relaxed = _layout_free(ir)
        runners = {name: torch_runner(to_fx(relaxed, name)) for name in relaxed.functions}
        field = LoweredField(rec, runners, _latents_shape(shapes, rec), param.device, param.dtype, "torch", spec)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="elision-field-")
        emit_onnx(ir, None, Path(tmp.name))
        field = load_field_artifact(tmp.name, threads=threads)
        field.artifact_dir = tmp  # the artifact lives as long as the field
    field.ir = ir
    field.seconds = {"trace": t1 - t0, "passes": t2 - t1, "lower": time.perf_counter() - t2}
    return field


def _idle_session(path: Path, threads: int | None):
    """An onnxruntime session whose pool threads sleep between runs. By default they spin after each run, and between
    the field's runs the grid bookkeeping and the adaptive-KV planner run in torch on the same cores. (The sessions
    `load_artifact` opens, after checking the files, spin; they are never run.)"""
    options = ort.SessionOptions()
    options.log_severity_level = 3
    if threads is not None:
        options.intra_op_num_threads, options.inter_op_num_threads = int(threads), 1
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def load_field_artifact(path: str | Path, *, threads: int | None = 2) -> LoweredField:
    """Drive an ONNX artifact of a volume-compiled field decoder with onnxruntime (no PyTorch model needed)."""
    try:
        art = load_artifact(path, threads=threads, providers=["CPUExecutionProvider"])
    except ArtifactError as e:
        raise ValueError(f"{path}: {e}") from None
    settings = art.runtime_settings
    rec = dict(settings.get(VOLUME_ATTR.removeprefix("runtime."), {}))
    if "forward" in art.functions and "functions" not in rec:
        # compiled without volume passes: @forward(points, latents) as traced
        spec = art.spec("forward")
        rec = {"field": {"function": "forward", "query_input": 0, "query_dim": 1},
               "functions": {"forward": {"inputs": spec.input_names, "outputs": spec.output_names,
                                         "query": spec.input_names[0]}}}
    missing = [f for f in rec.get("functions", {}) if f not in art.functions]
    if not rec.get("functions") or missing:
        raise ValueError(f"{path} is not a field-decoder artifact (it lacks "
                         f"{', '.join(missing) or 'the volume record and @forward'}); compile one with "
                         "`elision compile MODEL --passes 'hoist-invariants,sparse-volume' --emit onnx -o DIR`")
    runners, shapes = {}, {}
    for name, sig in rec["functions"].items():
        spec = art.spec(name)
        if len(spec.inputs) != len(sig["inputs"]):
            raise ValueError(f"{path}: function {name!r} takes {len(spec.inputs)} inputs, its record lists "
                             f"{len(sig['inputs'])}; compile the artifact again")
        session = _idle_session(art.path / spec.file, threads)
        runners[name] = ort_runner(session, spec.input_names, spec.output_names)
        shapes.update({ir_name: t.shape for ir_name, t in zip(sig["inputs"], spec.inputs)})
    return LoweredField(rec, runners, _latents_shape(shapes, rec), backend="onnxruntime", pipeline=art.pipeline)


# ------------------------------------------------------------------------------------------ memoisation

_COMPILED: "weakref.WeakKeyDictionary[torch.nn.Module, dict]" = weakref.WeakKeyDictionary()


def _weights_state(model: torch.nn.Module) -> tuple:
    """Changes when a weight is replaced, moved or updated in place (a compiled field may read stale copies)."""
    return tuple((t.data_ptr(), t._version, t.dtype, str(t.device))
                 for t in [*model.parameters(), *model.buffers()])


def compiled_field(model: torch.nn.Module, passes: str = DEFAULT_PIPELINE, *, backend: str = "torch",
                   latents: torch.Tensor | None = None, **options: Any) -> LoweredField:
    """`compile_field`, memoised per model object, pipeline and backend (recompiled when the weights change)."""
    spec = ",".join(p.spec() for p in parse_pipeline(passes))
    cache = _COMPILED.setdefault(model, {})
    key = (spec, backend, None if latents is None else tuple(latents.shape[-2:]), tuple(sorted(options.items())))
    state = _weights_state(model)
    hit = cache.get(key)
    if hit is None or hit[0] != state:
        cache[key] = (state, compile_field(model, passes, backend=backend, latents=latents, **options))
    return cache[key][1]
