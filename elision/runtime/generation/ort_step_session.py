"""`TreeSession` over the in-place *step* graph (`step_signature`): the KV cache never leaves its buffers.

One numpy array `[2 * layers, batch, kv_heads, capacity, head_dim]` holds every layer's keys and values; each
`[batch, kv_heads, capacity, head_dim]` slice is wrapped once in an OrtValue and bound as both `past_*` and
`present_*` of an IO binding, so GroupQueryAttention appends the new rows in place: no per-step concatenation,
copy or allocation of the cache.

The small inputs are bound once too. A decoding step (every sequence already has a cache) runs through a
`_StepFeeds`: the token ids, positions, sequence lengths, bias and logits of one row range and tree width live in
numpy arrays wrapped once in OrtValues and bound once, and each step writes its values into them in place. Input
shapes then stay fixed from step to step, which matters as much as the copies: onnxruntime plans its memory per
set of input shapes, and a new shape every step (the bias growing by one column per token) costs about as much
as a few of the model's own kernels on a small model. So the bias is `BIAS_BUCKET` columns wider than needed,
rounded up (at most the capacity and the model's position limit), and `total_sequence_length` says that width: GroupQueryAttention reads sequence b's rows only up to
`seqlens_k[b]` (the ragged-batch rule), so the extra columns are never read, and the shapes change once per
`BIAS_BUCKET` tokens. A prefill (rows starting from an empty cache) binds its inputs as it goes: it runs once per
request and its width is the prompt's.

Sequences are ragged: sequence b has `seq_lens[b]` cached tokens, and its tree's K/V go to rows
`seq_lens[b] ..` (`query_seqlens` keeps padding rows out of the cache). `commit` keeps the accepted nodes with
one in-place gather per sequence (nothing when they are already a prefix, as for chains); `rollback` only moves
the lengths back. The arrays returned by `prefill`/`extend` are views of reused logits buffers: valid until the
next call.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Sequence

import numpy as np
import onnxruntime as ort

from elision.runtime.generation import step_signature as sig
from elision.runtime.generation.ort_session_base import BatchedTreeSession, KVCacheOverflow
from elision.runtime.generation.tree_batch import TreeBatch, attention_bias

__all__ = ["BIAS_BUCKET", "OrtStepSession"]

BIAS_BUCKET = 64  # bias columns are allocated in multiples of this (clamped to the capacity)
_MAX_FEEDS = 64  # step feeds kept (least recently used dropped): one per (row range, tree width) in use


class _StepFeeds:
    """The inputs and logits of one (first row, rows, tree width) step shape, bound once to their own binding."""

    def __init__(self, session: "OrtStepSession", first: int, rows: int, n: int):
        self.binding = session._kv_binding(first, rows)
        self.ids = np.zeros((rows, n), dtype=np.int64)
        self.positions = np.zeros((rows, n), dtype=np.int64)
        self.seqlens = np.zeros(rows, dtype=np.int32)
        self.query = np.zeros(rows, dtype=np.int32)
        self.total = np.zeros((), dtype=np.int32)
        self.logits = np.empty((rows, n, session.vocab_size), dtype=session.dtype)
        self.bias = np.empty((rows, 1, n, 0), dtype=session.dtype)
        self.bias_is_zero = False  # the bias holds zeros: a chain step writes nothing into it
        self._values: dict[str, ort.OrtValue] = {}  # the binding does not keep its OrtValues alive
        for name, array in ((sig.INPUT_IDS, self.ids), (sig.POSITION_IDS, self.positions), (sig.SEQLENS_K, self.seqlens),
                            (sig.QUERY_SEQLENS, self.query), (sig.TOTAL_SEQUENCE_LENGTH, self.total)):
            self._bind_input(name, array)
        self._values[sig.LOGITS] = value = ort.OrtValue.ortvalue_from_numpy(self.logits)
        self.binding.bind_ortvalue_output(sig.LOGITS, value)

    def _bind_input(self, name: str, array: np.ndarray) -> None:
        # the OrtValue wraps the array's memory: what the step writes into the array is what the graph reads
        self._values[name] = value = ort.OrtValue.ortvalue_from_numpy(array)
        self.binding.bind_ortvalue_input(name, value)

    def set_width(self, width: int) -> None:
        """Bias columns (and total_sequence_length) `width`; a new bias array only when the width changes."""
        if self.bias.shape[3] != width:
            rows, _, n, _ = self.bias.shape
            self.bias = np.zeros((rows, 1, n, width), dtype=self.bias.dtype)
            self.bias_is_zero = True
            self._bind_input(sig.ATTENTION_BIAS, self.bias)
            self.total[()] = width


class OrtStepSession(BatchedTreeSession):
    def __init__(self, session, *, layers: int, kv_heads: int, head_dim: int, vocab_size: int, batch_size: int,
                 capacity: int, dtype: np.dtype = np.float32, sliding_window: int | None = None,
                 max_positions: int | None = None):
        super().__init__(batch_size)
        self.session = session
        self.vocab_size = int(vocab_size)
        self.capacity = int(capacity)
        self.dtype = np.dtype(dtype)
        self.window = sliding_window
        # the widest bias a step pads to: GroupQueryAttention refuses a total_sequence_length beyond its rotary
        # tables (the model's position limit)
        self._max_width = min(self.capacity, int(max_positions)) if max_positions else self.capacity
        self.kv = np.zeros((2 * layers, batch_size, kv_heads, self.capacity, head_dim), dtype=self.dtype)
        self._kv_values: dict[tuple[int, int], list[ort.OrtValue]] = {}  # (first row, rows) -> one per KV tensor
        self._prefill_bindings: dict[tuple[int, int], ort.IOBinding] = {}
        self._feeds: OrderedDict[tuple[int, int, int], _StepFeeds] = OrderedDict()
        self._prefill_logits = np.empty(0, dtype=self.dtype)

    # ------------------------------------------------------------------ TreeSession
    def _kv_binding(self, first: int, rows: int) -> ort.IOBinding:
        """A new IO binding whose past/present K/V are the rows first .. first + rows - 1 of the shared buffers (a
        contiguous view: batch is their leading axis); the OrtValues over those views are made once per row range."""
        values = self._kv_values.get((first, rows))
        if values is None:
            values = self._kv_values[(first, rows)] = [ort.OrtValue.ortvalue_from_numpy(self.kv[i, first : first + rows])
                                                       for i in range(self.kv.shape[0])]
        binding = self.session.io_binding()
        for i, value in enumerate(values):
            layer, kind = divmod(i, 2)
            kind_name = ("key", "value")[kind]
            binding.bind_ortvalue_input(sig.past_name(layer, kind_name), value)
            binding.bind_ortvalue_output(sig.present_name(layer, kind_name), value)
        return binding

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

    # ------------------------------------------------------------------ one forward
    def _run(self, batch: TreeBatch, first: int):
        rows = self._rows_of(batch, first)
        starts = self.lengths[rows]
        ends = starts + batch.counts
        longest = int(ends.max())
        if longest > self.capacity:
            raise KVCacheOverflow(f"KV cache overflow: {longest} slots needed but the cache holds {self.capacity}")
        if int(starts.min()) == 0:
            logits = self._run_prefill(batch, rows, starts, ends)
        else:
            logits = self._run_step(batch, rows, starts, ends)
        self._starts[rows], self._rows = starts, rows
        return logits

    def _step_feeds(self, first: int, rows: int, n: int) -> _StepFeeds:
        key = (first, rows, n)
        feeds = self._feeds.get(key)
        if feeds is None:
            if len(self._feeds) >= _MAX_FEEDS:
                self._feeds.popitem(last=False)
            feeds = self._feeds[key] = _StepFeeds(self, first, rows, n)
        else:
            self._feeds.move_to_end(key)
        return feeds

    def extend_chains(self, chains: Sequence[Sequence[int]]):
        if self.window is None and all(len(c) <= 1 for c in chains):
            return self._run_plain(chains)
        return super().extend_chains(chains)

    def _run_plain(self, chains: Sequence[Sequence[int]]):
        """A plain decoding step (at most one token per row, every row of the batch already cached): the most
        frequent forward, so it skips the `TreeBatch` and does its bookkeeping on Python ints (one sequence, the
        common case, writes its four inputs as scalars). The feeds, inputs and outputs are exactly those
        `_run_step` would give a one-token chain batch."""
        rows = self._rows_of_count(len(chains))
        starts = self.lengths[rows]
        lengths = starts.tolist()
        if min(lengths) == 0:  # a row without a cache: the generic path prefills it
            return super().extend_chains(chains)
        counts = [len(c) for c in chains]
        needed = max(lengths) + 1
        if max(n + c for n, c in zip(lengths, counts)) > self.capacity:
            raise KVCacheOverflow(f"KV cache overflow: {needed} slots needed but the cache holds {self.capacity}")
        feeds = self._step_feeds(0, len(chains), 1)
        feeds.set_width(max(needed, min(self._max_width, -(-needed // BIAS_BUCKET) * BIAS_BUCKET)))
        if len(chains) == 1:
            (chain,), (length,), (count,) = chains, lengths, counts
            feeds.ids[0, 0] = chain[0] if count else 0
            feeds.positions[0, 0] = length
            feeds.seqlens[0] = length + count - 1
            feeds.query[0] = count
        else:
            feeds.ids[:, 0] = [c[0] if c else 0 for c in chains]
            feeds.positions[:, 0] = starts
            feeds.seqlens[:] = [n + c - 1 for n, c in zip(lengths, counts)]
            feeds.query[:] = counts
        if not feeds.bias_is_zero:
            feeds.bias.fill(0)
            feeds.bias_is_zero = True
        self._starts[rows], self._rows = starts, rows
        self.session.run_with_iobinding(feeds.binding)
        return feeds.logits

    def _run_step(self, batch: TreeBatch, rows: slice, starts: np.ndarray, ends: np.ndarray):
        n = batch.width
        feeds = self._step_feeds(rows.start, len(starts), n)
        needed = int(starts.max()) + n  # every row's tree columns fit (a padding row's too)
        feeds.set_width(max(needed, min(self._max_width, -(-needed // BIAS_BUCKET) * BIAS_BUCKET)))
        feeds.ids[...] = batch.tokens
        np.add(starts[:, None], batch.depths, out=feeds.positions)
        np.subtract(ends, 1, out=feeds.seqlens, casting="unsafe")
        feeds.query[...] = batch.counts
        if batch.allowed is None and not self.window:
            # chains: GroupQueryAttention's own causal mask is the whole mask (padding rows are never read)
            if not feeds.bias_is_zero:
                feeds.bias.fill(0)
                feeds.bias_is_zero = True
        else:
            feeds.bias[...] = attention_bias(batch, starts, starts, feeds.bias.shape[3], self.dtype, self.window)
            feeds.bias_is_zero = False
        self.session.run_with_iobinding(feeds.binding)
        return feeds.logits

    def _run_prefill(self, batch: TreeBatch, rows: slice, starts: np.ndarray, ends: np.ndarray):
        """A forward where some row starts from an empty cache: inputs bound for this call only."""
        n = batch.width
        width = int(starts.max()) + n
        if batch.allowed is None and not self.window:
            bias = np.zeros((len(starts), 1, n, width), dtype=self.dtype)
        else:
            bias = attention_bias(batch, starts, starts, width, self.dtype, self.window)
        io = self._prefill_bindings.get((rows.start, len(starts)))
        if io is None:
            io = self._prefill_bindings[(rows.start, len(starts))] = self._kv_binding(rows.start, len(starts))
        io.bind_cpu_input(sig.INPUT_IDS, batch.tokens)
        io.bind_cpu_input(sig.POSITION_IDS, starts[:, None] + batch.depths)
        io.bind_cpu_input(sig.ATTENTION_BIAS, bias)
        io.bind_cpu_input(sig.SEQLENS_K, (ends - 1).astype(np.int32))
        io.bind_cpu_input(sig.TOTAL_SEQUENCE_LENGTH, np.array(width, dtype=np.int32))
        io.bind_cpu_input(sig.QUERY_SEQLENS, batch.counts.astype(np.int32))
        size = len(starts) * n * self.vocab_size
        if self._prefill_logits.size < size:
            self._prefill_logits = np.empty(size, dtype=self.dtype)
        logits = self._prefill_logits[:size].reshape(len(starts), n, self.vocab_size)
        io.bind_ortvalue_output(sig.LOGITS, ort.OrtValue.ortvalue_from_numpy(logits))
        self.session.run_with_iobinding(io)
        return logits
