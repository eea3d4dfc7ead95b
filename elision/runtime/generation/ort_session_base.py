"""What both ONNX Runtime `TreeSession`s share: per-sequence cache lengths, and prefill / extend / extend_chains
expressed through one padded-batch forward (`_run`) that each session implements for its graph form.

A forward covers a contiguous range of rows (sequences): `extend` and `extend_chains` the leading `len(trees)`
rows, `prefill(prompts, first=r)` (re)starts rows r .. r + len(prompts) - 1 alone; `commit` and `rollback` act on
the rows of the last forward. Continuous batching (`elision.runtime.generation.continuous`) keeps its live
sequences in the leading rows, prefills a newcomer in the next row and `move`s the last row into a finished one's.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Sequence

import numpy as np

from elision.runtime.generation.tree import TokenTree
from elision.runtime.generation.tree_batch import TreeBatch, chain_batch, tree_batch

__all__ = ["BatchedTreeSession", "KVCacheOverflow"]


class KVCacheOverflow(ValueError):
    """A step would write past the end of the preallocated cache."""


class BatchedTreeSession(ABC):
    """`lengths[b]`: committed tokens of sequence b; `_starts`: the lengths when the last extension ran."""

    kv: np.ndarray  # [kv tensors, batch, kv_heads, capacity, head_dim]

    def __init__(self, batch_size: int):
        self.lengths = np.zeros(batch_size, dtype=np.int64)
        self._starts = self.lengths.copy()
        self._rows = slice(0, batch_size)  # the rows of the last forward

    @property
    def batch_size(self) -> int:
        return len(self.lengths)

    @property
    def seq_lens(self) -> list[int]:
        return self.lengths.tolist()

    def prefill(self, prompts: Sequence[Sequence[int]], first: int = 0):
        """(Re)start rows first .. first + len(prompts) - 1 with these prompts; logits [len(prompts), Lmax, V]."""
        self.lengths[first : first + len(prompts)] = 0
        logits = self._run(chain_batch(prompts), first)
        self.commit([list(range(len(p))) for p in prompts])
        return logits

    def extend(self, trees: Sequence[TokenTree | None]):
        return self._run(tree_batch(trees), 0)

    def extend_chains(self, chains: Sequence[Sequence[int]]):
        return self._run(chain_batch(chains), 0)

    def move(self, src: int, dst: int) -> None:
        """Row `src`'s committed tokens (K/V and length) become row `dst`'s."""
        n = int(self.lengths[src])
        self.kv[:, dst, :, :n] = self.kv[:, src, :, :n]
        self.lengths[dst] = n

    def _rows_of(self, batch: TreeBatch, first: int) -> slice:
        return self._rows_of_count(len(batch.counts), first)

    def _rows_of_count(self, count: int, first: int = 0) -> slice:
        rows = slice(first, first + count)
        if first < 0 or rows.stop > self.batch_size:
            raise ValueError(f"got rows {first}..{rows.stop - 1} for a session of batch size {self.batch_size}")
        return rows

    @abstractmethod
    def _run(self, batch: TreeBatch, first: int):
        """One forward of `batch` over rows first .. first + len(batch.counts) - 1 (each graph form's own)."""

    @abstractmethod
    def commit(self, keep: Sequence[Sequence[int]]) -> None:
        """Keep each row's accepted path (each graph form's own cache layout)."""
