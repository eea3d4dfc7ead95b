"""Sampling with speculation draws from exactly the target distribution (chi-square tests).

1. The multi-candidate rejection rule alone, on synthetic distributions and a fixed tree.
2. End to end, for every drafter: a small-vocabulary random Llama, a repetitive prompt (so the drafters do
   propose and the rejection path is exercised), one batched call with many copies of the prompt, and the
   empirical joint distribution of the first two generated tokens plus the marginal of the third compared
   with the exact distribution computed from the model's processed logits (temperature, top-k, top-p).
Seeds are fixed, so the tests are deterministic; the significance threshold is 1e-3.
"""
from __future__ import annotations

import itertools

import pytest
import torch

from elision.apps.specdec import generate
from specdec_helpers import chi_square_ok
from elision.runtime.generation.tree import TokenTree
from elision.apps.specdec.verify import SamplingConfig, target_probs, verify_sampling

VOCAB = 6
N = 1000


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_target_probs_match_transformers_warpers():
    from transformers.generation.logits_process import (
        LogitsProcessorList,
        TemperatureLogitsWarper,
        TopKLogitsWarper,
        TopPLogitsWarper,
    )

    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0)) * 3
    for t, k, p in [(1.0, 0, 1.0), (0.7, 5, 1.0), (1.3, 0, 0.8), (0.5, 10, 0.6)]:
        procs = LogitsProcessorList([TemperatureLogitsWarper(t)] + ([TopKLogitsWarper(k)] if k else [])
                                    + ([TopPLogitsWarper(p)] if p < 1 else []))
        expected = torch.softmax(procs(torch.zeros(4, 1, dtype=torch.long), logits.clone()), -1)
        got = target_probs(logits, SamplingConfig(True, t, k, p))
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_rejection_rule_preserves_distribution():
    """Tree root -> {2, 0, 4}, 2 -> {1, 3}: the first two sampled tokens follow p exactly."""
    gen = torch.Generator().manual_seed(0)
    tree = TokenTree.root(5)
    a = tree.add(0, 2, 0.5)
    tree.add(0, 0, 0.2)
    tree.add(0, 4, 0.1)
    tree.add(a, 1, 0.3)
    tree.add(a, 3, 0.2)
    probs = torch.softmax(torch.randn(len(tree), VOCAB, generator=torch.Generator().manual_seed(1)) * 1.5, -1)
    # exact distribution of (first, second): the second is drawn from the child's row when a child was accepted
    child_of = {tree.tokens[i]: i for i in tree.children[0].values()}
    counts = torch.zeros(VOCAB, VOCAB)
    n = 6000
    for _ in range(n):
        path, bonus = verify_sampling(tree, probs, gen)
        toks = [tree.tokens[i] for i in path[1:]] + [bonus]
        if len(toks) >= 2:
            counts[toks[0], toks[1]] += 1
        else:  # first token sampled from the residual; its continuation is not part of this tree
            counts[toks[0], :] += 0
    # P(first = x) = p_root(x); P(second = y | first = x) = p_child(x)(y) when x has a node in the tree
    joint = torch.zeros(VOCAB, VOCAB)
    for x in range(VOCAB):
        if x in child_of:
            joint[x] = probs[0, x] * probs[child_of[x]]
    covered = joint.sum()
    assert chi_square_ok(counts.flatten(), joint.flatten() / covered, int(counts.sum())) > 1e-3
    first = counts.sum(1)
    assert abs(float(first.sum()) / n - float(covered)) < 4 * (float(covered) * (1 - float(covered)) / n) ** 0.5


def _exact_distributions(model, cfg: SamplingConfig, PROMPT: list[int]):
    """P(t1, t2) [V, V] and P(t3) [V] under the processed target distribution."""
    with torch.no_grad():
        p1 = target_probs(model(torch.tensor([PROMPT])).logits[0, -1], cfg)
        ctx2 = torch.tensor([PROMPT + [a] for a in range(VOCAB)])
        p2 = target_probs(model(ctx2).logits[:, -1], cfg)  # [V, V]
        pairs = list(itertools.product(range(VOCAB), repeat=2))
        ctx3 = torch.tensor([PROMPT + [a, b] for a, b in pairs])
        p3 = target_probs(model(ctx3).logits[:, -1], cfg).view(VOCAB, VOCAB, VOCAB)
    joint12 = p1[:, None] * p2
    marg3 = (joint12[:, :, None] * p3).sum((0, 1))
    return joint12, marg3


@pytest.fixture(scope="module")
def small_models():
    import transformers

    torch.manual_seed(0)
    cfg = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
               vocab_size=VOCAB, max_position_embeddings=64)
    target = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=3, **cfg)).eval()
    draft = transformers.LlamaForCausalLM(transformers.LlamaConfig(num_hidden_layers=1, **cfg)).eval()
    with torch.no_grad():  # sharpen the random model so distributions are far from uniform
        target.lm_head.weight.mul_(8.0)
        draft.lm_head.weight.mul_(8.0)
    # the prompt: the target's own greedy continuation of [1, 2, 3], which (random models loop) repeats itself,
    # so lookup / copy drafts are plausible under the target and the acceptance path is exercised
    prompt = target.generate(torch.tensor([[1, 2, 3]]), attention_mask=torch.ones(1, 3, dtype=torch.long),
                             max_new_tokens=9, do_sample=False, pad_token_id=0)[0].tolist()
    return target, draft, prompt


@pytest.mark.parametrize(
    "drafter,tree,cfg",
    [
        ("lookup", "static:2x2", SamplingConfig(True, 1.0, 0, 1.0)),
        ("recycling", "static:3x2", SamplingConfig(True, 0.8, 4, 1.0)),
        ("copy", "static:chain-3", SamplingConfig(True, 1.3, 0, 0.9)),
        ("layer-skip", "static:2x1", SamplingConfig(True, 1.0, 0, 1.0)),
        ("draft-model", "static:2x2", SamplingConfig(True, 0.7, 0, 1.0)),
        ("recycling+lookup", "static:[(0,), (1,), (0, 0), (2,)]", SamplingConfig(True, 1.0, 5, 0.95)),
    ],
)
def test_sampling_matches_target_distribution(small_models, drafter, tree, cfg):
    target, draft, prompt = small_models
    result = generate(target, [prompt] * N, max_new_tokens=3, drafter=drafter, draft_model=draft, tree=tree,
                      do_sample=True, temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p, seed=1234,
                      max_tree_size=6)
    assert all(len(t) == 3 for t in result.tokens)
    # speculation really happened: some steps committed more than one token
    assert result.stats["mean_accepted_length"] > 1.05, result.stats
    joint12, marg3 = _exact_distributions(target, cfg, prompt)
    counts12 = torch.zeros(VOCAB * VOCAB)
    counts3 = torch.zeros(VOCAB)
    for t in result.tokens:
        counts12[t[0] * VOCAB + t[1]] += 1
        counts3[t[2]] += 1
    assert chi_square_ok(counts12, joint12.flatten(), N) > 1e-3
    assert chi_square_ok(counts3, marg3, N) > 1e-3
