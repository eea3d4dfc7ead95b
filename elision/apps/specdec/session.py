"""A backend plus its slot table: prefill, extend by token trees, keep accepted nodes.

This is where the attention bias and position ids are built, so the backend itself stays tensor-only:
the bias of tree node i over the cache is 0 for every valid slot of its sequence (within the sliding
window, if the model has one) and over the tree 0 for its ancestors and itself; positions are the
sequence length plus the node's depth.
"""
from __future__ import annotations

import torch

from elision.apps.specdec.backends import ModelBackend
from elision.apps.specdec.cache import SlotTable
from elision.runtime.generation.tree import TokenTree


class KVSession:
    def __init__(self, backend: ModelBackend, batch_size: int, capacity: int):
        self.backend = backend
        self.capacity = capacity
        backend.reset(batch_size, capacity)
        self.table = SlotTable(batch_size, capacity)
        self._ext_start = 0
        self._ext_width = 0

    @property
    def batch_size(self) -> int:
        return self.table.batch_size

    @property
    def seq_lens(self) -> list[int]:
        return self.table.seq_lens

    def _run(self, tokens: torch.Tensor, depth: torch.Tensor, tree_allowed: torch.Tensor, valid: torch.Tensor):
        """tokens/depth/valid [B, n]; tree_allowed [B, n, n] bool. Appends n slots, returns logits [B, n, V]."""
        b, n = tokens.shape
        need = self.table.length + n
        if need > self.capacity:
            self.repack()
            if self.table.length + n > self.capacity:
                self.table.append(torch.zeros_like(tokens), valid)  # raises CacheOverflowError with the message
        base = torch.tensor(self.table.seq_lens, dtype=torch.long)[:, None]
        positions = base + depth
        dtype = self.backend.dtype
        cache_bias = self.table.cache_bias(positions, dtype, self.backend.sliding_window)
        window = self.backend.sliding_window
        if window:
            tree_allowed = tree_allowed & (positions[:, None, :] > positions[:, :, None] - window)
            tree_allowed = tree_allowed | torch.eye(n, dtype=torch.bool)[None]
        tree_bias = torch.zeros((b, n, n), dtype=dtype)
        tree_bias.masked_fill_(~tree_allowed, float("-inf"))
        bias = torch.cat([cache_bias, tree_bias], dim=-1)[:, None]
        self._ext_start = self.table.length
        self._ext_width = n
        logits = self.backend.forward(tokens, positions, bias)
        self.table.append(positions, valid)
        return logits

    def prefill(self, prompts: list[list[int]]) -> torch.Tensor:
        """Run right-padded prompts; returns logits [B, Lmax, V]. All prompt tokens stay in the cache."""
        b = len(prompts)
        n = max(len(p) for p in prompts)
        tokens = torch.zeros((b, n), dtype=torch.long)
        valid = torch.zeros((b, n), dtype=torch.bool)
        for i, p in enumerate(prompts):
            tokens[i, : len(p)] = torch.tensor(p, dtype=torch.long)
            valid[i, : len(p)] = True
        depth = torch.arange(n)[None].expand(b, n)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        # padded rows attend to themselves only (a fully masked row would make softmax NaN)
        allowed = causal[None] & valid[:, None, :] | torch.eye(n, dtype=torch.bool)[None]
        logits = self._run(tokens, depth, allowed, valid)
        self.table.keep_new(self._ext_start, [list(range(len(p))) for p in prompts])
        # keep_new re-indexed nothing (identity), so the KV buffers need no gather
        return logits

    def extend(self, trees: list[TokenTree | None]) -> torch.Tensor:
        """One forward over every sequence's tree (None = inactive sequence). Returns logits [B, n, V]."""
        b = len(trees)
        n = max(len(t) for t in trees if t is not None)
        tokens = torch.zeros((b, n), dtype=torch.long)
        depth = torch.zeros((b, n), dtype=torch.long)
        valid = torch.zeros((b, n), dtype=torch.bool)
        allowed = torch.eye(n, dtype=torch.bool).repeat(b, 1, 1)
        for i, t in enumerate(trees):
            if t is None:
                continue
            k = len(t)
            tokens[i, :k] = torch.tensor(t.tokens, dtype=torch.long)
            depth[i, :k] = torch.tensor(t.depths, dtype=torch.long)
            valid[i, :k] = True
            allowed[i, :k, :k] = torch.from_numpy(t.ancestor_mask())
        return self._run(tokens, depth, allowed, valid)

    def extend_chains(self, chains: list[list[int]]) -> torch.Tensor:
        """Causal chains of different lengths (empty = inactive); logits [B, n, V]."""
        b = len(chains)
        n = max(1, max(len(c) for c in chains))
        tokens = torch.zeros((b, n), dtype=torch.long)
        valid = torch.zeros((b, n), dtype=torch.bool)
        for i, c in enumerate(chains):
            if c:
                tokens[i, : len(c)] = torch.tensor(c, dtype=torch.long)
                valid[i, : len(c)] = True
        depth = torch.arange(n)[None].expand(b, n)
        causal = torch.tril(torch.ones(n, n, dtype=torch.bool))
        allowed = causal[None] & valid[:, None, :] | torch.eye(n, dtype=torch.bool)[None]
        return self._run(tokens, depth, allowed, valid)

    def commit(self, keep: list[list[int]]) -> None:
        """Keep, per sequence, nodes `keep[b]` (indices into the last extension, in path order)."""
        start = self._ext_start
        m = max((len(k) for k in keep), default=0)
        identity = all(k == list(range(len(k))) for k in keep) and all(len(k) == m for k in keep)
        index = self.table.keep_new(start, keep)
        if identity:
            self.backend.truncate(start + m)  # accepted prefix is already in place: no copy
        else:
            self.backend.select(index, start)
        if self.table.holes() > 64:
            self.repack()

    def rollback(self) -> None:
        """Forget the last extension entirely (used when timing verification)."""
        self.table.keep_new(self._ext_start, [[] for _ in range(self.batch_size)])
        self.backend.truncate(self._ext_start)

    def repack(self) -> None:
        if self.table.holes() == 0 and all(s == self.table.length for s in self.table.seq_lens):
            return
        index = self.table.repack_index()
        self.backend.select(index, 0)
