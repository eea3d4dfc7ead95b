"""`TreeSession` over the older `@verify` artifact form: the graph concatenates past and new K/V itself and returns
the new slices, which this session copies into its own numpy cache.

    verify(input_ids [B, n], positions [B, n], attn_bias [B, 1, n, past + n], past_k_0, past_v_0, ...)
        -> (logits, k_0, v_0, ...)     new K/V [B, kv_heads, n, head_dim]

Kept so artifacts compiled before the in-place step graph, and models whose attention does not fuse into
GroupQueryAttention, still run. Each step copies the cache into contiguous `[B, kv_heads, longest, head_dim]`
inputs (shorter sequences padded and masked), so it costs O(context) per step where the step graph costs O(1).
Only the kept nodes' K/V are written back (`commit`), so rollback is free.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from elision.runtime.generation.ort_session_base import BatchedTreeSession, KVCacheOverflow
from elision.runtime.generation.tree_batch import TreeBatch, attention_bias

__all__ = ["OrtVerifySession"]


class OrtVerifySession(BatchedTreeSession):
    def __init__(self, session, *, kv_inputs: Sequence[str], output_names: Sequence[str], kv_heads: int,
                 head_dim: int, batch_size: int, capacity: int, dtype: np.dtype = np.float32,
                 sliding_window: int | None = None):
        super().__init__(batch_size)
        self.session = session
        self.kv_inputs = list(kv_inputs)
        self.output_names = list(output_names)
        self.capacity = int(capacity)
        self.dtype = np.dtype(dtype)
        self.window = sliding_window
        self.kv = np.zeros((len(self.kv_inputs), batch_size, kv_heads, self.capacity, head_dim), dtype=self.dtype)
        self._new: list[np.ndarray] = []

    def commit(self, keep: Sequence[Sequence[int]]) -> None:
        for i, nodes in enumerate(keep):
            b = self._rows.start + i
            start, m = int(self._starts[b]), len(nodes)
            if start + m > self.capacity:
                raise KVCacheOverflow(f"KV cache overflow: {start + m} slots needed but the cache holds {self.capacity}")
            index = np.asarray(nodes, dtype=np.int64)
            for buf, new in zip(self.kv, self._new):
                buf[b, :, start : start + m] = new[i][:, index]  # not new[i, :, index]: that puts the index first
            self.lengths[b] = start + m

    def rollback(self) -> None:
        """Nothing to undo: K/V reach the cache only through `commit`."""

    def _run(self, batch: TreeBatch, first: int):
        rows = self._rows_of(batch, first)
        starts = self.lengths[rows].copy()
        longest = int(starts.max())
        bias = attention_bias(batch, starts, np.full_like(starts, longest), longest + batch.width, self.dtype,
                              self.window)
        feeds = {"input_ids": batch.tokens, "positions": starts[:, None] + batch.depths, "attn_bias": bias}
        # onnxruntime reads C-contiguous memory; a [:, :, :length] view of the buffer is not
        feeds.update((name, np.ascontiguousarray(buf[rows, :, :longest])) for name, buf in zip(self.kv_inputs, self.kv))
        out = self.session.run(self.output_names, feeds)
        self._new, self._starts[rows], self._rows = out[1:], starts, rows
        return out[0]
