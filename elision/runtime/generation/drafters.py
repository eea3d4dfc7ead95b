"""Drafters that need no model: n-gram prompt lookup, token recycling, copy, and their '+' combinations.

A drafter answers `children(b, context, path)`: candidate next tokens after `context + path` for sequence
b of the batch, each with an estimated probability that the target accepts it given that its parent was
accepted, and a *key* naming the bucket the estimate comes from. Tree builders (tree_builders.py) grow a
tree from these answers (best-first by path probability, or along a static template); after verification
`observe` feeds back which nodes were tested and accepted so the estimates are learned online (Sequoia's
positional acceptance vector, measured while decoding instead of offline).

Every drafter here is deterministic given the context, which the sampling verifier relies on.

* `PromptLookupDrafter` ("lookup"): longest n-gram suffix match in prompt + output (hash index, O(1) per
  node); several distinct continuations become siblings.
* `TokenRecyclingDrafter` ("recycling"): vocab x k adjacency matrix of the last-seen top-k successors of
  every token, overwritten from the logits of every verified node (Token Recycling, ACL 2025).
* `CopyDrafter` ("copy"): CopySpec - hash of the last gamma tokens -> most recent earlier occurrence,
  copy what followed it as a chain.
* `CombinedDrafter` ("a+b"): union of several drafters' children (for example a recycling tree plus a
  lookup chain).

Logits arrive as torch tensors from the torch loop and as numpy arrays from the onnxruntime loop; nothing
here imports torch (model-based drafters live in `elision.apps.specdec.drafters`).
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from typing import Any, Hashable, Sequence

import numpy as np

from elision.runtime.generation.tree import TokenTree

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
