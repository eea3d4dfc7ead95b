"""`TreeSession` over the in-place *step* graph (`step_signature`): the KV cache never leaves its buffers.

One numpy array `[2 * layers, batch, kv_heads, capacity, head_dim]` holds every layer's keys and values; each
`[batch, kv_heads, capacity, head_dim]` slice is wrapped once in an OrtValue and bound as both `past_*` and
`present_*` of an IO binding, so GroupQueryAttention appends the new rows in place: no per-step concatenation,
copy or allocation of the cache. Per step only the small inputs are rebound (token ids, positions, the bias over
the rows actually read, sequence lengths) and the logits land in a reused buffer.

Sequences are ragged: sequence b has `seq_lens[b]` cached tokens, and its tree's K/V go to rows
`seq_lens[b] ..` (`query_seqlens` keeps padding rows out of the cache). `commit` keeps the accepted nodes with
one in-place gather per sequence (nothing when they are already a prefix, as for chains); `rollback` only moves
the lengths back. The arrays returned by `prefill`/`extend` are views of the reused logits buffer: valid until
the next call.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np
import onnxruntime as ort

from elision.runtime.generation import step_signature as sig
from elision.runtime.generation.ort_session_base import BatchedTreeSession, KVCacheOverflow
from elision.runtime.generation.tree_batch import TreeBatch, attention_bias

__all__ = ["OrtStepSession"]


class OrtStepSession(BatchedTreeSession):
    def __init__(self, session, *, layers: int, kv_heads: int, head_dim: int, vocab_size: int, batch_size: int,
                 capacity: int, dtype: np.dtype = np.float32, sliding_window: int | None = None):
        super().__init__(batch_size)
        self.session = session
        self.vocab_size = int(vocab_size)
        self.capacity = int(capacity)
        self.dtype = np.dtype(dtype)
        self.window = sliding_window
        self.kv = np.zeros((2 * layers, batch_size, kv_heads, self.capacity, head_dim), dtype=self.dtype)
        self._bindings: dict[tuple[int, int], tuple[ort.IOBinding, list]] = {}  # (first row, rows) -> binding
        self._logits = np.empty(0, dtype=self.dtype)
        self._logit_views: dict[tuple[int, int], tuple[np.ndarray, ort.OrtValue]] = {}

    # ------------------------------------------------------------------ TreeSession
    def _binding(self, first: int, rows: int) -> ort.IOBinding:
        """An IO binding whose past/present K/V are the rows first .. first + rows - 1 of the shared buffers (a
        contiguous view: batch is their leading axis), made once per row range."""
        found = self._bindings.get((first, rows))
        if found is None:
            binding, values = self.session.io_binding(), []
            for i in range(self.kv.shape[0]):
                layer, kind = divmod(i, 2)
                value = ort.OrtValue.ortvalue_from_numpy(self.kv[i, first : first + rows])
                values.append(value)  # the binding does not keep the OrtValue alive
                kind_name = ("key", "value")[kind]
                binding.bind_ortvalue_input(sig.past_name(layer, kind_name), value)
                binding.bind_ortvalue_output(sig.present_name(layer, kind_name), value)
            found = self._bindings[(first, rows)] = (binding, values)
        return found[0]

    def commit(self, keep: Sequence[Sequence[int]]) -> None:
        for i, nodes in enumerate(keep):
            b = self._rows.start + i
            start, m = int(self._starts[b]), len(nodes)
            if m and list(nodes) != list(range(m)):
                rows = start + np.asarray(nodes, dtype=np.int64)
                cache = self.kv[:, b]  # a view [2 * layers, kv_heads, capacity, head_dim] of sequence b
                # fancy indexing copies the source rows first, so overlapping source and destination are fine
                cache[:, :, start : start + m] = cache[:, :, rows]
            self.lengths[b] = start + m

    def rollback(self) -> None:
        self.lengths[self._rows] = self._starts[self._rows]

    # ------------------------------------------------------------------ one step
    def _logits_output(self, b: int, n: int) -> tuple[np.ndarray, ort.OrtValue]:
        """A [b, n, vocab] view of the reused logits buffer and its OrtValue (both kept per shape)."""
        size = b * n * self.vocab_size
        if self._logits.size < size:
            self._logits = np.empty(size, dtype=self.dtype)
            self._logit_views.clear()
        view = self._logit_views.get((b, n))
        if view is None:
            array = self._logits[:size].reshape(b, n, self.vocab_size)
            view = self._logit_views[(b, n)] = (array, ort.OrtValue.ortvalue_from_numpy(array))
        return view

    def _run(self, batch: TreeBatch, first: int):
        rows = self._rows_of(batch, first)
        starts = self.lengths[rows]
        ends = starts + batch.counts
        if int(ends.max()) > self.capacity:
            raise KVCacheOverflow(f"KV cache overflow: {int(ends.max())} slots needed but the cache holds "
                                  f"{self.capacity}")
        n = batch.width
        width = int(starts.max()) + n
        if batch.allowed is None and not self.window:
            # chains: GroupQueryAttention's own causal mask is the whole mask (padding rows are never read)
            bias = np.zeros((len(starts), 1, n, width), dtype=self.dtype)
        else:
            bias = attention_bias(batch, starts, starts, width, self.dtype, self.window)
        io = self._binding(rows.start, len(starts))
        io.bind_cpu_input(sig.INPUT_IDS, batch.tokens)
        io.bind_cpu_input(sig.POSITION_IDS, starts[:, None] + batch.depths)
        io.bind_cpu_input(sig.ATTENTION_BIAS, bias)
        io.bind_cpu_input(sig.SEQLENS_K, (ends - 1).astype(np.int32))
        io.bind_cpu_input(sig.TOTAL_SEQUENCE_LENGTH, np.array(width, dtype=np.int32))
        io.bind_cpu_input(sig.QUERY_SEQLENS, batch.counts.astype(np.int32))
        logits, value = self._logits_output(len(starts), n)
        io.bind_ortvalue_output(sig.LOGITS, value)
        self.session.run_with_iobinding(io)
        self._starts[rows], self._rows = starts, rows
        return logits
