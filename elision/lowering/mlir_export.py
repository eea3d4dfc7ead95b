"""`--emit mlir`: write a model (or an optimized FX graph) as MLIR through torch-mlir's FX importer.

Output types: "linalg-on-tensors" (linalg + arith + math + tensor dialects), "stablehlo", "tosa", or
"torch" (the torch dialect before backend lowering). torch-mlir is an optional extra
(`pip install 'elision[mlir]'`); without it `export_mlir` raises a `MlirUnavailableError` saying so.

Pitfall handled here (feasibility-notes.md): torch-mlir's importer cannot map non-persistent buffers
(e.g. Llama's rotary `inv_freq`) -- "Could not find state mapping for buffer". They are made persistent
for the duration of the export and restored afterwards, so the caller's module is left as it was.
"""
from __future__ import annotations

import contextlib
import io
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch

from elision.errors import ElisionError, MissingExtraError

__all__ = ["export_mlir", "parse_mlir", "MlirUnavailableError", "MlirExportError", "OUTPUT_TYPES"]

OUTPUT_TYPES = ("linalg-on-tensors", "stablehlo", "tosa", "torch")


class MlirUnavailableError(MissingExtraError):
    """torch-mlir is not installed; the message says how to install it."""


class MlirExportError(ElisionError, RuntimeError):
    """torch-mlir could not import or lower the graph; the message says why."""


def _torch_mlir():
    try:  # torch-mlir: optional (extra `mlir`), only MLIR emission needs it
        from torch_mlir import fx
        from torch_mlir.compiler_utils import OutputType
    except ImportError as e:
        raise MlirUnavailableError("MLIR emission (--emit mlir)", "mlir", e.name or "torch_mlir") from None
    return fx, OutputType


@contextlib.contextmanager
def _persistent_buffers(model: torch.nn.Module) -> Iterator[None]:
    """Temporarily mark every non-persistent buffer persistent (torch-mlir only maps state-dict buffers)."""
    saved = {}
    for module in model.modules():
        if module._non_persistent_buffers_set:
            saved[module] = set(module._non_persistent_buffers_set)
            module._non_persistent_buffers_set.clear()
    try:
        yield
    finally:
        for module, names in saved.items():
            module._non_persistent_buffers_set.update(names)


def _decomposition_table() -> dict:
    """torch-mlir's default decompositions plus elision's custom ops -> their torch reference bodies.

    torch-mlir has no lowering for `torch.ops.elision.*` (Triton-backed custom ops); decomposing them
    into the reference implementation keeps the optimized graph's semantics in plain ATen.
    """
    from torch_mlir.extras.fx_decomp_util import get_decomposition_table  # optional (extra `mlir`)

    # here, not at module top: the kernel ops import triton, which only MLIR emission of elision ops needs
    from elision.kernels import ops, reference

    table = dict(get_decomposition_table())
    for name in getattr(ops, "OP_NAMES", ()):
        body = getattr(reference, name, None)
        packet = getattr(torch.ops.elision, name, None) if hasattr(torch.ops, "elision") else None
        if body is not None and packet is not None:
            table[packet.default] = body
    return table


class _TupleOutputs(torch.nn.Module):
    """Wraps a module so MLIR functions always return a flat tuple of tensors."""

    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, *args):
        out = self.inner(*args)
        if isinstance(out, torch.Tensor):
            return (out,)
        return tuple(t for t in torch.utils._pytree.tree_leaves(out) if isinstance(t, torch.Tensor))


def export_mlir(
    model_or_gm: torch.nn.Module,
    example_inputs: Sequence[Any],
    out_path: str | Path,
    output_type: str = "linalg-on-tensors",
    *,
    func_name: str = "main",
) -> Path:
    """Import `model_or_gm` with torch-mlir's FX importer, lower to `output_type`, write the text to `out_path`."""
    if output_type not in OUTPUT_TYPES:
        raise MlirExportError(f"unknown MLIR output type {output_type!r}; choose one of {', '.join(OUTPUT_TYPES)}")
    fx, OutputType = _torch_mlir()
    if not isinstance(model_or_gm, torch.nn.Module):
        raise MlirExportError(f"export_mlir expects an nn.Module or fx.GraphModule, got {type(model_or_gm).__name__}")
    model = model_or_gm.eval()
    wrapper = _TupleOutputs(model).eval()
    try:
        with _persistent_buffers(model), torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):
            # (the importer prints "Importing frozen program" to stdout; keep CLI output clean)
            module = fx.export_and_import(wrapper, *example_inputs, output_type=OutputType.get(output_type),
                                          func_name=func_name, decomposition_table=_decomposition_table())
    except MlirUnavailableError:
        raise
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise MlirExportError(f"torch-mlir could not lower the graph to {output_type}: {type(e).__name__}: {first[:300]}") from e
    text = str(module)
    _check_round_trip(module, text, output_type)
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return out


def _check_round_trip(module, text: str, output_type: str) -> None:
    """Re-parse what is about to be written, so a malformed file is an error here and not downstream.

    The generic op form is parsed with unregistered dialects allowed: this torch-mlir build has no Python
    bindings for `stablehlo` or `tm_tensor` (torch-mlir's scan/sort ops), whose ops are then checked
    structurally (operands, regions, types); every registered dialect is verified in full.
    """
    from torch_mlir import ir  # optional (extra `mlir`)

    try:
        context = ir.Context()
        context.allow_unregistered_dialects = True
        parsed = ir.Module.parse(module.operation.get_asm(print_generic_op_form=True), context)
        parsed.operation.verify()
    except Exception as e:
        raise MlirExportError(f"torch-mlir produced {output_type} MLIR that does not parse back: {str(e).splitlines()[0]}") from e


def parse_mlir(text: str):
    """Parse MLIR text with torch-mlir's bindings (torch dialect registered); raises on malformed input."""
    _torch_mlir()  # a clear error first when torch-mlir (optional, extra `mlir`) is missing
    from torch_mlir import ir
    from torch_mlir.dialects import torch as torch_dialect

    context = ir.Context()
    torch_dialect.register_dialect(context)
    return ir.Module.parse(text, context)
