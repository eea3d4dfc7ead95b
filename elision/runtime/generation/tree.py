"""Token trees for draft-and-verify decoding.

Node 0 is the *root*: the last committed token, whose KV is not in the cache yet (the "pending" token).
Every other node is a draft token whose parent precedes it (parents-before-children order), so one
target forward over all nodes with an ancestor mask scores every root->node path at once. A chain is
a tree where every node's parent is the node before it.

Each node carries an estimated *path probability* (`score`, root = 1) used by tree builders and the
verification-cost model, and a `key` naming the drafter bucket that proposed it so drafters can learn
their acceptance rates online (Sequoia's positional acceptance vector, measured while decoding).

Trees are built once per decoding step, so the structure is kept as plain lists (cheap appends), and every node
carries its ancestor set as the bits of a Python int, extended by one OR per added node: the [n, n] ancestor
mask the verify forward needs is then one unpack of those bits instead of n row copies.

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
    # bit j of ancestor_bits[i] is set iff node j is node i or one of its ancestors (derived from `parents`)
    ancestor_bits: list[int] = field(default_factory=list, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ancestor_bits) != len(self.parents):
            self.ancestor_bits = _ancestor_bits(self.parents)

    @classmethod
    def root(cls, token: int) -> "TokenTree":
        return cls._of([int(token)], [-1], [1.0], [None], [0], [{}], [1])

    @classmethod
    def _of(cls, tokens, parents, scores, keys, depths, children, ancestor_bits) -> "TokenTree":
        """A tree from consistent node lists, without the checks of __init__ (trees are built every step)."""
        tree = cls.__new__(cls)
        tree.tokens, tree.parents, tree.scores, tree.keys = tokens, parents, scores, keys
        tree.depths, tree.children, tree.ancestor_bits = depths, children, ancestor_bits
        return tree

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
        self.ancestor_bits.append(self.ancestor_bits[parent] | (1 << idx))
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
        tree = TokenTree._of(self.tokens[:n], [-1, *self.parents[1:n]], [1.0, *map(float, self.scores[1:n])],
                             [None, *self.keys[1:n]], self.depths[:n], [dict(kids) for kids in self.children[:n]],
                             self._bits()[:n])
        for parent, token in zip(self.parents[n:], self.tokens[n:]):
            if parent < n:  # children were added in index order: dropping later ones keeps the sibling order
                del tree.children[parent][token]
        return tree

    def shrink(self, n: int) -> None:
        """Keep only the first `n` nodes, in place: what `truncate(n)` returns, without copying what is kept."""
        n = max(1, min(n, len(self)))
        dropped = list(zip(self.parents[n:], self.tokens[n:]))
        for nodes in (self.tokens, self.parents, self.scores, self.keys, self.depths, self.children, self._bits()):
            del nodes[n:]
        for parent, token in dropped:
            if parent < n:
                del self.children[parent][token]

    def _bits(self) -> list[int]:
        if len(self.ancestor_bits) != len(self.parents):  # the node lists were replaced after construction
            self.ancestor_bits = _ancestor_bits(self.parents)
        return self.ancestor_bits

    def ancestor_mask(self) -> np.ndarray:
        """Bool [n, n] (numpy): entry (i, j) is True iff node j is node i or one of its ancestors."""
        n = len(self)
        width = (n + 7) // 8
        raw = b"".join([bits.to_bytes(width, "little") for bits in self._bits()])
        rows = np.frombuffer(raw, dtype=np.uint8).reshape(n, width)
        return np.unpackbits(rows, axis=1, count=n, bitorder="little").view(bool)

    def max_depth(self) -> int:
        return max(self.depths)


def _ancestor_bits(parents: list[int]) -> list[int]:
    bits: list[int] = []
    for i, p in enumerate(parents):
        bits.append((bits[p] if p >= 0 else 0) | (1 << i))
    return bits
