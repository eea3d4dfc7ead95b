"""Glue between elision's IR and its lowerings: ONNX artifacts, ORT runners, MLIR text.

Called by the CLI (`elision compile --emit onnx|mlir`, `--verify`) and the Python API (`target="onnxruntime"`):

  emit_onnx(ir, lm, out_dir) -> [files]        every IR function -> one .onnx, shared weights, manifest
  run_onnx_artifact(out_dir, fn, inputs)       run an artifact function on torch tensors -> tuple of tensors
  ort_runner(ir, fn_name, **options)           callable(*tensors) -> tuple, running `fn_name` in ORT
  emit_mlir(ir, lm, out_dir) -> [files]        each IR function through torch-mlir's FX importer

Example inputs for functions other than the traced one (e.g. a decode step added by a pass) are
synthesized from the IR input types: symbolic dims take the traced example's sizes where names match,
other symbols get distinct small sizes >= 2.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["emit_onnx", "run_onnx_artifact", "ort_runner", "emit_mlir", "example_inputs_for", "function_entries"]


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
    from elision.ir.symbolic import evaluate, free_symbols

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
    from elision.ir.execute import to_fx

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
    from elision.lowering.onnx_export import export_onnx

    names = {}
    primary = {"causal-lm": "logits", "encoder": "last_hidden_state"}.get(getattr(lm, "kind", ""), None)
    forward = ir.functions.get("forward")
    if primary and forward is not None and len(forward.outputs) == 1:
        names["forward"] = [primary]
    out = export_onnx(
        function_entries(ir, lm), out_dir, output_names=names,
        pipeline=str(ir.attrs.get("pipeline", "")),
        source_hash=str(ir.attrs.get("source_hash", "")),
        runtime_settings=_runtime_settings(ir, lm),
        ort_fusions=ort_fusions,
    )
    return sorted(p for p in Path(out).iterdir() if p.is_file())


def run_onnx_artifact(out_dir: Path, fn_name: str, inputs: Sequence[torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """Run function `fn_name` of an artifact on torch tensors (positional, in the function's input order)."""
    from elision.runtime.artifact import load_artifact

    artifact = load_artifact(out_dir)
    spec = artifact.spec(fn_name)
    feeds = {t.name: x.detach().cpu().numpy() for t, x in zip(spec.inputs, inputs)}
    outputs = artifact.run(fn_name, **feeds)
    return tuple(torch.from_numpy(outputs[name]) for name in spec.output_names)


def ort_runner(ir, fn_name: str, *, ort_fusions: bool = True, threads: int | None = None, **_: Any):
    """A callable(*tensors) -> tuple running IR function `fn_name` in ONNX Runtime (artifact in a temp dir)."""
    from elision.lowering.onnx_export import export_onnx
    from elision.ir.execute import to_fx
    from elision.runtime.artifact import load_artifact

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
    from elision.lowering.mlir_export import export_mlir

    written = []
    for name, (gm, examples, _) in function_entries(ir, lm).items():
        path = Path(out_dir) / f"{name}.mlir"
        export_mlir(gm, examples, path, output_type=output_type)
        written.append(path)
    return written
