"""Drafters of the torch runtime: the model-free ones (re-exported from `elision.runtime.generation.drafters`)
plus `ModelDrafter` ("draft-model", "layer-skip"): a draft model (or the target with decoder layers bypassed)
decodes a greedy chain with a confidence stop; its top alternatives become siblings. `make_drafter` builds any
of them from a name like "recycling+lookup".
"""
from __future__ import annotations

import torch

from elision.apps.specdec.backends import HFCausalLMBackend
from elision.apps.specdec.session import KVSession
from elision.runtime.generation.drafters import (  # noqa: F401 - re-exported: the drafters' public home for torch users
    BASIC_DRAFTERS,
    AcceptanceTracker,
    Candidate,
    CombinedDrafter,
    CopyDrafter,
    Drafter,
    NoDrafter,
    PromptLookupDrafter,
    TokenRecyclingDrafter,
    basic_drafter,
)


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
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"drafter must be a non-empty name; known drafters: {', '.join(KNOWN_DRAFTERS)}")
    names = [s.strip() for s in spec.split("+")]
    parts: list[Drafter] = []
    for name in names:
        if name in BASIC_DRAFTERS:
            parts.append(basic_drafter(name, vocab_size, recycling))
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
