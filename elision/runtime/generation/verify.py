"""Greedy verification of a token tree (pure Python: the argmax of every node comes in as a list of ints).

Walk from the root; at each node the target's argmax either equals one child's token (accept it and
continue) or not (stop). The argmax at the last accepted node is the free bonus token. The output is exactly
what step-by-step greedy decoding would produce. (Lossless rejection sampling, which needs the target's
distributions, is in `elision.runtime.generation.sampling`.)
"""
from __future__ import annotations

from elision.runtime.generation.tree import TokenTree


def verify_greedy(tree: TokenTree, argmax: list[int]) -> tuple[list[int], int]:
    """Accepted node indices (root first) and the bonus token. `argmax[i]` = target argmax at node i."""
    node = 0
    path = [0]
    while True:
        nxt = tree.children[node].get(argmax[node])
        if nxt is None:
            return path, argmax[node]
        node = nxt
        path.append(node)
