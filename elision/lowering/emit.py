"""Glue between elision's IR and its lowerings: ONNX artifacts, ORT runners, MLIR text.

Called by the CLI (`elision compile --emit onnx|mlir`, `--verify`) and the Python API (`target="onnxruntime"`):

  emit_onnx(ir, lm, out_dir) -> [files]        every IR function -> one .onnx, shared weights, manifest
  run_onnx_artifact(out_dir, fn, inputs)       run an artifact function on torch tensors -> tuple of tensors
  ort_runner(ir, fn_name, **options)           callable(*tensors) -> tuple, running `fn_name` in ORT
  emit_mlir(ir, lm, out_dir) -> [files]        each IR function through torch-mlir's FX importer
  emit_ir / emit_fx(ir, out_dir) -> [files]     textual IR + safetensors (+ the FX code of every function)
  emit(kind, ir, lm, out_dir)                  one of the above by name (`elision compile --emit KIND`)

Every writer builds its output in a temporary sibling directory and renames it into place at the end
(`elision.runtime.outputs.atomic_directory`): a failure or Ctrl-C leaves a previous output as it was.

Example inputs for functions other than the traced one (e.g. a decode step added by a pass) are
synthesized from the IR input types: symbolic dims take the traced example's sizes where names match,
other symbols get distinct small sizes >= 2.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

from elision.ir.execute import to_fx
from elision.ir.serialize import IR_FILE, PARAMS_FILE, save_module
from elision.ir.symbolic import evaluate, free_symbols
from elision.lowering.mlir_export import export_mlir
from elision.lowering.onnx_export import export_onnx
from elision.runtime.artifact import MANIFEST_NAME, load_artifact
from elision.runtime.outputs import atomic_directory
from elision.passes.tokens.outputs import token_outputs

__all__ = ["EMITS", "emit", "emit_ir", "emit_fx", "emit_onnx", "run_onnx_artifact", "ort_runner", "emit_mlir",
           "example_inputs_for", "function_entries"]

EMITS = ("ir", "fx", "onnx", "mlir")
IR_MARKER = "module.ir"  # what a previous IR / FX output holds (it may be replaced as a whole)
MLIR_MARKER = "*.mlir"


def _known_sizes(ir, lm) -> dict[str, int]:
    """Symbol -> size, read off the traced example inputs and the forward function's input types."""
    sizes: dict[str, int] = {}
    fn = ir.functions.get("forward") or next(iter(ir.functions.values()))
    tensors = [x for x in (lm.example_inputs if lm is not None else ()) if isinstance(x, torch.Tensor)]
    for value, example in zip(fn.inputs, tensors):
        for dim, size in zip(getattr(value.type, "shape", ()), example.shape):
            if isinstance(dim, str) and dim.isidentifier():
                sizes.setdefault(dim, int(size))
    return sizes


def example_inputs_for(ir, fn_name: str, lm=None) -> tuple[tuple, dict]:
    """(example tensors, dynamic dims {input_index: {axis: name}}) for IR function `fn_name`."""
    fn = ir.functions[fn_name]
    if lm is not None and fn_name == "forward" and len(lm.example_inputs) == len(fn.inputs):
        return tuple(lm.example_inputs), dict(lm.dynamic_dims or {})
    sizes = _known_sizes(ir, lm)
    next_size = 3
    examples, dynamic = [], {}
    for index, value in enumerate(fn.inputs):
        ty = value.type
        if not hasattr(ty, "shape"):
            raise ValueError(f"function {fn_name!r} input %{value.name} is not a tensor ({ty}); ONNX functions take tensors")
        shape = []
        for axis, dim in enumerate(ty.shape):
            if isinstance(dim, int):
                shape.append(dim)
                continue
            for sym in sorted(free_symbols(dim)):
                if sym not in sizes:
                    sizes[sym] = next_size
                    next_size += 1
            shape.append(int(evaluate(dim, sizes)))
            dynamic.setdefault(index, {})[axis] = dim
        dtype = ty.torch_dtype
        if dtype.is_floating_point:
            examples.append(torch.randn(shape, generator=torch.Generator().manual_seed(index)).to(dtype))
        else:
            examples.append(torch.zeros(shape, dtype=dtype))
    return tuple(examples), dynamic


def function_entries(ir, lm=None) -> dict[str, tuple]:
    """IR functions as `export_onnx` entries: (fx module, example inputs, dynamic dims)."""
    entries = {}
    for name in ir.functions:
        examples, dynamic = example_inputs_for(ir, name, lm)
        entries[name] = (to_fx(ir, name), examples, dynamic)
    return entries


def _runtime_settings(ir, lm) -> dict[str, Any]:
    settings: dict[str, Any] = {"kind": getattr(lm, "kind", "generic") if lm is not None else "generic"}
    config = getattr(getattr(lm, "model", None), "config", None)
    for key in ("eos_token_id", "bos_token_id", "pad_token_id", "vocab_size", "max_position_embeddings"):
        value = getattr(config, key, None)
        if isinstance(value, (int, list)):
            settings[key] = value
    for key, value in ir.attrs.items():
        if key.startswith("runtime.") or key in ("inputs", "dynamic_dims"):
            settings[key.removeprefix("runtime.")] = value
    return settings


def emit_onnx(ir, lm, out_dir: Path, *, ort_fusions: bool = True) -> list[Path]:
    """Write the ONNX artifact for every IR function; returns the written files."""
    names = {}
    primary = {"causal-lm": "logits", "encoder": "last_hidden_state"}.get(getattr(lm, "kind", ""), None)
    forward = ir.functions.get("forward")
    marks = token_outputs(ir, "forward")  # a pruned/merged encoder: kept_mask (+ token_sizes) after its own output
    if primary and forward is not None and list(range(len(forward.outputs))) == [0, *marks.values()]:
        names["forward"] = [primary, *marks]  # ONNX names must differ from the inputs: kept_mask, not attention_mask
    out = export_onnx(
        function_entries(ir, lm), out_dir, output_names=names,
        pipeline=str(ir.attrs.get("pipeline", "")),
        source_hash=str(ir.attrs.get("source_hash", "")),
        runtime_settings=_runtime_settings(ir, lm),
        ort_fusions=ort_fusions,
        dtype=weights_dtype(ir),
    )
    return sorted(p for p in Path(out).iterdir() if p.is_file())


def weights_dtype(ir) -> str:
    """The floating dtype of the IR's weights as a name ('float32' for a module without floating weights)."""
    floating = [t.dtype for t in ir.params.values() if t.is_floating_point()]
    return str(floating[0]).removeprefix("torch.") if floating else "float32"


def run_onnx_artifact(out_dir: Path, fn_name: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Run function `fn_name` of an artifact on torch tensors (positional, in the function's input order)."""
    artifact = load_artifact(out_dir)
    spec = artifact.spec(fn_name)
    feeds = {t.name: x.detach().cpu().numpy() for t, x in zip(spec.inputs, inputs)}
    outputs = artifact.run(fn_name, **feeds)
    return tuple(torch.from_numpy(outputs[name]) for name in spec.output_names)


def ort_runner(ir, fn_name: str, *, ort_fusions: bool = True, threads: int | None = None, **_: Any):
    """A callable(*tensors) -> tuple running IR function `fn_name` in ONNX Runtime (artifact in a temp dir)."""
    examples, dynamic = example_inputs_for(ir, fn_name, None)
    tmp = tempfile.TemporaryDirectory(prefix="elision-ort-")
    export_onnx({fn_name: (to_fx(ir, fn_name), examples, dynamic)}, tmp.name, pipeline=str(ir.attrs.get("pipeline", "")),
                source_hash=str(ir.attrs.get("source_hash", "")), runtime_settings={}, ort_fusions=ort_fusions)
    artifact = load_artifact(tmp.name, threads=threads)
    spec = artifact.spec(fn_name)

    def run(*inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        feeds = {t.name: x.detach().cpu().numpy() for t, x in zip(spec.inputs, inputs)}
        outputs = artifact.run(fn_name, **feeds)
        return tuple(torch.from_numpy(outputs[name]) for name in spec.output_names)

    run._tmpdir = tmp  # keeps the artifact directory alive as long as the runner
    run.artifact = artifact
    return run


def emit_mlir(ir, lm, out_dir: Path, *, output_type: str = "linalg-on-tensors") -> list[Path]:
    """Write `<fn>.mlir` for every IR function through torch-mlir's FX importer."""
    names = []
    with atomic_directory(out_dir, marker=MLIR_MARKER) as tmp:
        for name, (gm, examples, _) in function_entries(ir, lm).items():
            export_mlir(gm, examples, tmp / f"{name}.mlir", output_type=output_type)
            names.append(f"{name}.mlir")
    return [Path(out_dir) / n for n in names]


def emit_ir(ir, out_dir: Path) -> list[Path]:
    """Write the textual IR (`module.ir`) and its parameters (`params.safetensors`)."""
    with atomic_directory(out_dir, marker=IR_MARKER) as tmp:
        save_module(ir, tmp)
    return [Path(out_dir) / IR_FILE, Path(out_dir) / PARAMS_FILE]


def emit_fx(ir, out_dir: Path) -> list[Path]:
    """The IR output plus `<fn>.py`, the FX code of every IR function (parameters: params.safetensors)."""
    names = []
    with atomic_directory(out_dir, marker=IR_MARKER) as tmp:
        save_module(ir, tmp)
        for name in ir.functions:
            code = to_fx(ir, name).code
            (tmp / f"{name}.py").write_text(f"# FX code of IR function @{name} (parameters: params.safetensors)\n" + code)
            names.append(f"{name}.py")
    return [Path(out_dir) / n for n in names]


def emit(kind: str, ir, lm, out_dir: Path) -> list[Path]:
    """`elision compile --emit KIND`: write `ir`, `fx`, `onnx` or `mlir` into `out_dir`; returns the written files."""
    if kind == "ir":
        return emit_ir(ir, out_dir)
    if kind == "fx":
        return emit_fx(ir, out_dir)
    if kind == "onnx":
        return emit_onnx(ir, lm, out_dir)
    if kind == "mlir":
        return emit_mlir(ir, lm, out_dir)
    raise ValueError(f"unknown emit kind {kind!r}; choose one of {', '.join(EMITS)}")


def output_marker(kind: str) -> str:
    """The file a previous output of `kind` holds: `-o` may name such a directory (it is replaced as a whole)."""
    return {"onnx": MANIFEST_NAME, "mlir": MLIR_MARKER}.get(kind, IR_MARKER)
