"""Volume decoding of VecSet-style shape decoders: compiled field decoders driven coarse to fine, meshing.

Entry point: `decode_volume(model, latents, resolution, passes=DEFAULT_PIPELINE)` compiles the model with the volume
passes (`elision.passes.volume`) once per model and pipeline, lowers it to torch or ONNX Runtime, and runs the dense
or hierarchical (sparse-volume) loop with adaptive KV (adaptive-kv) as the passes planned.
"""
from __future__ import annotations

import torch

from elision.apps.volume.compile import (BACKENDS, DEFAULT_PIPELINE, compile_field, compiled_field,
                                         load_field_artifact, trace_field)
from elision.apps.volume.decode import (VolumeError, VolumeResult, check_memory, decode_dense, decode_sparse,
                                        level_schedule)
from elision.apps.volume.field import FieldDecoder, GatheredFieldDecoder
from elision.apps.volume.lowered import LoweredField
from elision.passes.pipeline import parse_pipeline
from elision.passes.volume import AdaptiveKVOptions, SparseVolumeOptions

__all__ = ["decode_volume", "VolumeResult", "VolumeError", "SparseVolumeOptions", "AdaptiveKVOptions",
           "DEFAULT_PIPELINE", "BACKENDS", "FieldDecoder", "GatheredFieldDecoder", "LoweredField", "check_memory",
           "level_schedule", "compile_field", "compiled_field", "load_field_artifact", "trace_field"]


def decode_volume(model: torch.nn.Module | LoweredField, latents: torch.Tensor, resolution: int,
                  passes: str | None = None, *, chunk: int = 32768, progress=None, bounds: float = 1.01,
                  backend: str = "torch") -> VolumeResult:
    """Decode `latents` to a (resolution+1)^3 field grid.

    `model` is a field decoder module (compiled here with `passes`, default DEFAULT_PIPELINE, for `backend`, and
    memoised) or a field compiled before (`compile_field`, `load_field_artifact`), whose own plan is used.
    """
    check_memory(resolution)
    if isinstance(model, LoweredField):
        if passes is not None and ",".join(p.spec() for p in parse_pipeline(passes)) != model.pipeline:
            raise VolumeError(f"this field decoder was compiled with passes {model.describe()!r}; compile it again "
                              f"to decode with {passes!r}")
        field = model
    else:
        field = compiled_field(model, DEFAULT_PIPELINE if passes is None else passes, backend=backend,
                               latents=latents)
    sparse, kv = field.sparse_options, field.kv_options
    if sparse is not None:
        return decode_sparse(field, latents, resolution, sparse, bounds=bounds, chunk=chunk, kv=kv, progress=progress)
    return decode_dense(field, latents, resolution, bounds=bounds, chunk=chunk, kv=kv, progress=progress)
