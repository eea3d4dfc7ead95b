"""Drafters: cheap guesses of the target's continuation, exposed as a token tree.

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
* `ModelDrafter` ("draft-model", "layer-skip"): a draft model (or the target with decoder layers
  bypassed) decodes a greedy chain with a confidence stop; its top alternatives become siblings.
* `CombinedDrafter` ("a+b"): union of several drafters' children (for example a recycling tree plus a
  lookup chain).
"""
from __future__ import annotations

from collections import Counter
from typing import Hashable, Sequence

import numpy as np
import torch

from elision.runtime.specdec.tree import TokenTree

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

    def reset(self, contexts: list[list[int]], prefill_logits: torch.Tensor | None) -> None:
        """Start of a generate call: prompts (with the first generated token appended) and prefill logits."""

    def prepare(self, contexts: list[list[int]], active: list[bool], max_depth: list[int]) -> None:
        """Before trees are built each step (model drafters decode their chains here)."""

    def children(self, b: int, context: list[int], path: list[int]) -> list[Candidate]:
        return []

    def observe(self, b: int, tree: TokenTree, logits: torch.Tensor, path: list[int], context: list[int]) -> None:
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


class PromptLookupDrafter(Drafter):
    name = "lookup"
    tag = "lookup"

    def __init__(self, max_ngram: int = 4, min_ngram: int = 1, max_children: int = 3, scan_last: int = 64):
        super().__init__()
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram
        self.max_children = max_children
        self.scan_last = scan_last
        self.index: list[dict] = []
        self.indexed: list[int] = []

    # acceptance prior by matched n-gram length, before online estimates exist
    @staticmethod
    def _prior(n: int, rank: int, share: float) -> float:
        base = {1: 0.3, 2: 0.5, 3: 0.65}.get(n, 0.75)
        return base * share if rank == 0 else base * share * 0.7

    def reset(self, contexts, prefill_logits) -> None:
        self.index = [dict() for _ in contexts]
        self.indexed = [0] * len(contexts)
        for b, ctx in enumerate(contexts):
            self._update(b, ctx)

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

    def observe(self, b, tree, logits, path, context) -> None:
        super().observe(b, tree, logits, path, context)
        self._update(b, context)


class CopyDrafter(Drafter):
    """CopySpec: O(1) hash of the last `gamma` tokens -> most recent earlier position; copy a chain."""

    name = "copy"
    tag = "copy"

    def __init__(self, gamma: int = 3):
        super().__init__()
        self.gamma = gamma
        self.index: list[dict] = []
        self.indexed: list[int] = []

    def reset(self, contexts, prefill_logits) -> None:
        self.index = [dict() for _ in contexts]
        self.indexed = [0] * len(contexts)
        for b, ctx in enumerate(contexts):
            self._update(b, ctx)

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

    def observe(self, b, tree, logits, path, context) -> None:
        super().observe(b, tree, logits, path, context)
        self._update(b, context)


class TokenRecyclingDrafter(Drafter):
    """Adjacency matrix [vocab, k] of last-seen top-k successors, shared by the batch and kept across calls."""

    name = "recycling"
    tag = "recycling"
    RANK_PRIORS = (0.45, 0.12, 0.06, 0.04, 0.03, 0.02, 0.015, 0.01)

    def __init__(self, vocab_size: int, k: int = 8):
        super().__init__()
        self.k = min(k, vocab_size)
        self.adj = np.full((vocab_size, self.k), -1, dtype=np.int64)  # "hot start": never reset between calls

    def _record(self, tokens: Sequence[int] | np.ndarray, logits: torch.Tensor) -> None:
        top = torch.topk(logits, self.k, dim=-1).indices.numpy()
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


class ModelDrafter(Drafter):
    """Greedy chain from a draft backend with a confidence stop; top alternatives become siblings.

    The draft backend keeps its own KV cache of the committed context; every round it keeps the longest
    prefix that still matches the context, feeds the rest (batched, different lengths per sequence),
    then decodes up to `max_steps` tokens, stopping a sequence when the draft's top probability falls
    below an adaptive threshold (Draft & Verify's rule: raise it when drafts are rejected, lower it when
    they are accepted).
    """

    def __init__(self, backend, name: str, max_steps: int = 8, threshold: float = 0.5, alternatives: int = 2):
        super().__init__()
        self.backend = backend
        self.name = name
        self.tag = name
        self.max_steps = max_steps
        self.threshold = threshold
        self.alternatives = alternatives
        self.session = None
        # back-off when drafts keep failing (a skip set or draft model that does not fit this text):
        # after `patience` fruitless rounds a sequence stops drafting for 2, 4, ... 32 steps, then probes again
        self.patience = 3
        self.misses: list[int] = []
        self.backoff: list[int] = []
        self.cooldown: list[int] = []
        self.cached: list[list[int]] = []
        self.chains: list[list[list[tuple[int, float]]]] = []
        self._passes = 0

    @property
    def draft_forward_passes(self) -> int:
        return self._passes

    def reset(self, contexts, prefill_logits) -> None:
        from elision.runtime.specdec.session import KVSession

        capacity = max(len(c) for c in contexts) + 2048
        self.capacity = capacity
        self.session = KVSession(self.backend, len(contexts), capacity)
        self.cached = [[] for _ in contexts]
        self.chains = [[] for _ in contexts]
        self.misses = [0] * len(contexts)
        self.backoff = [1] * len(contexts)
        self.cooldown = [0] * len(contexts)
        self._passes = 0

    def _keep_prefix(self, keeps: list[int]) -> None:
        table = self.session.table
        if all(keeps[b] == len(self.cached[b]) for b in range(len(keeps))):
            return
        # gather the first keeps[b] valid slots of every sequence to the front
        b_size = table.batch_size
        m = max(keeps)
        index = torch.zeros((b_size, m), dtype=torch.long)
        new_pos = torch.full((b_size, m), -1, dtype=torch.long)
        for b in range(b_size):
            valid = torch.nonzero(table.pos[b, : table.length] >= 0).flatten()[: keeps[b]]
            index[b, : len(valid)] = valid
            new_pos[b, : len(valid)] = table.pos[b, valid]
            table.seq_lens[b] = keeps[b]
            self.cached[b] = self.cached[b][: keeps[b]]
        table.pos.fill_(-1)
        table.pos[:, :m] = new_pos
        table.length = m
        self.session.backend.select(index, 0)

    def prepare(self, contexts, active, max_depth) -> None:
        b_size = len(contexts)
        if max(len(c) for c in contexts) + self.max_steps + 2 > self.capacity:
            self.reset(contexts, None)
        keeps = []
        for b, ctx in enumerate(contexts):
            cached = self.cached[b]
            n = 0
            limit = min(len(cached), len(ctx) - 1)
            while n < limit and cached[n] == ctx[n]:
                n += 1
            keeps.append(n)
        self._keep_prefix(keeps)
        drafting_now = []
        for b in range(b_size):
            cooling = self.cooldown[b] > 0
            if cooling and active[b]:
                self.cooldown[b] -= 1
            drafting_now.append(active[b] and max_depth[b] > 0 and not cooling)
        feeds = [ctx[keeps[b] :] if drafting_now[b] else [] for b, ctx in enumerate(contexts)]
        chains: list[list[tuple[int, float, list]]] = [[] for _ in range(b_size)]
        if not any(feeds):
            self.chains = chains
            return
        logits = self.session.extend_chains(feeds)
        self._passes += 1
        self.session.commit([list(range(len(f))) for f in feeds])
        for b, f in enumerate(feeds):
            if f:
                self.cached[b] = self.cached[b] + f
        last = torch.stack([logits[b, max(len(f) - 1, 0)] for b, f in enumerate(feeds)])
        drafting = [bool(f) for f in feeds]
        for step in range(self.max_steps):
            probs = torch.softmax(last, dim=-1)
            top_p, top_t = torch.topk(probs, 1 + self.alternatives, dim=-1)
            next_feed: list[list[int]] = [[] for _ in range(b_size)]
            for b in range(b_size):
                if not drafting[b]:
                    continue
                conf = float(top_p[b, 0])
                alts = [(int(t), float(p)) for t, p in zip(top_t[b, 1:].tolist(), top_p[b, 1:].tolist())]
                chains[b].append((int(top_t[b, 0]), conf, alts))
                if conf < self.threshold or len(chains[b]) >= min(self.max_steps, max_depth[b]):
                    drafting[b] = False
                else:
                    next_feed[b] = [int(top_t[b, 0])]
            if not any(next_feed):
                break
            logits = self.session.extend_chains(next_feed)
            self._passes += 1
            self.session.commit([[0] if f else [] for f in next_feed])
            for b, f in enumerate(next_feed):
                if f:
                    self.cached[b] = self.cached[b] + f
            last = logits[:, 0]
        self.chains = chains

    def children(self, b, context, path):
        chain = self.chains[b]
        d = len(path)
        if d >= len(chain):
            return []
        for i in range(d):
            if chain[i][0] != path[i]:
                return []
        tok, conf, alts = chain[d]
        out = [(tok, conf, (self.tag, 0))]
        out += [(t, p, (self.tag, r + 1)) for r, (t, p) in enumerate(alts)]
        return out

    def observe(self, b, tree, logits, path, context) -> None:
        super().observe(b, tree, logits, path, context)
        drafted = len(self.chains[b])
        if drafted:
            accepted = sum(1 for node in path[1:] if isinstance(tree.keys[node], tuple) and tree.keys[node][0] == self.tag)
            if accepted:
                self.misses[b], self.backoff[b] = 0, 1
            else:
                self.misses[b] += 1
                if self.misses[b] >= self.patience:
                    self.backoff[b] = min(32, self.backoff[b] * 2)
                    self.cooldown[b] = self.backoff[b]
                    self.misses[b] = 0
            # Draft & Verify adaptive stop threshold
            target = self.threshold + 0.02 if accepted < drafted else self.threshold - 0.02
            self.threshold = min(0.95, max(0.05, 0.9 * self.threshold + 0.1 * target))


KNOWN_DRAFTERS = ("none", "lookup", "recycling", "copy", "layer-skip", "draft-model")


def default_skip_layers(num_layers: int, ratio: float = 0.45) -> frozenset[int]:
    """SWIFT-like default: skip about `ratio` of the layers, spread over the middle (first and last kept)."""
    middle = list(range(1, num_layers - 1))
    k = min(len(middle), max(1, round(num_layers * ratio))) if middle else 0
    if k == 0:
        return frozenset()
    step = len(middle) / k
    return frozenset(middle[int(i * step)] for i in range(k))


def make_drafter(
    spec: str,
    *,
    vocab_size: int,
    target_model=None,
    draft_model=None,
    skip_layers: frozenset[int] | None = None,
    recycling: TokenRecyclingDrafter | None = None,
    target_backend=None,
) -> Drafter:
    """Build a drafter from a name like "recycling+lookup"; unknown names raise ValueError."""
    from elision.runtime.specdec.backends import HFCausalLMBackend

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"drafter must be a non-empty name; known drafters: {', '.join(KNOWN_DRAFTERS)}")
    names = [s.strip() for s in spec.split("+")]
    parts: list[Drafter] = []
    for name in names:
        if name == "none":
            parts.append(NoDrafter())
        elif name == "lookup":
            parts.append(PromptLookupDrafter())
        elif name == "copy":
            parts.append(CopyDrafter())
        elif name == "recycling":
            parts.append(recycling if recycling is not None else TokenRecyclingDrafter(vocab_size))
        elif name == "layer-skip":
            if target_model is None and hasattr(target_backend, "layer_skip_backend"):
                # a compiled backend provides its own bypassed-layer draft (the lead's layer-skip-draft pass)
                n_layers = int(target_backend.num_layers)
                skip = frozenset(skip_layers) if skip_layers is not None else default_skip_layers(n_layers)
                parts.append(ModelDrafter(target_backend.layer_skip_backend(skip), "layer-skip"))
                continue
            if target_model is None:
                raise ValueError("the layer-skip drafter needs a Hugging Face target model or a backend with layer_skip_backend()")
            n_layers = int(target_model.config.num_hidden_layers)
            skip = frozenset(skip_layers) if skip_layers is not None else default_skip_layers(n_layers)
            if 0 in skip:
                raise ValueError("layer-skip cannot skip layer 0 (keep the first layer)")
            parts.append(ModelDrafter(HFCausalLMBackend(target_model, skip_layers=skip), "layer-skip"))
        elif name == "draft-model":
            if draft_model is None:
                raise ValueError("drafter 'draft-model' needs draft_model=<a causal LM sharing the target's vocabulary>")
            draft_vocab = int(draft_model.get_output_embeddings().weight.shape[0])
            if draft_vocab != vocab_size:
                raise ValueError(f"draft model vocabulary ({draft_vocab}) differs from the target's ({vocab_size})")
            parts.append(ModelDrafter(HFCausalLMBackend(draft_model), "draft-model", threshold=0.3))
        else:
            raise ValueError(f"unknown drafter {name!r}; known drafters: {', '.join(KNOWN_DRAFTERS)} (combine with '+')")
    return parts[0] if len(parts) == 1 else CombinedDrafter(parts)
