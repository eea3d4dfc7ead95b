"""Token trees for draft-and-verify decoding.

Node 0 is the *root*: the last committed token, whose KV is not in the cache yet (the "pending" token).
Every other node is a draft token whose parent precedes it (parents-before-children order), so one
target forward over all nodes with an ancestor mask scores every root->node path at once. A chain is
a tree where every node's parent is the node before it.

Each node carries an estimated *path probability* (`score`, root = 1) used by tree builders and the
verification-cost model, and a `key` naming the drafter bucket that proposed it so drafters can learn
their acceptance rates online (Sequoia's positional acceptance vector, measured while decoding).

Pure Python + numpy (no torch): shared by the torch loop (`elision.apps.specdec`) and the onnxruntime
loop (`elision.runtime.generation.ort_generator`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Hashable

import numpy as np


@dataclass
class TokenTree:
    tokens: list[int]
    parents: list[int] = field(default_factory=lambda: [-1])
    scores: list[float] = field(default_factory=lambda: [1.0])
    keys: list[Hashable] = field(default_factory=lambda: [None])
    depths: list[int] = field(default_factory=lambda: [0])
    children: list[dict[int, int]] = field(default_factory=lambda: [{}])

    @classmethod
    def root(cls, token: int) -> "TokenTree":
        return cls(tokens=[int(token)])

    @classmethod
    def chain(cls, root_token: int, draft: list[int], score: float = 1.0) -> "TokenTree":
        tree = cls.root(root_token)
        node = 0
        for tok in draft:
            node = tree.add(node, tok, score)
        return tree

    def __len__(self) -> int:
        return len(self.tokens)

    def add(self, parent: int, token: int, score: float, key: Hashable = None) -> int:
        """Add `token` under `parent`; siblings are distinct tokens, so a duplicate returns the existing node."""
        token = int(token)
        existing = self.children[parent].get(token)
        if existing is not None:
            if score > self.scores[existing]:
                self.scores[existing] = score
            return existing
        idx = len(self.tokens)
        self.tokens.append(token)
        self.parents.append(parent)
        self.scores.append(float(score))
        self.keys.append(key)
        self.depths.append(self.depths[parent] + 1)
        self.children.append({})
        self.children[parent][token] = idx
        return idx

    def path_tokens(self, node: int) -> list[int]:
        """Draft tokens on root->node, excluding the root."""
        out: list[int] = []
        while node > 0:
            out.append(self.tokens[node])
            node = self.parents[node]
        out.reverse()
        return out

    def path_nodes(self, node: int) -> list[int]:
        """Node indices root->node, root included."""
        out = [node]
        while node > 0:
            node = self.parents[node]
            out.append(node)
        out.reverse()
        return out

    def truncate(self, n: int) -> "TokenTree":
        """The first `n` nodes (a valid tree because parents precede children)."""
        n = max(1, min(n, len(self)))
        tree = TokenTree.root(self.tokens[0])
        for i in range(1, n):
            tree.add(self.parents[i], self.tokens[i], self.scores[i], self.keys[i])
        return tree

    def ancestor_mask(self) -> np.ndarray:
        """Bool [n, n] (numpy): entry (i, j) is True iff node j is node i or one of its ancestors."""
        n = len(self)
        rows = np.zeros((n, n), dtype=bool)
        for i in range(n):
            p = self.parents[i]
            if p >= 0:
                rows[i, : i] = rows[p, : i]
            rows[i, i] = True
        return rows

    def max_depth(self) -> int:
        return max(self.depths)
