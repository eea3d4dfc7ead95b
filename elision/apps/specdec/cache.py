"""KV cache we own: preallocated per-layer K/V buffers plus a slot table.

`SlotBufferCache` is a transformers `Cache` whose layers write new keys/values *in place* into a
preallocated `[B, H, capacity, D]` buffer and hand attention a view of the first `length` slots. That
avoids `DynamicCache`'s `torch.cat` copy of the whole cache on every forward, and makes compaction of an
accepted tree path a small in-place copy (EAGLE / Token Recycling style) instead of a rebuild.

`SlotTable` is the bookkeeping the attention bias is built from: for every sequence of the batch and
every cache slot, the absolute position of the token stored there, or -1 for an empty slot (padding
of a shorter prompt, or a slot left over when sequences of a batch accept paths of different lengths).
Slots of one sequence are always in increasing position order, so a sequence's next position is its
number of valid slots.
"""
from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer


class CacheOverflowError(RuntimeError):
    """The KV cache would need more slots than it was sized for."""


class SlotBufferLayer(DynamicLayer):
    """One decoder layer's K/V in a preallocated buffer; `update` appends in place."""

    def __init__(self, capacity: int):
        super().__init__()
        self.capacity = capacity
        self.length = 0
        self.key_buf: torch.Tensor | None = None
        self.value_buf: torch.Tensor | None = None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        self.device = key_states.device
        self.key_buf = key_states.new_zeros(b, h, self.capacity, d)
        self.value_buf = value_states.new_zeros(b, value_states.shape[1], self.capacity, value_states.shape[-1])
        self.keys = self.key_buf[:, :, :0]
        self.values = self.value_buf[:, :, :0]
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        n = key_states.shape[-2]
        end = self.length + n
        if end > self.capacity:
            raise CacheOverflowError(
                f"KV cache overflow: {end} slots needed but the cache holds {self.capacity}; "
                "lower max_new_tokens or pass a larger max_cache_len"
            )
        self.key_buf[:, :, self.length : end] = key_states
        self.value_buf[:, :, self.length : end] = value_states
        self.length = end
        self.keys = self.key_buf[:, :, :end]
        self.values = self.value_buf[:, :, :end]
        return self.keys, self.values

    def get_seq_length(self) -> int:
        return self.length

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.length + query_length, 0

    def select(self, index: torch.Tensor, start: int) -> None:
        """Slots [start, start+m) := slots `index[b]` (per sequence), then length = start + m."""
        if not self.is_initialized:
            return
        m = index.shape[1]
        if m:
            for buf in (self.key_buf, self.value_buf):
                idx = index[:, None, :, None].expand(buf.shape[0], buf.shape[1], m, buf.shape[3])
                # gather first: source and destination ranges may overlap
                buf[:, :, start : start + m] = torch.gather(buf, 2, idx)
        self.length = start + m
        self.keys = self.key_buf[:, :, : self.length]
        self.values = self.value_buf[:, :, : self.length]

    def truncate(self, length: int) -> None:
        if not self.is_initialized:
            return
        self.length = length
        self.keys = self.key_buf[:, :, :length]
        self.values = self.value_buf[:, :, :length]

    def crop(self, tokens_to_remove: int) -> None:  # keeps HF's semantics for anyone calling it
        if tokens_to_remove < 0:
            self.truncate(max(0, self.length + tokens_to_remove))


class SlotBufferCache(Cache):
    def __init__(self, num_layers: int, capacity: int):
        super().__init__(layers=[SlotBufferLayer(capacity) for _ in range(num_layers)])
        self.capacity = capacity

    def select(self, index: torch.Tensor, start: int) -> None:
        for layer in self.layers:
            layer.select(index, start)

    def truncate(self, length: int) -> None:
        for layer in self.layers:
            layer.truncate(length)


class SlotTable:
    """Absolute position of the token in every (sequence, slot); -1 = empty."""

    def __init__(self, batch_size: int, capacity: int):
        self.capacity = capacity
        self.pos = torch.full((batch_size, capacity), -1, dtype=torch.long)
        self.length = 0  # slots in use (max over the batch, holes included)
        self.seq_lens = [0] * batch_size  # valid slots per sequence == next position

    @property
    def batch_size(self) -> int:
        return self.pos.shape[0]

    def cache_bias(self, query_pos: torch.Tensor, dtype: torch.dtype, sliding_window: int | None) -> torch.Tensor:
        """Float additive bias [B, n, length] of the queries at `query_pos` [B, n] over the cached slots."""
        slot_pos = self.pos[:, None, : self.length]
        allowed = (slot_pos >= 0).expand(-1, query_pos.shape[1], -1)
        if sliding_window:
            allowed = allowed & (slot_pos > query_pos[:, :, None] - sliding_window)
        bias = torch.zeros(allowed.shape, dtype=dtype)
        bias.masked_fill_(~allowed, float("-inf"))
        return bias

    def append(self, positions: torch.Tensor, valid: torch.Tensor) -> None:
        """Record n freshly written slots (positions [B, n], valid [B, n] bool)."""
        n = positions.shape[1]
        if self.length + n > self.capacity:
            raise CacheOverflowError(
                f"KV cache overflow: {self.length + n} slots needed but the cache holds {self.capacity}; "
                "lower max_new_tokens or pass a larger max_cache_len"
            )
        self.pos[:, self.length : self.length + n] = torch.where(valid, positions, torch.full_like(positions, -1))
        self.length += n

    def keep_new(self, start: int, keep: list[list[int]]) -> torch.Tensor:
        """Keep, per sequence, the slots `start + keep[b][i]` (in order) and drop the rest of [start, length).

        Returns the gather index [B, m] (absolute slots) to apply to the KV buffers with `select(index, start)`.
        """
        m = max((len(k) for k in keep), default=0)
        b = self.batch_size
        index = torch.full((b, m), start, dtype=torch.long)
        new_pos = torch.full((b, m), -1, dtype=torch.long)
        for i, k in enumerate(keep):
            if k:
                idx = torch.tensor(k, dtype=torch.long) + start
                index[i, : len(k)] = idx
                new_pos[i, : len(k)] = self.pos[i, idx]
            self.seq_lens[i] += len(k)
        self.pos[:, start:] = -1
        self.pos[:, start : start + m] = new_pos
        self.length = start + m
        return index

    def repack_index(self) -> torch.Tensor:
        """Left-align every sequence's valid slots; returns the gather index [B, max_len] and updates the table."""
        b = self.batch_size
        m = max(self.seq_lens)
        index = torch.zeros((b, m), dtype=torch.long)
        new_pos = torch.full((b, m), -1, dtype=torch.long)
        for i in range(b):
            valid = torch.nonzero(self.pos[i, : self.length] >= 0).flatten()
            index[i, : len(valid)] = valid
            new_pos[i, : len(valid)] = self.pos[i, valid]
        self.pos.fill_(-1)
        self.pos[:, :m] = new_pos
        self.length = m
        return index

    def holes(self) -> int:
        return self.length - min(self.seq_lens)
