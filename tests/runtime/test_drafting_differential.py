"""The fast drafters, token trees and tree builders give exactly what they gave before they were made fast.

`drafting_reference.py` is the implementation before issue 13, frozen. Every property drives a reference and a live
instance through the same random decoding history (contexts, prefill logits, trees, acceptance paths, logits of
the verified nodes) and requires identical outputs: the same trees (tokens, parents, scores, keys, depths, sibling
order), the same candidate lists, the same learned state after `observe` (acceptance statistics, the recycling
matrix, the lookup index) and the same ancestor masks. Floats are compared exactly (`==`), not with a tolerance.
"""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import drafting_reference as ref
from elision.runtime.generation import drafters as live
from elision.runtime.generation import tree_builders as builders
from elision.runtime.generation.top_k import top_k_indices
from elision.runtime.generation.tree import TokenTree
from elision.runtime.generation.verify import verify_greedy

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEMPLATES = ["chain-1", "chain-5", "2x2", "4x2x1", "3x3x2", "[(0,), (1,), (0, 0), (1, 0), (0, 0, 0)]",
             "[(2,), (0,), (0, 1), (1,), (0, 1, 0), (5,)]"]


def tree_fields(tree) -> tuple:
    return (tree.tokens, tree.parents, tree.scores, tree.keys, tree.depths,
            [list(kids.items()) for kids in tree.children])  # items(): the sibling order matters (sampling walks it)


def assert_same_tree(new, old) -> None:
    assert tree_fields(new) == tree_fields(old)
    assert [type(t) for t in new.tokens] == [type(t) for t in old.tokens]  # Python ints and floats, whatever
    assert [type(s) for s in new.scores] == [type(s) for s in old.scores]  # numbers the drafters handed in
    assert np.array_equal(new.ancestor_mask(), old.ancestor_mask())


def make(module, name: str, vocab: int):
    def part(p: str):
        if p == "short-lookup":  # a short window: successors leave it (and a count drops) within a few steps
            return module.PromptLookupDrafter(max_ngram=3, min_ngram=1, max_children=2, scan_last=3)
        if p == "long-copy":
            return module.CopyDrafter(gamma=5)
        return module.basic_drafter(p, vocab)

    parts = [part(p) for p in name.split("+")]
    return parts[0] if len(parts) == 1 else module.CombinedDrafter(parts)


def parts_of(drafter) -> list:
    return drafter.parts if hasattr(drafter, "parts") else [drafter]


def assert_same_state(new, old) -> None:
    assert type(new).__name__ == type(old).__name__
    assert new.tracker.stats == old.tracker.stats
    for p_new, p_old in zip(parts_of(new), parts_of(old)):
        assert p_new.tracker.stats == p_old.tracker.stats
        if hasattr(p_old, "adj"):
            assert np.array_equal(p_new.adj, p_old.adj)
        if hasattr(p_old, "index"):
            assert p_new.index == p_old.index and p_new.indexed == p_old.indexed


@st.composite
def histories(draw):
    """One or two prompts (a batch, as the torch loop decodes) over a small vocabulary (so n-grams repeat), and per
    step: the depth limit, which path each sequence accepts (random walk choices) and its bonus token. A seed draws
    the prefill logits and the verified nodes' logits, rounded to a few values when `coarse` (ties in the top-k)."""
    vocab = draw(st.sampled_from([5, 9, 12, 24]))
    alphabet = st.integers(0, vocab - 1)
    prompts = draw(st.lists(st.lists(alphabet, min_size=1, max_size=40), min_size=1, max_size=2))
    seed = draw(st.integers(0, 2**32 - 1))
    steps = draw(st.lists(st.tuples(st.integers(0, 16), st.lists(st.integers(0, 5), max_size=8), alphabet),
                          min_size=1, max_size=10))
    coarse = draw(st.booleans())
    return vocab, prompts, seed, steps, coarse


def random_logits(rng: np.random.Generator, shape: tuple, coarse: bool) -> np.ndarray:
    logits = rng.standard_normal(shape).astype(np.float32)
    return np.round(logits) if coarse else logits


def walk(tree, choices: list[int]) -> list[int]:
    """An accepted path: from the root, follow child number `c % (children + 1)`; the last option stops."""
    node, path = 0, [0]
    for c in choices:
        kids = list(tree.children[node].values())
        pick = c % (len(kids) + 1)
        if pick == len(kids):
            break
        node = kids[pick]
        path.append(node)
    return path


def run_history(name: str, tree_spec: str, budget: int, history, sized: bool = False) -> None:
    vocab, prompts, seed, steps, coarse = history
    rng = np.random.default_rng(seed)
    new, old = make(live, name, vocab), make(ref, name, vocab)
    template = builders.parse_tree_spec(tree_spec)
    curve = builders.VerifyCostCurve([1, 2, 4, 8, 16], list(rng.uniform(1.0, 3.0, 5)))
    old_curve = ref.VerifyCostCurve(curve.sizes, curve.seconds)
    ctx_new = [p + [int(rng.integers(vocab))] for p in prompts]
    ctx_old = [list(c) for c in ctx_new]
    prefill = random_logits(rng, (len(prompts), max(map(len, prompts)), vocab), coarse)
    new.reset(ctx_new, prefill)
    old.reset(ctx_old, prefill)
    assert_same_state(new, old)
    for depth, choices, bonus in steps:
        new.prepare(ctx_new, [True] * len(prompts), [depth] * len(prompts))
        old.prepare(ctx_old, [True] * len(prompts), [depth] * len(prompts))
        for b in range(len(prompts)):
            if template is not None:
                t_new = builders.build_static(new, b, ctx_new[b], template, depth)
                t_old = ref.build_static(old, b, ctx_old[b], template, depth)
            else:
                t_old = ref.build_dynamic(old, b, ctx_old[b], budget, depth)
                t_new = builders.build_dynamic(new, b, ctx_new[b], budget, depth)
                assert_same_tree(t_new, t_old)
                n = ref.choose_tree_size([t_old], old_curve, budget)
                assert builders.choose_tree_size([t_new], curve, budget) == n
                if sized:
                    t_new = builders.build_dynamic(new, b, ctx_new[b], budget, depth, curve=curve)
                else:
                    t_new = t_new.truncate(n)
                t_old = t_old.truncate(n)
            assert_same_tree(t_new, t_old)
            path = walk(t_old, choices[b:] + choices[:b])
            logits = random_logits(rng, (len(t_old), vocab), coarse)
            argmax = logits.argmax(-1).tolist()
            assert verify_greedy(t_new, argmax) == verify_greedy(t_old, argmax)
            accepted = [t_old.tokens[i] for i in path[1:]] + [(bonus + b) % vocab]
            ctx_new[b].extend(accepted)
            ctx_old[b].extend(accepted)
            new.observe(b, t_new, logits, path, ctx_new[b])
            old.observe(b, t_old, logits, path, ctx_old[b])
            assert_same_state(new, old)
            # candidates after random paths (not only the ones the builders asked for)
            for choice in choices:
                tail = [c % vocab for c in choices[: choice % (len(choices) + 1)]]
                assert new.children(b, ctx_new[b], tail) == old.children(b, ctx_old[b], tail)


DRAFTERS = ["lookup", "copy", "recycling", "recycling+lookup", "lookup+copy", "copy+recycling+lookup", "none",
            "short-lookup", "recycling+short-lookup+long-copy"]


@SETTINGS
@given(history=histories(), name=st.sampled_from(DRAFTERS), budget=st.integers(1, 33), sized=st.booleans())
def test_dynamic_trees_and_learning_match_reference(history, name, budget, sized):
    run_history(name, "dynamic", budget, history, sized)


@SETTINGS
@given(history=histories(), name=st.sampled_from(DRAFTERS), template=st.sampled_from(TEMPLATES))
def test_static_trees_and_learning_match_reference(history, name, template):
    run_history(name, f"static:{template}", 0, history)


class Scripted:
    """A drafter answering from a fixed list of candidate lists (picked by depth and last token): lists with equal
    probabilities, repeated tokens, probabilities <= 0 and > 1, to reach every tie and corner of the builders and
    of the '+' union."""

    def __init__(self, table: list, tag: str, claims_sorted: bool = False):
        self.table, self.name, self.tag = table, tag, tag
        if claims_sorted:
            self.children_sorted = True  # only set when every list is sorted by probability

    def children(self, b, context, path):
        last = path[-1] if path else context[-1]
        return list(self.table[(7 * len(path) + last) % len(self.table)])

    def reset(self, contexts, prefill_logits):
        pass

    def prepare(self, contexts, active, max_depth):
        pass

    def observe(self, b, tree, logits, path, context):
        pass

    draft_forward_passes = 0


@st.composite
def scripts(draw, tag: str):
    probs = st.sampled_from([-0.5, 0.0, 0.1, 0.25, 0.5, 0.9, 1.0, 1.7, 2.5])
    table = draw(st.lists(st.lists(st.tuples(st.integers(0, 5), probs), max_size=6), min_size=1, max_size=12))
    claims_sorted = draw(st.booleans())
    if claims_sorted:
        table = [sorted(v, key=lambda c: -c[1]) for v in table]
    if draw(st.booleans()):  # numpy scalars, as a drafter reading arrays might hand out
        table = [[(np.int64(tok), np.float64(p)) for tok, p in v] for v in table]
    return [[(tok, p, (tag, i)) for i, (tok, p) in enumerate(v)] for v in table], claims_sorted


@settings(SETTINGS, max_examples=300)
@given(first=scripts("a"), second=scripts("b"), budget=st.integers(1, 40), depth=st.integers(0, 7),
       template=st.sampled_from(TEMPLATES), root=st.integers(0, 5), combine=st.booleans(),
       sizes=st.lists(st.integers(1, 12), min_size=1, max_size=5, unique=True),
       seconds=st.lists(st.floats(0.5, 4.0), min_size=5, max_size=5))
def test_builders_match_reference_on_scripted_candidates(first, second, budget, depth, template, root, combine,
                                                         sizes, seconds):
    def drafter(module):
        parts = [Scripted(first[0], "a", first[1]), Scripted(second[0], "b", second[1])]
        return module.CombinedDrafter(parts) if combine else parts[0]

    new, old = drafter(live), drafter(ref)
    context = [3, root]
    t_new = builders.build_dynamic(new, 0, context, budget, depth)
    t_old = ref.build_dynamic(old, 0, context, budget, depth)
    assert_same_tree(t_new, t_old)
    # measured sizes in any order (the cost of n is the cheapest at a size >= n, extrapolated from the last one),
    # often all below the budget
    curve = builders.VerifyCostCurve(sizes, seconds[: len(sizes)])
    old_curve = ref.VerifyCostCurve(sizes, seconds[: len(sizes)])
    for min_size in (1, 2, 3):
        n = ref.choose_tree_size([t_old], old_curve, budget, min_size)
        assert builders.choose_tree_size([t_new], curve, budget, min_size) == n
        sized = builders.build_dynamic(new, 0, context, budget, depth, curve=curve, min_size=min_size)
        assert_same_tree(sized, t_old.truncate(n))
    assert [curve.cost(n) for n in range(1, 40)] == [old_curve.cost(n) for n in range(1, 40)]
    spec = builders.StaticTemplate.parse(template)
    assert_same_tree(builders.build_static(new, 0, context, spec, depth), ref.build_static(old, 0, context, spec, depth))
    if combine:
        for depth_now in range(3):
            for last in range(6):
                path = [0] * (depth_now - 1) + [last] if depth_now else []
                assert new.children(0, [last], path) == old.children(0, [last], path)


@st.composite
def random_trees(draw):
    n = draw(st.integers(1, 80))
    parents = [-1] + [draw(st.integers(0, i - 1)) for i in range(1, n)]
    return parents, draw(st.lists(st.integers(0, 50), min_size=n, max_size=n))


@SETTINGS
@given(tree=random_trees(), cut=st.integers(-2, 90))
def test_token_tree_mask_truncate_and_shrink(tree, cut):
    parents, tokens = tree
    new, old = TokenTree.root(tokens[0]), ref.TokenTree.root(tokens[0])
    node_of_call = [0]  # a repeated (parent, token) returns the existing node, with the higher score
    for i in range(1, len(parents)):
        score = 1.0 / (1 + (i * 7) % 5)
        parent = node_of_call[parents[i]]
        node = new.add(parent, tokens[i], score, ("k", i))
        assert node == old.add(parent, tokens[i], score, ("k", i))
        node_of_call.append(node)
    assert_same_tree(new, old)
    # the mask by its definition: j is i or an ancestor of i
    mask = new.ancestor_mask()
    assert mask.shape == (len(new), len(new)) and mask.dtype == bool
    assert [set(np.flatnonzero(row)) for row in mask] == [set(new.path_nodes(i)) for i in range(len(new))]
    assert_same_tree(new.truncate(cut), old.truncate(cut))
    shrunk = new.truncate(len(new))
    shrunk.shrink(cut)
    assert_same_tree(shrunk, old.truncate(cut))
    assert_same_tree(new, old)  # truncating copies: the original is untouched
    # a tree built from its fields (no add) derives its ancestor bits
    rebuilt = TokenTree(tokens=list(new.tokens), parents=list(new.parents), scores=list(new.scores),
                        keys=list(new.keys), depths=list(new.depths), children=[dict(c) for c in new.children])
    assert np.array_equal(rebuilt.ancestor_mask(), old.ancestor_mask())


@st.composite
def logit_arrays(draw):
    shape = draw(st.sampled_from([(7,), (1, 12), (3, 20), (2, 3, 16), (40, 9), (5, 64), (0, 10)]))
    dtype = draw(st.sampled_from([np.float32, np.float64, np.float16, np.int64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    values = rng.standard_normal(shape) * 4
    if draw(st.booleans()):
        values = np.round(values)  # ties
    out = values.astype(dtype)
    if out.size and dtype != np.int64 and draw(st.booleans()):
        flat = out.reshape(-1)
        specials = draw(st.lists(st.sampled_from([np.inf, -np.inf, np.nan]), max_size=4))
        flat[rng.integers(0, flat.size, len(specials))] = specials
    return out


@SETTINGS
@given(logits=logit_arrays(), k=st.integers(1, 9))
def test_top_k_matches_reference(logits, k):
    k = min(k, logits.shape[-1])
    got = top_k_indices(logits, k)
    assert got.shape == logits.shape[:-1] + (k,)
    assert np.array_equal(got, ref.top_k_indices(logits, k))


def test_top_k_of_torch_tensors_is_unchanged():
    torch = pytest.importorskip("torch")
    x = torch.randn(4, 30)
    assert np.array_equal(top_k_indices(x, 8), ref.top_k_indices(x, 8))


@SETTINGS
@given(scores=st.lists(st.lists(st.floats(0.0, 1.0), max_size=40), min_size=1, max_size=4),
       seconds=st.lists(st.floats(0.1, 5.0), min_size=6, max_size=6), max_size=st.integers(1, 48),
       min_size=st.integers(0, 4), live_mask=st.lists(st.booleans(), min_size=4, max_size=4))
def test_choose_tree_size_matches_reference(scores, seconds, max_size, min_size, live_mask):
    trees_new, trees_old = [], []
    for s, alive in zip(scores, live_mask):
        chain = list(range(len(s)))
        t_new, t_old = TokenTree.chain(0, chain), ref.TokenTree.chain(0, chain)
        t_new.scores = t_old.scores = [1.0] + sorted(s, reverse=True)
        trees_new.append(t_new if alive else None)
        trees_old.append(t_old if alive else None)
    sizes = [1, 2, 3, 5, 8, 13]
    curve, old_curve = builders.VerifyCostCurve(sizes, seconds), ref.VerifyCostCurve(sizes, seconds)
    assert (builders.choose_tree_size(trees_new, curve, max_size, min_size)
            == ref.choose_tree_size(trees_old, old_curve, max_size, min_size))
