"""What both ONNX Runtime `TreeSession`s share: per-sequence cache lengths, and prefill / extend / extend_chains
expressed through one padded-batch forward (`_run`) that each session implements for its graph form."""
from __future__ import annotations

from typing import Sequence

import numpy as np

from elision.runtime.generation.tree import TokenTree
from elision.runtime.generation.tree_batch import TreeBatch, chain_batch, tree_batch

__all__ = ["BatchedTreeSession", "KVCacheOverflow"]


class KVCacheOverflow(ValueError):
    """A step would write past the end of the preallocated cache."""


class BatchedTreeSession:
    """`lengths[b]`: committed tokens of sequence b; `_starts`: the lengths when the last extension ran."""

    def __init__(self, batch_size: int):
        self.lengths = np.zeros(batch_size, dtype=np.int64)
        self._starts = self.lengths.copy()

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def seq_lens(self) -> list[int]:
        return self.lengths.tolist()

    def prefill(self, prompts: Sequence[Sequence[int]]):
        logits = self.extend_chains(prompts)
        self.commit([list(range(len(p))) for p in prompts])
        return logits

    def extend(self, trees: Sequence[TokenTree | None]):
        return self._run(tree_batch(trees))

    def extend_chains(self, chains: Sequence[Sequence[int]]):
        return self._run(chain_batch(chains))

    def _run(self, batch: TreeBatch):
        raise NotImplementedError

    def commit(self, keep: Sequence[Sequence[int]]) -> None:
        raise NotImplementedError
