"""Volume decoding runtime for VecSet-style shape decoders (dense, hierarchical, adaptive KV, meshing).

Entry point: `decode_volume(model_or_decoder, latents, resolution, passes=DEFAULT_PIPELINE)`.
"""
from __future__ import annotations

from typing import Any

import torch

from elision.apps.volume.decode import (SparseVolumeOptions, VolumeError, VolumeResult, check_memory,
                                           decode_dense, decode_sparse, level_schedule)
from elision.apps.volume.field import FieldDecoder, TorchFieldDecoder
from elision.apps.volume.pipeline import (DEFAULT_PIPELINE, PublishedFieldDecoder, VolumePlan,
                                             parse_volume_pipeline)

__all__ = ["decode_volume", "VolumeResult", "VolumeError", "SparseVolumeOptions", "VolumePlan",
           "parse_volume_pipeline", "DEFAULT_PIPELINE", "TorchFieldDecoder", "PublishedFieldDecoder",
           "FieldDecoder", "check_memory", "level_schedule", "decoder_for"]


def decoder_for(model: Any, plan: VolumePlan) -> FieldDecoder:
    """A torch VecSetField -> the decoder the plan asks for; a FieldDecoder passes through."""
    from elision.models.vecset import VecSetField
    if isinstance(model, VecSetField):
        return TorchFieldDecoder(model) if plan.hoist else PublishedFieldDecoder(model)
    return model


def decode_volume(model: Any, latents: torch.Tensor, resolution: int, passes: str | VolumePlan = DEFAULT_PIPELINE,
                  *, chunk: int = 32768, progress=None, bounds: float = 1.01) -> VolumeResult:
    plan = parse_volume_pipeline(passes) if isinstance(passes, str) else passes
    check_memory(resolution)
    if plan.check_independence and (plan.sparse or plan.kv) and isinstance(model, torch.nn.Module):
        from elision.analysis.query_independence import cached_query_independence
        param = next(model.parameters())  # trace where and in the dtype the model runs
        example = ((torch.rand(1, 8, 3) * 2 - 1).to(param.device, param.dtype),
                   latents.reshape(1, *latents.shape[-2:]).to(param.device, param.dtype))
        report = cached_query_independence(model, example)
        if not report.ok:
            raise VolumeError("refusing sparse decoding: " + report.explain() +
                              "\nuse --passes '' (dense decoding) for this decoder")
    decoder = decoder_for(model, plan)
    lip = getattr(model, "lipschitz", None)
    if plan.sparse is not None:
        return decode_sparse(decoder, latents, resolution, plan.sparse, bounds=bounds, chunk=chunk, kv=plan.kv,
                             lipschitz=lip, progress=progress)
    return decode_dense(decoder, latents, resolution, bounds=bounds, chunk=chunk, kv=plan.kv, progress=progress)
