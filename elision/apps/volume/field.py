"""Field decoders: the per-shape / per-query split of a VecSet geometry decoder.

`FieldDecoder` is the protocol the volume loop drives: `prepare(latents)` does the shape-invariant work
once (latent self-attention stack, K/V projections) and `evaluate(state, points)` maps query points
[N, 3] to field values [N]. That split is the hoist-invariants rewrite; the compiler's `latents_side` /
`field_chunk` functions implement the same protocol. Decoders that can also attend to a chosen subset of
the latent tokens per tile of queries (`GatheredFieldDecoder`) run adaptive KV selection.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol, runtime_checkable

import torch
import torch.nn.functional as F

from elision.models.vecset import VecSetField


@runtime_checkable
class FieldDecoder(Protocol):
    def prepare(self, latents: torch.Tensor) -> Any: ...

    def evaluate(self, state: Any, points: torch.Tensor) -> torch.Tensor: ...


@runtime_checkable
class GatheredFieldDecoder(FieldDecoder, Protocol):
    """A field decoder whose single cross-attention can be restricted per tile of queries (adaptive KV):
    the planner probes with `query_heads` of a few queries per block, then every tile of queries attends
    only to its own token ids."""

    def kv(self, state: Any) -> tuple[torch.Tensor, torch.Tensor]: ...  # K, V [heads, M, d]

    def query_heads(self, state: Any, points: torch.Tensor) -> torch.Tensor: ...  # [N,3] -> q [heads, N, d]

    def evaluate_gathered(self, state: Any, points: torch.Tensor,
                          tokens: torch.Tensor) -> torch.Tensor: ...  # [T,C,3], [heads,T,k] -> [T,C]


@dataclass
class KVState:
    k: torch.Tensor  # [heads, M, d]
    v: torch.Tensor  # [heads, M, d]


class TorchFieldDecoder:
    """Eager-PyTorch implementation of the split for a `VecSetField` (batch of one shape).

    Runs where the model's parameters live (CPU or CUDA, in their dtype): points and latents are moved
    there on the way in; the field values the evaluator collects come back as fp32 on the CPU, where the
    grid bookkeeping runs.
    """

    def __init__(self, model: VecSetField) -> None:
        self.model = model.eval()
        self.geo = model.geo_decoder
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype

    @torch.inference_mode()
    def prepare(self, latents: torch.Tensor) -> KVState:
        if latents.dim() == 2:
            latents = latents.unsqueeze(0)
        expected = (self.model.config.num_latents, self.model.config.embed_dim)
        if latents.dim() != 3 or latents.shape[0] != 1 or tuple(latents.shape[1:]) != expected:
            raise ValueError(f"latents must have shape [1, {expected[0]}, {expected[1]}] for this model, "
                             f"got {list(latents.shape)}")
        z = self.model.transformer(self.model.post_kl(latents.to(self.device, self.dtype)))
        k, v = self.geo.latent_kv(z)
        return KVState(k[0].contiguous(), v[0].contiguous())

    def kv(self, state: KVState) -> tuple[torch.Tensor, torch.Tensor]:
        return state.k, state.v

    def _prologue(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x, q = self.geo.query_heads(points.reshape(1, -1, 3).to(self.device, self.dtype))
        return x, q[0]

    @torch.inference_mode()
    def query_heads(self, state: KVState, points: torch.Tensor) -> torch.Tensor:
        return self._prologue(points)[1]

    @torch.inference_mode()
    def evaluate(self, state: KVState, points: torch.Tensor) -> torch.Tensor:
        x, q = self._prologue(points)
        return self.geo.epilogue(x, attention(q, state.k, state.v).unsqueeze(0))[0, :, 0]

    @torch.inference_mode()
    def evaluate_gathered(self, state: KVState, points: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        from elision.apps.volume.adaptive_kv import gathered_attention  # (it imports this module)
        tiles, c = points.shape[:2]
        x, q = self._prologue(points)
        attn = gathered_attention(q.view(q.shape[0], tiles, c, -1), state.k, state.v, tokens.to(self.device))
        return self.geo.epilogue(x, attn.reshape(1, q.shape[0], tiles * c, -1))[0, :, 0].view(tiles, c)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over [heads, N, d] tensors. Called with a leading batch axis: on CPU, 3-D inputs take the
    unfused math path, about 8x slower than the fused kernel 4-D inputs get (measured, torch 2.x)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


ProgressFn = Callable[[int], None]


def evaluate_chunked(decoder: FieldDecoder, state: Any, points: torch.Tensor, chunk: int,
                     progress: ProgressFn | None = None) -> torch.Tensor:
    """Evaluate `points` [N,3] in chunks of at most `chunk` queries (bounded memory); returns [N] fp32."""
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, got {chunk}")
    out = torch.empty(points.shape[0], dtype=torch.float32)
    for start in range(0, points.shape[0], chunk):
        stop = min(start + chunk, points.shape[0])
        out[start:stop] = torch.as_tensor(decoder.evaluate(state, points[start:stop])).float().reshape(-1).cpu()
        if progress is not None:
            progress(stop - start)
    return out
