"""Tree builders and the verification-cost curve that sizes dynamic trees.

* `build_dynamic`: best-first expansion by estimated path probability (DySpec / EAGLE-2): a max-heap of
  candidate nodes keyed by the product of acceptance estimates along the path; pop the best, add it,
  push its children. Nodes come out in non-increasing path probability, so every prefix of the node list
  is a tree and `1 + sum(scores of the first k-1 nodes)` is the expected number of tokens a k-node tree
  yields (greedy verification, at most one child of a node can match).
* `build_static`: expand a fixed template of rank paths (Medusa / Token Recycling style), e.g.
  "chain-6", "4x2x1" (4 children of the root, 2 under each, 1 under each of those), or an explicit
  "[(0,), (1,), (0, 0)]" list.
* `VerifyCostCurve`: seconds per verification forward for tree sizes 1..64, measured once per model,
  batch size and process on this machine (Sequoia's hardware-aware sizing). `choose_tree_size` picks the
  size that maximises expected accepted tokens per second.
"""
from __future__ import annotations

import ast
import heapq
import itertools
import statistics
import time
from dataclasses import dataclass

from elision.runtime.generation.tree import TokenTree

DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)


def build_dynamic(drafter, b: int, context: list[int], budget: int, max_depth: int) -> TokenTree:
    """Best-first tree of at most `budget` nodes (root included) and depth <= max_depth."""
    tree = TokenTree.root(context[-1])
    if budget <= 1 or max_depth <= 0:
        return tree
    counter = itertools.count()
    heap: list = []

    def push_children(node: int) -> None:
        if tree.depths[node] >= max_depth:
            return
        path = tree.path_tokens(node)
        base = tree.scores[node]
        for tok, prob, key in drafter.children(b, context, path):
            if prob <= 0:
                continue
            heapq.heappush(heap, (-base * min(prob, 1.0), next(counter), node, tok, key))

    push_children(0)
    while heap and len(tree) < budget:
        neg, _, parent, tok, key = heapq.heappop(heap)
        if tok in tree.children[parent]:
            continue
        node = tree.add(parent, tok, -neg, key)
        push_children(node)
    return tree


@dataclass(frozen=True)
class StaticTemplate:
    paths: tuple[tuple[int, ...], ...]  # rank paths, parents before children

    @classmethod
    def parse(cls, spec: str) -> "StaticTemplate":
        spec = spec.strip()
        try:
            if spec.startswith("chain-"):
                n = int(spec[len("chain-") :])
                if n < 1:
                    raise ValueError
                return cls(tuple(tuple([0] * d) for d in range(1, n + 1)))
            if spec.startswith("["):
                raw = ast.literal_eval(spec)
                paths = sorted({tuple(int(r) for r in p) for p in raw}, key=lambda p: (len(p), p))
                for p in paths:
                    if not p or (len(p) > 1 and p[:-1] not in paths) or min(p) < 0:
                        raise ValueError
                return cls(tuple(paths))
            widths = [int(w) for w in spec.split("x")]
            if not widths or min(widths) < 1:
                raise ValueError
        except (ValueError, SyntaxError, TypeError):
            raise ValueError(
                f"bad static tree template {spec!r}: use 'chain-N', per-level branching like '4x2x1', "
                "or a list of rank paths like '[(0,), (1,), (0, 0)]'"
            ) from None
        paths: list[tuple[int, ...]] = []
        level = [()]
        for w in widths:
            level = [p + (r,) for p in level for r in range(w)]
            paths.extend(level)
        return cls(tuple(paths))

    def __len__(self) -> int:
        return len(self.paths) + 1


def parse_tree_spec(tree: str) -> StaticTemplate | None:
    """'dynamic' -> None (best-first trees sized by the cost curve); 'static:<template>' -> the template."""
    if tree == "dynamic":
        return None
    if isinstance(tree, str) and tree.startswith("static:"):
        return StaticTemplate.parse(tree[len("static:") :])
    raise ValueError(f"unknown tree {tree!r}: use 'dynamic' or 'static:<template>' (e.g. 'static:chain-4', 'static:4x2x1')")


def build_static(drafter, b: int, context: list[int], template: StaticTemplate, max_depth: int) -> TokenTree:
    tree = TokenTree.root(context[-1])
    node_of: dict[tuple[int, ...], int] = {(): 0}
    kids_cache: dict[int, list] = {}
    for rank_path in template.paths:
        if len(rank_path) > max_depth:
            continue
        parent = node_of.get(rank_path[:-1])
        if parent is None:
            continue
        if parent not in kids_cache:
            kids = drafter.children(b, context, tree.path_tokens(parent))
            kids_cache[parent] = sorted(kids, key=lambda c: -c[1])
        kids = kids_cache[parent]
        rank = rank_path[-1]
        if rank >= len(kids):
            continue
        tok, prob, key = kids[rank]
        if tok in tree.children[parent]:
            continue
        node_of[rank_path] = tree.add(parent, tok, tree.scores[parent] * min(prob, 1.0), key)
    return tree


class VerifyCostCurve:
    """Measured seconds of one verification forward as a function of the number of tree nodes."""

    def __init__(self, sizes: list[int], seconds: list[float]):
        self.sizes = list(sizes)
        self.seconds = list(seconds)

    def cost(self, n: int) -> float:
        # the curve is not monotone (GEMM blocking); the cost of n is the cheapest measured size >= n
        best = None
        for s, t in zip(self.sizes, self.seconds):
            if s >= n and (best is None or t < best):
                best = t
        return best if best is not None else self.seconds[-1] * n / self.sizes[-1]

    def relative(self) -> dict[int, float]:
        base = self.seconds[0]
        return {s: t / base for s, t in zip(self.sizes, self.seconds)}

    @classmethod
    def measure(cls, session, max_size: int, reps: int = 3, sizes=DEFAULT_SIZES) -> "VerifyCostCurve":
        """Time `session.extend` on dummy chains of each size over the live cache, rolling back every time."""
        sizes = [s for s in sizes if s <= max_size] or [1]
        b = session.batch_size
        timings: dict[int, list[float]] = {s: [] for s in sizes}
        session.extend_chains([[0]] * b)  # warm-up
        session.rollback()
        for _ in range(reps):
            for s in sizes:  # interleaved, so background load hits every size alike
                t0 = time.perf_counter()
                session.extend_chains([[0] * s] * b)
                timings[s].append(time.perf_counter() - t0)
                session.rollback()
        return cls(sizes, [statistics.median(timings[s]) for s in sizes])


def choose_tree_size(trees: list[TokenTree | None], curve: VerifyCostCurve, max_size: int, min_size: int = 2) -> int:
    """Tree size (nodes, root included) maximising expected committed tokens per second over the batch.

    `min_size` keeps at least the best draft token in the tree: its verification is nearly free on any
    hardware, and without it a pessimistic prior would never be tested, so the acceptance estimates
    that drive the choice could never improve (exploration).
    """
    live = [t for t in trees if t is not None]
    if not live:
        return 1
    longest = min(max_size, max(len(t) for t in live))
    prefix = [list(itertools.accumulate([1.0] + t.scores[1:])) for t in live]
    floor = max(1, min(min_size, longest))
    best_n, best_rate = floor, -1.0
    for n in range(floor, longest + 1):
        expected = sum(p[min(n, len(p)) - 1] for p in prefix)
        rate = expected / curve.cost(n)
        if rate > best_rate * (1 + 1e-9):
            best_n, best_rate = n, rate
    return best_n
