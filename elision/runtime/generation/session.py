"""The step a decoding loop drives: a model plus the KV cache it owns, extended by token trees.

The draft -> verify -> accept -> commit loop is written once (`elision.runtime.generation.loop.decode`), against this
protocol; the torch backend (`elision.apps.specdec.session.KVSession`) and the ONNX Runtime backends
(`ort_step_session.OrtStepSession`, `ort_verify_session.OrtVerifySession`) differ only in how they implement it.
Logits may be any array indexable as [b, i] with `.argmax(-1)` (a numpy array, or a torch tensor the loop moves to
numpy row by row); they need to stay valid only until the next call.

    session.prefill([[5, 9, 2], [7]])        # right-padded prompts -> logits [B, Lmax, V]; all prompt tokens cached
    session.extend([tree_0, None])           # one forward over each active sequence's tree -> logits [B, n, V]
    session.commit([[0, 2, 3], []])          # keep those nodes (root first) of the last extension, per sequence
    session.rollback()                       # or forget the last extension entirely (timing probes)
"""
from __future__ import annotations

from typing import Any, Protocol, Sequence

from elision.runtime.generation.tree import TokenTree


class TreeSession(Protocol):
    """A batch of sequences with their KV cache; node 0 of every tree is the pending root token."""

    @property
    def batch_size(self) -> int: ...

    @property
    def seq_lens(self) -> list[int]:
        """Committed tokens per sequence (the position the next root sits at)."""
        ...

    def prefill(self, prompts: Sequence[Sequence[int]]) -> Any:
        """Run right-padded prompts; logits [B, Lmax, V]. Every prompt token stays in the cache."""
        ...

    def extend(self, trees: Sequence[TokenTree | None]) -> Any:
        """One forward over every sequence's tree (None: an inactive sequence); logits [B, n, V]."""
        ...

    def extend_chains(self, chains: Sequence[Sequence[int]]) -> Any:
        """Causal chains of different lengths (empty: inactive); logits [B, n, V]."""
        ...

    def commit(self, keep: Sequence[Sequence[int]]) -> None:
        """Keep, per sequence, nodes `keep[b]` of the last extension (indices in path order); drop the rest."""
        ...

    def rollback(self) -> None:
        """Forget the last extension entirely."""
        ...


__all__ = ["TreeSession"]
