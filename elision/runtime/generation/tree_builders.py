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
import functools
import heapq
import itertools
import statistics
import time
from dataclasses import dataclass

from elision.runtime.generation.tree import TokenTree

DEFAULT_SIZES = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32, 48, 64)


def build_dynamic(drafter, b: int, context: list[int], budget: int, max_depth: int,
                  curve: "VerifyCostCurve | None" = None, min_size: int = 2) -> TokenTree:
    """Best-first tree of at most `budget` nodes (root included) and depth <= max_depth.

    With `curve`, the tree comes back cut to the size `choose_tree_size([tree], curve, budget, min_size)` picks:
    exactly `tree.truncate(that size)`, but the building stops as soon as no larger size can win (the nodes
    still to come score at most as much as the last one), so the nodes the cut would drop are mostly never built.

    One heap of every proposed child, keyed by (path score, order of proposal), defines the tree. The heap here
    holds one entry per expanded node instead, its best child not yet taken: children come ranked by path score
    then proposal order (as a drafter with `children_sorted` already gives them), and the next sibling is pushed
    when one is taken. Same pops in the same order, a fraction of the pushes, and no work on children never taken.
    """
    tree = TokenTree.root(context[-1])
    if budget <= 1 or max_depth <= 0:
        return tree
    # the tree's own node lists, appended to directly: `add`'s duplicate check is the `taken` test below
    tokens, parents, scores, keys, depths, taken, bits = (tree.tokens, tree.parents, tree.scores, tree.keys,
                                                          tree.depths, tree.children, tree.ancestor_bits)
    children_of, push, replace, pop = drafter.children, heapq.heappush, heapq.heapreplace, heapq.heappop
    presorted = getattr(drafter, "children_sorted", False)  # fixed while the tree grows: no feedback comes in between
    paths: list = [[]]  # draft tokens root -> node, for the nodes that get expanded
    heap: list = []  # (-path score, node, rank j, ranked children, node score): (score, node) is unique
    sizing = None
    size, expand = 1, 0  # expand: the node whose children to rank next (-1: none)
    while True:
        if expand >= 0:
            kids = children_of(b, context, paths[expand])
            base = scores[expand]
            if not presorted and len(kids) > 1 and not _descending(kids):
                kids = sorted((c for c in kids if c[1] > 0), key=lambda c: -base * min(c[1], 1.0))  # stable
            if kids and kids[0][1] > 0:
                push(heap, (-base * min(kids[0][1], 1.0), expand, 0, kids, base))
            if expand == 0 and curve is not None and heap:
                sizing = _SizeSearch(curve, budget, min_size)
        if not heap:
            break
        neg, parent, j, kids, base = heap[0]
        if j + 1 < len(kids) and kids[j + 1][1] > 0:
            replace(heap, (-base * min(kids[j + 1][1], 1.0), parent, j + 1, kids, base))
        else:
            pop(heap)
        tok = int(kids[j][0])
        if tok in taken[parent]:
            expand = -1
            continue
        node, size, score = size, size + 1, float(-neg)
        depth = depths[parent] + 1
        tokens.append(tok)
        parents.append(parent)
        scores.append(score)
        keys.append(kids[j][2])
        depths.append(depth)
        taken.append({})
        taken[parent][tok] = node
        bits.append(bits[parent] | (1 << node))
        if sizing is not None and sizing.settled(size, score):
            tree.shrink(sizing.best_n)
            return tree
        if size >= budget:
            break
        if depth < max_depth:
            paths.append(paths[parent] + [tok])
            expand = node
        else:
            paths.append(None)
            expand = -1
    if sizing is not None and size > 1:
        tree.shrink(choose_tree_size([tree], curve, budget, min_size))
    return tree


def _descending(candidates: list) -> bool:
    """Probabilities in non-increasing order: then the list is already in (path score, proposal) order, since
    `score * min(p, 1)` never rises as p falls, and equal scores keep their order."""
    prob = candidates[0][1]
    for candidate in candidates:
        if candidate[1] > prob:
            return False
        prob = candidate[1]
    return True


class _SizeSearch:
    """`choose_tree_size` for one tree that grows one node at a time, and a proof that growing it further cannot
    change the answer.

    Scores come in non-increasing order, so after k nodes with last score s the tree of n > k nodes expects at most
    E_k + (n - k) s tokens. The cost of n is constant between measured sizes (and proportional to n past the
    largest), so within each stretch that bound over the cost is largest at one end: checking the ends bounds the
    rate of every larger tree. When no bound beats the best rate so far by the margin `choose_tree_size` needs to
    switch, the answer is final.
    """

    SAFETY = 1 + 1e-12  # covers the rounding of the sums the bound stands for

    def __init__(self, curve: "VerifyCostCurve", budget: int, min_size: int):
        self.cost, self.budget = curve.cost, budget
        self.first = max(1, min_size)  # below this size the floor of choose_tree_size is not known yet
        self.expected = 1.0  # the root + the scores so far, summed in the order choose_tree_size sums them
        self.best_n, self.best_rate = self.first, -1.0
        self.ends, self.monotone = curve.stretches(budget)
        if self.first == 1:
            self._consider(1)

    def _consider(self, n: int) -> float:
        """choose_tree_size's step for size n; returns the rate a larger size must exceed to be chosen."""
        rate = self.expected / self.cost(n)
        if rate > self.best_rate * (1 + 1e-9):
            self.best_n, self.best_rate = n, rate
        return self.best_rate * (1 + 1e-9)

    def settled(self, k: int, score: float) -> bool:
        """The k-th node (root included) with `score` was just added: is the chosen size final?"""
        self.expected += score
        if k < self.first:
            return False
        threshold = self._consider(k)
        cost = self.cost
        if k >= self.budget:
            return True
        expected, safety = self.expected, self.SAFETY
        # first one bound: the largest numerator over the smallest cost; then stretch by stretch
        if self.monotone and (expected + (self.budget - k) * score) / cost(k + 1) * safety <= threshold:
            return True
        for n in self.ends:
            if n > k and (expected + (n - k) * score) / cost(n) * safety > threshold:
                return False
        return (expected + score) / cost(k + 1) * safety <= threshold


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

    @functools.cached_property
    def plan(self) -> tuple[tuple[int | None, int, int, int], ...]:
        """Per path: (slot of its parent path: -1 for the root, None if absent; its last rank; its depth; its own
        slot), a slot being the first position of a path in `paths`."""
        slot_of: dict[tuple[int, ...], int] = {}
        for slot, path in enumerate(self.paths):
            slot_of.setdefault(path, slot)
        return tuple((slot_of.get(path[:-1]) if len(path) > 1 else -1, path[-1], len(path), slot_of[path])
                     for path in self.paths)


def parse_tree_spec(tree: str) -> StaticTemplate | None:
    """'dynamic' -> None (best-first trees sized by the cost curve); 'static:<template>' -> the template."""
    if tree == "dynamic":
        return None
    if isinstance(tree, str) and tree.startswith("static:"):
        return StaticTemplate.parse(tree[len("static:") :])
    raise ValueError(f"unknown tree {tree!r}: use 'dynamic' or 'static:<template>' (e.g. 'static:chain-4', 'static:4x2x1')")


def build_static(drafter, b: int, context: list[int], template: StaticTemplate, max_depth: int) -> TokenTree:
    tree = TokenTree.root(context[-1])
    node_at: list[int | None] = [None] * len(template.paths)  # template slot -> tree node (None: not built)
    ranked: dict[int, list] = {}
    for parent_slot, rank, depth, slot in template.plan:
        if depth > max_depth or parent_slot is None:
            continue
        parent = node_at[parent_slot] if parent_slot >= 0 else 0
        if parent is None:
            continue
        kids = ranked.get(parent)
        if kids is None:
            kids = ranked[parent] = sorted(drafter.children(b, context, tree.path_tokens(parent)), key=_by_probability)
        if rank >= len(kids):
            continue
        tok, prob, key = kids[rank]
        if tok in tree.children[parent]:
            continue
        node_at[slot] = tree.add(parent, tok, tree.scores[parent] * min(prob, 1.0), key)
    return tree


def _by_probability(candidate) -> float:
    return -candidate[1]


class VerifyCostCurve:
    """Measured seconds of one verification forward as a function of the number of tree nodes."""

    def __init__(self, sizes: list[int], seconds: list[float]):
        self.sizes = list(sizes)
        self.seconds = list(seconds)
        # a curve is not changed once measured: cost(n) and stretches(limit) are kept
        self._costs: dict[int, float] = {}
        self._stretches: dict[int, tuple[list[int], bool]] = {}

    def cost(self, n: int) -> float:
        cost = self._costs.get(n)
        if cost is None:
            # the curve is not monotone (GEMM blocking); the cost of n is the cheapest measured size >= n
            at_least_n = [t for s, t in zip(self.sizes, self.seconds) if s >= n]
            cost = self._costs[n] = min(at_least_n) if at_least_n else self.seconds[-1] * n / self.sizes[-1]
        return cost

    def stretches(self, limit: int) -> tuple[list[int], bool]:
        """(ends, monotone) for sizes up to `limit`: cost(n) is constant for n in (a, b] between measured sizes
        a < b, and beyond the largest it grows in proportion to n (only its first size and `limit` matter there);
        `monotone`: cost(n) never falls as n grows (true for every curve `measure` returns)."""
        found = self._stretches.get(limit)
        if found is None:
            top = max(self.sizes)
            ends = {min(s, limit) for s in self.sizes} | {limit}
            if limit > top:
                ends.add(top + 1)
            ends = sorted(ends)
            points = [1, *ends]
            found = self._stretches[limit] = (ends, all(self.cost(a) <= self.cost(b) for a, b in zip(points, points[1:])))
        return found

    def relative(self) -> dict[int, float]:
        base = self.seconds[0]
        return {s: t / base for s, t in zip(self.sizes, self.seconds)}

    @classmethod
    def measure(cls, session, max_size: int, reps: int = 3, sizes=DEFAULT_SIZES, max_reps: int = 15,
                budget_s: float = 1.0) -> "VerifyCostCurve":
        """Time `session.extend` on dummy chains of each size over the live cache, rolling back every time.

        Each size runs once untimed first (its first forward sets up its input buffers and, in onnxruntime, its
        memory plan), then at least `reps` interleaved rounds, more (up to `max_reps`) while the rounds so far
        took under `budget_s`. Each size's cost is the lower quartile of its rounds: background load only ever
        adds time, and one slow round among few (a compile-time calibration once measured a 1-node forward at
        twice its real cost) would tell the tree sizer that wide trees are nearly free."""
        sizes = [s for s in sizes if s <= max_size] or [1]
        b = session.batch_size
        timings: dict[int, list[float]] = {s: [] for s in sizes}
        for s in sizes:  # warm-up
            session.extend_chains([[0] * s] * b)
            session.rollback()
        started = time.perf_counter()
        rounds = 0
        while rounds < reps or (rounds < max_reps and time.perf_counter() - started < budget_s):
            for s in sizes:  # interleaved, so background load hits every size alike
                t0 = time.perf_counter()
                session.extend_chains([[0] * s] * b)
                timings[s].append(time.perf_counter() - t0)
                session.rollback()
            rounds += 1
        return cls(sizes, [_lower_quartile(timings[s]) for s in sizes])


def _lower_quartile(values: list[float]) -> float:
    if len(values) < 4:
        return statistics.median(values)
    return statistics.quantiles(values, n=4, method="inclusive")[0]


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
    if len(prefix) == 1:  # one tree: its own prefix sums (adding them to 0 would not change them)
        expected_at = prefix[0]
    else:
        expected_at = [sum(p[min(n, len(p)) - 1] for p in prefix) for n in range(1, longest + 1)]
    best_n, best_rate = floor, -1.0
    cost = curve.cost
    for n in range(floor, longest + 1):
        rate = expected_at[n - 1] / cost(n)
        if rate > best_rate * (1 + 1e-9):
            best_n, best_rate = n, rate
    return best_n
