"""What the volume loop drives: a field decoder split into per-shape and per-query work.

`FieldDecoder` is the protocol: `prepare(latents)` does the shape-invariant work once and `evaluate(state, points)`
maps query points [N, 3] to field values [N]. A decoder whose cross-attention can be restricted per tile of queries
(`GatheredFieldDecoder`) also runs adaptive KV selection. The compiled decoders (`elision.apps.volume.lowered`)
implement both with the functions the volume passes produce; tests drive analytic fields through the same protocol.
"""
from __future__ import annotations

from typing import Any, Callable, Protocol, runtime_checkable

import torch


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
