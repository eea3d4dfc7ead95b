"""Eager execution of reduction plans on real HF encoders, the elision:: custom ops, and the fidelity harness."""
from __future__ import annotations

import pytest
import torch

from elision.kernels import token_reduction as alg
from elision.apps.tokens.executor import IDENTITY, ReductionPlan, adapter_for, reference_output, run_encoder
from elision.apps.tokens.fidelity import compare_outputs
from pruning_models import padded_bert_batch, tiny_bert, tiny_vit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def bert():
    return tiny_bert()


@pytest.fixture(scope="module")
def vit():
    return tiny_vit()


def _bert_batch():
    return padded_bert_batch((16, 11, 7), 16)


def test_identity_plan_matches_hf_bert_with_padding(bert):
    ids, mask = _bert_batch()
    ad = adapter_for(bert)
    torch.testing.assert_close(run_encoder(ad, (ids, mask)), reference_output(bert, ad, (ids, mask)),
                               atol=1e-5, rtol=1e-5)


def test_identity_plan_matches_hf_vit(vit):
    x = torch.randn(2, 1, 16, 16)
    ad = adapter_for(vit)
    torch.testing.assert_close(run_encoder(ad, (x,)), reference_output(vit, ad, (x,)), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("plan", [ReductionPlan(prune_after=1, keep=1.0), ReductionPlan(merge_r=0),
                                  ReductionPlan(prune_after=2, keep=1.0, score="key-norm"),
                                  ReductionPlan(dct_after=1, dct_keep=1.0)])
def test_noop_settings_are_bit_for_bit(bert, vit, plan):
    ids, mask = _bert_batch()
    if plan.dct_after is None:
        ad = adapter_for(bert)
        assert torch.equal(run_encoder(ad, (ids, mask), plan), run_encoder(ad, (ids, mask), IDENTITY))
    ad = adapter_for(vit)
    x = torch.randn(2, 1, 16, 16)
    assert torch.equal(run_encoder(ad, (x,), plan), run_encoder(ad, (x,), IDENTITY))


@pytest.mark.parametrize("plan", [ReductionPlan(prune_after=1, keep=0.5),
                                  ReductionPlan(prune_after=1, keep=0.6, extra_stages=((2, 0.5),)),
                                  ReductionPlan(prune_after=1, keep=0.4, score="key-norm"),
                                  ReductionPlan(merge_r=2, merge_start=1),
                                  ReductionPlan(skip_attn=frozenset({1}), skip_mlp=frozenset({2}))])
def test_padding_and_batch_handled_per_row(bert, plan):
    """Each row of a padded batch gives what it gives alone, unpadded: masks and budgets are per row."""
    ids, mask = _bert_batch()
    ad = adapter_for(bert)
    batched = run_encoder(ad, (ids, mask), plan)
    for row, length in enumerate((16, 11, 7)):
        alone = run_encoder(ad, (ids[row : row + 1, :length], mask[row : row + 1, :length]), plan)
        torch.testing.assert_close(batched[row : row + 1], alone, atol=2e-5, rtol=1e-4)


def test_pruning_changes_output_but_keeps_cls(vit):
    ad = adapter_for(vit)
    x = torch.randn(3, 1, 16, 16)
    ref = run_encoder(ad, (x,))
    pruned = run_encoder(ad, (x,), ReductionPlan(prune_after=1, keep=0.25))
    assert pruned.shape == ref.shape and not torch.equal(pruned, ref)
    dct = run_encoder(ad, (x,), ReductionPlan(dct_after=0, dct_keep=0.25))
    assert dct.shape == ref.shape and torch.isfinite(dct).all()


def test_bad_options_give_clear_errors(bert):
    ad = adapter_for(bert)
    ids, mask = _bert_batch()
    with pytest.raises(alg.PruningError, match=r"keep=1.5 is outside \(0, 1\]"):
        run_encoder(ad, (ids, mask), ReductionPlan(prune_after=1, keep=1.5))
    with pytest.raises(alg.PruningError, match="after=7 is out of range: the model has 4 layers"):
        run_encoder(ad, (ids, mask), ReductionPlan(prune_after=7, keep=0.5))
    with pytest.raises(alg.PruningError, match="first or last layer"):
        run_encoder(ad, (ids, mask), ReductionPlan(skip_attn=frozenset({0})))
    with pytest.raises(alg.PruningError, match="needs a vision model"):
        run_encoder(ad, (ids, mask), ReductionPlan(dct_after=1, dct_keep=0.5))
    with pytest.raises(alg.PruningError, match="no recognizable token sequence"):
        adapter_for(torch.nn.Linear(3, 3))


def test_fidelity_harness_metrics():
    ref = torch.randn(6, 10)
    same = compare_outputs(ref, ref.clone(), "logits", labels=ref.argmax(-1))
    assert same.fidelity == pytest.approx(1.0) and same.top1 == 1.0 and same.accuracy == 1.0
    assert same.kl == pytest.approx(0.0, abs=1e-6)
    other = compare_outputs(ref, ref + torch.randn(6, 10), "logits")
    assert other.kl > 0 and other.fidelity < 1.0
    emb = compare_outputs(ref, 2 * ref, "embedding")
    assert emb.fidelity == pytest.approx(1.0, abs=1e-6) and emb.kl is None
    with pytest.raises(ValueError, match="output shapes differ"):
        compare_outputs(ref, ref[:3], "logits")
