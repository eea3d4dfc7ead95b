"""The drafters, token tree and tree builders as they were before they were made fast (issue 13), frozen.

`test_drafting_differential.py` checks that the fast implementations in `elision.runtime.generation` give exactly
these outputs (trees, token order, scores, keys, the recycling matrix), and `tools/profile_drafters.py` times both
side by side. Copied verbatim from elision/runtime/generation/{tree,drafters,tree_builders}.py at commit
4a51af1 (VerifyCostCurve without its `measure`); only the imports were merged. Never edit it to follow the live code.
"""
from __future__ import annotations

import heapq
import itertools
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import numpy as np

from elision.runtime.generation.tree_builders import StaticTemplate


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


Candidate = tuple[int, float, Hashable]


class AcceptanceTracker:
    """Online acceptance rate per key: (accepted + prior*strength) / (tested + strength), slowly decayed."""

    def __init__(self, strength: float = 4.0, decay: float = 0.995):
        self.strength = strength
        self.decay = decay
        self.stats: dict[Hashable, list[float]] = {}

    def rate(self, key: Hashable, prior: float) -> float:
        acc, tested = self.stats.get(key, (0.0, 0.0))
        return (acc + prior * self.strength) / (tested + self.strength)

    def update(self, key: Hashable, accepted: bool) -> None:
        s = self.stats.setdefault(key, [0.0, 0.0])
        s[0] = s[0] * self.decay + float(accepted)
        s[1] = s[1] * self.decay + 1.0


class Drafter:
    """Base class; see the module docstring for the protocol."""

    name = "none"
    tag = "none"  # first element of every key this drafter emits

    def __init__(self) -> None:
        self.tracker = AcceptanceTracker()

    def reset(self, contexts: list[list[int]], prefill_logits: Any) -> None:
        """Start of a generate call: prompts (with the first generated token appended) and prefill logits."""

    def prepare(self, contexts: list[list[int]], active: list[bool], max_depth: list[int]) -> None:
        """Before trees are built each step (model drafters decode their chains here)."""

    def children(self, b: int, context: list[int], path: list[int]) -> list[Candidate]:
        return []

    def observe(self, b: int, tree: TokenTree, logits: Any, path: list[int], context: list[int]) -> None:
        """After verification of sequence b: `path` = accepted nodes (root first), `context` = new context."""
        on_path = set(path)
        for node in range(1, len(tree)):
            key = tree.keys[node]
            if tree.parents[node] in on_path and isinstance(key, tuple) and key[0] == self.tag:
                self.tracker.update(key, node in on_path)

    @property
    def draft_forward_passes(self) -> int:
        return 0


class NoDrafter(Drafter):
    """Plain autoregressive decoding through the same engine (one token per forward)."""


def _suffix_index_update(index: dict, tokens: list[int], start: int, stop: int, max_n: int, min_n: int) -> None:
    """Record every n-gram (min_n..max_n) ending at positions start..stop-1 (each has a successor)."""
    for end in range(start, stop):
        for n in range(min_n, max_n + 1):
            if end - n + 1 < 0:
                break
            index.setdefault(tuple(tokens[end - n + 1 : end + 1]), []).append(end)


class _ContextIndexDrafter(Drafter, ABC):
    """A drafter over a per-sequence hash index of the context, extended with every accepted token."""

    def __init__(self) -> None:
        super().__init__()
        self.index: list[dict] = []
        self.indexed: list[int] = []  # per sequence: context positions indexed so far

    @abstractmethod
    def _update(self, b: int, ctx: list[int]) -> None:
        """Index context positions self.indexed[b] .. len(ctx) of sequence b (prompt lookup: n-gram suffixes;
        copy: hashes of the last gamma tokens) and advance self.indexed[b]."""

    def reset(self, contexts, prefill_logits) -> None:
        self.index = [dict() for _ in contexts]
        self.indexed = [0] * len(contexts)
        for b, ctx in enumerate(contexts):
            self._update(b, ctx)

    def observe(self, b, tree, logits, path, context) -> None:
        super().observe(b, tree, logits, path, context)
        self._update(b, context)


class PromptLookupDrafter(_ContextIndexDrafter):
    name = "lookup"
    tag = "lookup"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_children: int = 3, scan_last: int = 64):
        super().__init__()
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_children = max_children
        self.scan_last = scan_last

    # acceptance prior by matched n-gram length, before online estimates exist
    @staticmethod
    def _prior(n: int, rank: int, share: float) -> float:
        base = {1: 0.3, 2: 0.5, 3: 0.65}.get(n, 0.75)
        return base * share if rank == 0 else base * share * 0.7

    def _update(self, b: int, ctx: list[int]) -> None:
        stop = len(ctx) - 1  # n-grams ending at the last token have no successor yet
        if stop > self.indexed[b]:
            _suffix_index_update(self.index[b], ctx, self.indexed[b], stop, self.max_ngram, self.min_ngram)
            self.indexed[b] = stop

    def children(self, b, context, path):
        index = self.index[b]
        tail = (context[-self.max_ngram :] + path)[-self.max_ngram :] if path else context[-self.max_ngram :]
        for n in range(min(self.max_ngram, len(tail)), self.min_ngram - 1, -1):
            ends = index.get(tuple(tail[-n:]))
            if not ends:
                continue
            recent = ends[-self.scan_last :]
            counts = Counter(context[e + 1] for e in recent)
            last_seen = {context[e + 1]: i for i, e in enumerate(recent)}
            ranked = sorted(counts, key=lambda t: (-counts[t], -last_seen[t]))[: self.max_children]
            total = len(recent)
            out = []
            for rank, tok in enumerate(ranked):
                key = (self.tag, min(n, 4), rank)
                out.append((tok, self.tracker.rate(key, self._prior(n, rank, counts[tok] / total)), key))
            return out
        return []


class CopyDrafter(_ContextIndexDrafter):
    """CopySpec: O(1) hash of the last `gamma` tokens -> most recent earlier position; copy a chain."""

    name = "copy"
    tag = "copy"

    def __init__(self, gamma: int = 3):
        super().__init__()
        self.gamma = gamma

    def _update(self, b: int, ctx: list[int]) -> None:
        index = self.index[b]
        g = self.gamma
        for end in range(max(self.indexed[b], g - 1), len(ctx) - 1):
            index[tuple(ctx[end - g + 1 : end + 1])] = end  # most recent occurrence wins
        self.indexed[b] = max(self.indexed[b], len(ctx) - 1)

    def children(self, b, context, path):
        g = self.gamma
        tail = (context[-g:] + path)[-g:] if path else context[-g:]
        if len(tail) < g:
            return []
        end = self.index[b].get(tuple(tail))
        if end is None:
            return []
        key = (self.tag, min(len(path), 7))
        return [(context[end + 1], self.tracker.rate(key, 0.6), key)]


class TokenRecyclingDrafter(Drafter):
    """Adjacency matrix [vocab, k] of last-seen top-k successors, shared by the batch and kept across calls."""

    name = "recycling"
    tag = "recycling"
    RANK_PRIORS = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)

    def __init__(self, vocab_size: int, k: int = 8):
        super().__init__()
        self.k = min(k, vocab_size)
        self.adj = np.full((vocab_size, self.k), -1, dtype=np.int64)  # "hot start": never reset between calls

    def _record(self, tokens: Sequence[int] | np.ndarray, logits: Any) -> None:
        top = top_k_indices(logits, self.k)
        self.adj[np.asarray(tokens, dtype=np.int64)] = top  # last write wins for repeated tokens

    def reset(self, contexts, prefill_logits) -> None:
        if prefill_logits is None:
            return
        for b, ctx in enumerate(contexts):
            prompt = ctx[:-1]  # the last context token was sampled from the prefill, it has no logits row
            self._record(prompt, prefill_logits[b, : len(prompt)])

    def children(self, b, context, path):
        last = path[-1] if path else context[-1]
        out = []
        for rank, tok in enumerate(self.adj[last].tolist()):
            if tok < 0:
                break
            key = (self.tag, rank)
            out.append((tok, self.tracker.rate(key, self.RANK_PRIORS[min(rank, len(self.RANK_PRIORS) - 1)]), key))
        return out

    def observe(self, b, tree, logits, path, context) -> None:
        super().observe(b, tree, logits, path, context)
        self._record(tree.tokens, logits[: len(tree)])


class CombinedDrafter(Drafter):
    """Union of several drafters' candidates; a token proposed twice keeps its best estimate."""

    def __init__(self, parts: list[Drafter]):
        super().__init__()
        self.parts = parts
        self.name = "+".join(p.name for p in parts)

    def reset(self, contexts, prefill_logits) -> None:
        for p in self.parts:
            p.reset(contexts, prefill_logits)

    def prepare(self, contexts, active, max_depth) -> None:
        for p in self.parts:
            p.prepare(contexts, active, max_depth)

    def children(self, b, context, path):
        best: dict[int, Candidate] = {}
        for part in self.parts:
            for cand in part.children(b, context, path):
                old = best.get(cand[0])
                if old is None or cand[1] > old[1]:
                    best[cand[0]] = cand
        return sorted(best.values(), key=lambda c: -c[1])

    def observe(self, b, tree, logits, path, context) -> None:
        for p in self.parts:
            p.observe(b, tree, logits, path, context)

    @property
    def draft_forward_passes(self) -> int:
        return sum(p.draft_forward_passes for p in self.parts)


def top_k_indices(logits: Any, k: int) -> np.ndarray:
    """Indices of the k largest entries of every row, best first, as numpy [..., k].

    A torch tensor uses its own `topk` (no copy of the full logits, works on any device); a numpy array uses
    `argpartition` + a sort of the k survivors.
    """
    if hasattr(logits, "topk"):
        return logits.topk(k, dim=-1).indices.cpu().numpy()
    logits = np.asarray(logits)
    part = np.argpartition(-logits, k - 1, axis=-1)[..., :k]
    order = np.argsort(-np.take_along_axis(logits, part, axis=-1), axis=-1, kind="stable")
    return np.take_along_axis(part, order, axis=-1)


BASIC_DRAFTERS = ("none", "lookup", "recycling", "copy")


def basic_drafter(name: str, vocab_size: int, recycling: "TokenRecyclingDrafter | None" = None) -> Drafter:
    """One model-free drafter by name; `recycling` is reused so its matrix persists across calls."""
    if name == "none":
        return NoDrafter()
    if name == "lookup":
        return PromptLookupDrafter()
    if name == "copy":
        return CopyDrafter()
    if name == "recycling":
        return recycling if recycling is not None else TokenRecyclingDrafter(vocab_size)
    raise ValueError(f"unknown drafter {name!r}; model-free drafters: {', '.join(BASIC_DRAFTERS)} (combine with '+')")


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
