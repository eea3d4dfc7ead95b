"""Token trees of a batch as padded numpy inputs: tokens, positions, per-node validity and the additive bias.

Shared by the ONNX Runtime sessions. Sequence b has `starts[b]` cached tokens (positions 0 .. starts[b] - 1); its
tree's nodes sit at positions `starts[b] + depth`. The bias row of node i (float, 0 = attend, -inf = not):

* cache columns `c < starts[b]`: 0 (inside the sliding window, if the model has one);
* the tree's own columns, beginning at `tree_cols[b]`: 0 for node i's ancestors and itself;
* every other column: -inf. Padding rows attend to themselves only, so no softmax row is empty.

`tree_cols[b]` is `starts[b]` when each sequence's tree follows its own cache (the shared-buffer step graph), or
the longest cache length when all trees start at one column (the `@verify` graph, whose past is padded).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

from elision.runtime.generation.tree import TokenTree

__all__ = ["TreeBatch", "attention_bias", "chain_batch", "tree_batch"]


@dataclass
class TreeBatch:
    tokens: np.ndarray  # [B, n] int64, 0 in padding
    depths: np.ndarray  # [B, n] int64
    counts: np.ndarray  # [B] valid nodes per sequence (0: inactive)
    allowed: np.ndarray | None  # [B, n, n] ancestor masks; None when every sequence is a causal chain

    @property
    def width(self) -> int:
        return self.tokens.shape[1]

    def allowed_masks(self) -> np.ndarray:
        if self.allowed is not None:
            return self.allowed
        b, n = self.tokens.shape
        causal = np.tril(np.ones((n, n), dtype=bool))
        valid = np.arange(n)[None, :] < self.counts[:, None]
        return causal[None] & valid[:, None, :] | np.eye(n, dtype=bool)[None]


def tree_batch(trees: Sequence[TokenTree | None]) -> TreeBatch:
    sizes = [len(t) if t is not None else 0 for t in trees]
    n = max(1, max(sizes, default=0))
    b = len(trees)
    counts = np.array(sizes, dtype=np.int64)
    if n == 1:  # lone roots: plain decoding, the common step, without the general padding work below
        tokens = np.array([[t.tokens[0] if t is not None else 0] for t in trees], dtype=np.int64)
        return TreeBatch(tokens, np.zeros((b, 1), dtype=np.int64), counts, None)
    tokens = np.zeros((b, n), dtype=np.int64)
    depths = np.zeros((b, n), dtype=np.int64)
    chains = True
    for i, t in enumerate(trees):
        if t is not None:
            k = len(t)
            tokens[i, :k] = t.tokens
            depths[i, :k] = t.depths
            chains = chains and t.depths[-1] == k - 1  # parents-first: depth k-1 at node k-1 means a chain
    if chains:
        return TreeBatch(tokens, depths, counts, None)
    allowed = np.broadcast_to(np.eye(n, dtype=bool), (b, n, n)).copy()
    for i, t in enumerate(trees):
        if t is not None:
            k = len(t)
            allowed[i, :k, :k] = t.ancestor_mask()
    return TreeBatch(tokens, depths, counts, allowed)


def chain_batch(chains: Sequence[Sequence[int]]) -> TreeBatch:
    counts = np.array([len(c) for c in chains], dtype=np.int64)
    n = max(1, int(counts.max(initial=0)))
    if n == 1:  # one token per sequence: plain decoding, the common step, without the padding work below
        tokens = np.array([c[:1] or [0] for c in chains], dtype=np.int64)
        return TreeBatch(tokens, np.zeros((len(chains), 1), dtype=np.int64), counts, None)
    tokens = np.zeros((len(chains), n), dtype=np.int64)
    for i, c in enumerate(chains):
        tokens[i, : len(c)] = c
    depths = np.broadcast_to(np.arange(n, dtype=np.int64), tokens.shape).copy()
    return TreeBatch(tokens, depths, counts, None)


def attention_bias(batch: TreeBatch, starts: np.ndarray, tree_cols: np.ndarray, width: int, dtype: np.dtype,
                   window: int | None = None) -> np.ndarray:
    """[B, 1, n, width] additive bias (see the module docstring)."""
    b, n = batch.tokens.shape
    bias = np.full((b, 1, n, width), -np.inf, dtype=dtype)
    allowed = batch.allowed_masks()
    positions = starts[:, None] + batch.depths
    for i in range(b):
        start, col = int(starts[i]), int(tree_cols[i])
        tree_ok = allowed[i]
        if window:
            pos = positions[i]
            bias[i, 0, :, :start][np.arange(start)[None, :] > pos[:, None] - window] = 0
            tree_ok = tree_ok & (pos[None, :] > pos[:, None] - window) | np.eye(n, dtype=bool)
        else:
            bias[i, 0, :, :start] = 0
        bias[i, 0, :, col : col + n][tree_ok] = 0
    return bias
