"""Drafters that need no model: n-gram prompt lookup, token recycling, copy, and their '+' combinations.

A drafter answers `children(b, context, path)`: candidate next tokens after `context + path` for sequence
b of the batch, each with an estimated probability that the target accepts it given that its parent was
accepted, and a *key* naming the bucket the estimate comes from. Tree builders (tree_builders.py) grow a
tree from these answers (best-first by path probability, or along a static template); after verification
`observe` feeds back which nodes were tested and accepted so the estimates are learned online (Sequoia's
positional acceptance vector, measured while decoding instead of offline).

Every drafter here is deterministic given the context, which the sampling verifier relies on.

Speed: a dynamic tree asks `children` once per node (dozens of times per step), so answers are cheap: acceptance
rates are computed once per tracker update and shared (`AcceptanceTracker.version`), the lookup drafter ranks the
successors of an n-gram once and keeps them until that n-gram occurs again, and Token Recycling's top-k runs
as masked argmax passes (`top_k.py`). Answers may be cached: callers must not modify the returned lists.

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

import operator
from abc import ABC, abstractmethod
from typing import Any, Hashable, Sequence

import numpy as np

from elision.runtime.generation.top_k import top_k_indices
from elision.runtime.generation.tree import TokenTree

Candidate = tuple[int, float, Hashable]


class AcceptanceTracker:
    """Online acceptance rate per key: (accepted + prior*strength) / (tested + strength), slowly decayed.

    `version` counts updates, so a drafter can keep rates it computed until the next update.
    """

    def __init__(self, strength: float = 4.0, decay: float = 0.995):
        self.strength = strength
        self.decay = decay
        self.stats: dict[Hashable, list[float]] = {}
        self.version = 0

    def rate(self, key: Hashable, prior: float) -> float:
        accepted, tested = self.stats.get(key, (0.0, 0.0))
        return (accepted + prior * self.strength) / (tested + self.strength)

    def update(self, key: Hashable, accepted: bool) -> None:
        counts = self.stats.get(key)
        if counts is None:
            counts = self.stats[key] = [0.0, 0.0]
        counts[0] = counts[0] * self.decay + float(accepted)
        counts[1] = counts[1] * self.decay + 1.0
        self.version += 1


class Drafter:
    """Base class; see the module docstring for the protocol."""

    name = "none"
    tag = "none"  # first element of every key this drafter emits
    # True when `children` lists come sorted by probability, highest first (tree builders then skip a sort)
    children_sorted = False
    # False: never proposes a child (plain decoding), so the loop runs plain one-token steps without trees
    proposes = True

    def __init__(self) -> None:
        self.tracker = AcceptanceTracker()

    def reset(self, contexts: list[list[int]], prefill_logits: Any) -> None:
        """Start of a generate call: prompts (with the first generated token appended) and prefill logits."""

    def admit(self, b: int, context: list[int], prefill_logits: Any) -> None:
        """Sequence b (re)starts between steps of a running batch (continuous batching): its prompt with the first
        generated token appended, and its prefill logits [prompt length, V]. What `reset` does for one sequence."""

    def prepare(self, contexts: list[list[int]], active: list[bool], max_depth: list[int]) -> None:
        """Before trees are built each step (model drafters decode their chains here)."""

    def children(self, b: int, context: list[int], path: list[int]) -> list[Candidate]:
        """Candidates after `context + path` for sequence b, as (token, probability estimate, key); read-only."""
        return []

    def observe(self, b: int, tree: TokenTree, logits: Any, path: list[int], context: list[int]) -> None:
        """After verification of sequence b: `path` = accepted nodes (root first), `context` = new context.

        Every node of this drafter whose parent was accepted was tested: it counts as accepted or rejected.
        """
        on_path = set(path)
        tag, keys, update = self.tag, tree.keys, self.tracker.update
        for node, parent in enumerate(tree.parents):
            if parent in on_path:
                key = keys[node]
                if isinstance(key, tuple) and key[0] == tag:
                    update(key, node in on_path)

    @property
    def draft_forward_passes(self) -> int:
        return 0


class NoDrafter(Drafter):
    """Plain autoregressive decoding through the same engine (one token per forward)."""

    proposes = False


def _tail(context: list[int], path: list[int], n: int) -> list[int]:
    """The last n tokens of context + path (without building the whole concatenation)."""
    if not path:
        return context[-n:]
    if len(path) >= n:
        return path[-n:]
    return (context[-n:] + path)[-n:]


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
        self.index, self.indexed = [], []
        for b, ctx in enumerate(contexts):
            self.admit(b, ctx, None)

    def admit(self, b, context, prefill_logits) -> None:
        while len(self.index) <= b:
            self.index.append({})
            self.indexed.append(0)
        self.index[b], self.indexed[b] = {}, 0
        self._update(b, context)

    def observe(self, b, tree, logits, path, context) -> None:
        super().observe(b, tree, logits, path, context)
        self._update(b, context)


class _Successors:
    """What followed one n-gram in its last `window` occurrences, kept up to date as the n-gram occurs again.

    `order[token]` = (-count, -position of the latest occurrence): sorting by it ranks successors by count, then
    the most recent first. The candidates made from the ranking are kept until the n-gram occurs again, their
    acceptance rates until the tracker changes.
    """

    __slots__ = ("order", "ranked", "version", "candidates")

    def __init__(self, ends: list[int], context: list[int], window: int):
        self.order: dict[int, tuple[int, int]] = {}
        self.ranked: list[tuple[int, float, Hashable]] | None = None  # (token, prior, key), best first
        self.version, self.candidates = -1, []
        for end in ends[-window:]:
            self.push(context[end + 1], end)

    def push(self, token: int, end: int) -> None:
        count = self.order.get(token, (0, 0))[0]
        self.order[token] = (count - 1, -end)
        self.ranked = None

    def drop(self, token: int) -> None:
        """The oldest occurrence, followed by `token`, left the window."""
        count, latest = self.order[token]
        if count == -1:
            del self.order[token]
        else:
            self.order[token] = (count + 1, latest)
        self.ranked = None


class PromptLookupDrafter(_ContextIndexDrafter):
    """Longest n-gram (max_ngram .. min_ngram) ending the context that occurred before; its most frequent
    successors among its last `scan_last` occurrences (ties: the most recent first) become up to `max_children`
    candidates.

    The index maps every n-gram to the positions it ended at. The successors of an n-gram are counted on first
    use and then kept up to date as it occurs again (`_Successors`), so a lookup costs a few dictionary reads.
    """

    name = "lookup"
    tag = "lookup"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_children: int = 3, scan_last: int = 64):
        super().__init__()
        if scan_last < 1:
            raise ValueError(f"scan_last must be >= 1, got {scan_last}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_children = max_children
        self.scan_last = scan_last
        self.successors: list[dict[tuple, _Successors]] = []  # per sequence: n-grams looked up so far

    # acceptance prior by matched n-gram length, before online estimates exist
    @staticmethod
    def _prior(n: int, rank: int, share: float) -> float:
        base = {1: 0.3, 2: 0.5, 3: 0.65}.get(n, 0.75)
        return base * share if rank == 0 else base * share * 0.7

    def reset(self, contexts, prefill_logits) -> None:
        self.successors = []
        super().reset(contexts, prefill_logits)

    def admit(self, b, context, prefill_logits) -> None:
        while len(self.successors) <= b:
            self.successors.append({})
        self.successors[b] = {}
        super().admit(b, context, prefill_logits)

    def _update(self, b: int, ctx: list[int]) -> None:
        stop = len(ctx) - 1  # n-grams ending at the last token have no successor yet
        index, successors, window = self.index[b], self.successors[b], self.scan_last
        for end in range(self.indexed[b], stop):
            for n in range(self.min_ngram, min(self.max_ngram, end + 1) + 1):
                gram = tuple(ctx[end - n + 1 : end + 1])
                ends = index.get(gram)
                if ends is None:
                    index[gram] = [end]
                    continue
                ends.append(end)
                seen = successors.get(gram)
                if seen is not None:
                    seen.push(ctx[end + 1], end)
                    if len(ends) > window:
                        seen.drop(ctx[ends[-window - 1] + 1])
        self.indexed[b] = max(self.indexed[b], stop)

    def children(self, b, context, path):
        index = self.index[b]
        tail = _tail(context, path, self.max_ngram)
        for n in range(min(self.max_ngram, len(tail)), self.min_ngram - 1, -1):
            gram = tuple(tail[-n:])
            ends = index.get(gram)
            if ends:
                return self._candidates(b, gram, ends, context)
        return []

    def _candidates(self, b: int, gram: tuple, ends: list[int], context: list[int]) -> list[Candidate]:
        seen = self.successors[b].get(gram)
        if seen is None:
            seen = self.successors[b][gram] = _Successors(ends, context, self.scan_last)
        if seen.ranked is None:
            n, total, order = len(gram), min(len(ends), self.scan_last), seen.order
            best = sorted(order, key=order.__getitem__)[: self.max_children]
            seen.ranked = [(tok, self._prior(n, rank, -order[tok][0] / total), (self.tag, min(n, 4), rank))
                           for rank, tok in enumerate(best)]
            seen.version = -1
        if seen.version != self.tracker.version:
            rate = self.tracker.rate
            seen.version, seen.candidates = self.tracker.version, [(tok, rate(key, prior), key)
                                                                   for tok, prior, key in seen.ranked]
        return seen.candidates


class CopyDrafter(_ContextIndexDrafter):
    """CopySpec: O(1) hash of the last `gamma` tokens -> most recent earlier position; copy a chain."""

    name = "copy"
    tag = "copy"
    PRIOR = 0.6

    def __init__(self, gamma: int = 3):
        super().__init__()
        self.gamma = gamma
        self._rates: dict[Hashable, float] = {}  # per depth key, at tracker version _rates_version
        self._rates_version = -1

    def _update(self, b: int, ctx: list[int]) -> None:
        index = self.index[b]
        g = self.gamma
        for end in range(max(self.indexed[b], g - 1), len(ctx) - 1):
            index[tuple(ctx[end - g + 1 : end + 1])] = end  # most recent occurrence wins
        self.indexed[b] = max(self.indexed[b], len(ctx) - 1)

    def children(self, b, context, path):
        tail = _tail(context, path, self.gamma)
        if len(tail) < self.gamma:
            return []
        end = self.index[b].get(tuple(tail))
        if end is None:
            return []
        if self._rates_version != self.tracker.version:
            self._rates, self._rates_version = {}, self.tracker.version
        key = (self.tag, min(len(path), 7))
        rate = self._rates.get(key)
        if rate is None:
            rate = self._rates[key] = self.tracker.rate(key, self.PRIOR)
        return [(context[end + 1], rate, key)]


class TokenRecyclingDrafter(Drafter):
    """Adjacency matrix [vocab, k] of last-seen top-k successors, shared by the batch and kept across calls."""

    name = "recycling"
    tag = "recycling"
    RANK_PRIORS = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)

    def __init__(self, vocab_size: int, k: int = 8):
        super().__init__()
        self.k = min(k, vocab_size)
        self.adj = np.full((vocab_size, self.k), -1, dtype=np.int64)  # "hot start": never reset between calls
        self._rank_keys = [(self.tag, rank) for rank in range(self.k)]
        self._rank_rates: list[float] = []  # per rank, at tracker version _rates_version
        self._rates_version = -1
        self._sorted = False

    def _record(self, tokens: Sequence[int] | np.ndarray, logits: Any) -> None:
        top = top_k_indices(logits, self.k)
        self.adj[np.asarray(tokens, dtype=np.int64)] = top  # last write wins for repeated tokens

    def reset(self, contexts, prefill_logits) -> None:
        if prefill_logits is None:
            return
        for b, ctx in enumerate(contexts):
            self.admit(b, ctx, prefill_logits[b])

    def admit(self, b, context, prefill_logits) -> None:
        if prefill_logits is not None:
            prompt = context[:-1]  # the last context token was sampled from the prefill, it has no logits row
            self._record(prompt, prefill_logits[: len(prompt)])

    def _rates(self) -> list[float]:
        if self._rates_version != self.tracker.version:
            priors = self.RANK_PRIORS
            self._rank_rates = [self.tracker.rate(key, priors[min(rank, len(priors) - 1)])
                                for rank, key in enumerate(self._rank_keys)]
            self._rates_version = self.tracker.version
            self._sorted = all(a >= b for a, b in zip(self._rank_rates, self._rank_rates[1:]))
        return self._rank_rates

    @property
    def children_sorted(self) -> bool:
        """Candidates come in rank order: sorted while the learned rates fall with the rank (they usually do)."""
        self._rates()
        return self._sorted

    def children(self, b, context, path):
        row = self.adj[path[-1] if path else context[-1]].tolist()
        rates = self._rank_rates if self._rates_version == self.tracker.version else self._rates()
        if row[-1] >= 0 and min(row) >= 0:  # a recorded row: every rank holds a token
            return list(zip(row, rates, self._rank_keys))
        out = []
        for tok, rate, key in zip(row, rates, self._rank_keys):
            if tok < 0:
                break
            out.append((tok, rate, key))
        return out

    def observe(self, b, tree, logits, path, context) -> None:
        super().observe(b, tree, logits, path, context)
        self._record(tree.tokens, logits[: len(tree)])


_probability = operator.itemgetter(1)


class CombinedDrafter(Drafter):
    """Union of several drafters' candidates; a token proposed twice keeps its best estimate (and the place it
    was first proposed at, which breaks ties in the sort by probability)."""

    children_sorted = True

    def __init__(self, parts: list[Drafter]):
        super().__init__()
        self.parts = parts
        self.name = "+".join(p.name for p in parts)
        # a duck-typed part (any object with `children`) proposes
        self.proposes = any(getattr(p, "proposes", True) for p in parts)

    def reset(self, contexts, prefill_logits) -> None:
        for p in self.parts:
            p.reset(contexts, prefill_logits)

    def admit(self, b, context, prefill_logits) -> None:
        for p in self.parts:
            p.admit(b, context, prefill_logits)

    def prepare(self, contexts, active, max_depth) -> None:
        for p in self.parts:
            p.prepare(contexts, active, max_depth)

    def children(self, b, context, path):
        parts = self.parts
        cands = parts[0].children(b, context, path)
        best: dict[int, Candidate] = {cand[0]: cand for cand in cands}
        if len(best) == len(cands):
            parts = parts[1:]
        else:  # the first part repeated a token: the first of its best estimates wins, as below
            best = {}
        for part in parts:
            for cand in part.children(b, context, path):
                old = best.get(cand[0])
                if old is None or cand[1] > old[1]:
                    best[cand[0]] = cand
        # highest first, ties in proposal order (a reverse sort is stable too)
        return sorted(best.values(), key=_probability, reverse=True)

    def observe(self, b, tree, logits, path, context) -> None:
        for p in self.parts:
            p.observe(b, tree, logits, path, context)

    @property
    def draft_forward_passes(self) -> int:
        return sum(p.draft_forward_passes for p in self.parts)


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
