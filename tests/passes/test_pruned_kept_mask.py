"""A pruned or merged text encoder that returns token states also returns the attention mask of the tokens it kept
(merged: and how many tokens each slot stands for), so users can pool its shorter last_hidden_state: mean pooling with
that mask (merged: weighted by the sizes) equals the pooled embedding the layer-by-layer executor computes for the
same plan, on padded batches (padding and kept tokens are told apart); the ONNX artifact and `elision.compile` return
the same marks as the IR."""
from __future__ import annotations

import pytest
import torch

from pruning_models import apply_pipeline, padded_bert_batch, tiny_bert

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _mean_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1).clamp(min=1e-9)


@pytest.fixture(scope="module")
def bert():
    from elision.frontend.trace import export_to_ir

    model = tiny_bert(num_hidden_layers=3, intermediate_size=48, add_pooling_layer=False)
    ids, mask = padded_bert_batch((12, 9, 5), 12)
    return model, export_to_ir(model, (ids, mask)), (ids, mask)


@pytest.mark.parametrize("pipeline,plan", [
    ("prune-tokens{after=1;keep=0.5}", dict(prune_after=1, keep=0.5)),
    ("prune-tokens{after=0;keep=0.75},prune-tokens{after=1;keep=0.5}", dict(prune_after=0, keep=0.75,
                                                                             extra_stages=((1, 0.5),))),
])
def test_mean_pooling_with_the_kept_mask_matches_the_pooled_result(bert, pipeline, plan):
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder
    from elision.ir import interpret
    from elision.models.vision import MeanPooledEncoder

    model, module, inputs = bert
    hidden, kept = interpret(apply_pipeline(module, pipeline), "forward", *inputs)
    k = hidden.shape[1]
    assert k < inputs[0].shape[1] and kept.shape == (3, k) and kept.dtype == torch.int64
    # a padded row keeps fewer real tokens than the full row: the mask is what tells them apart
    assert kept[0].sum() > kept[2].sum() and set(kept.unique().tolist()) == {0, 1}
    want = run_encoder(adapter_for(MeanPooledEncoder(model).eval()), inputs, ReductionPlan(**plan))
    torch.testing.assert_close(_mean_pool(hidden, kept), want, atol=1e-6, rtol=1e-6)
    # pooling the shorter output without the mask would average padding in: not the pooled result
    assert not torch.allclose(hidden.mean(1), want, atol=1e-3)


def test_a_graph_that_pools_itself_gets_no_extra_output(bert_ir):
    from elision.ir import interpret

    _, module, inputs = bert_ir
    outputs = interpret(apply_pipeline(module, "prune-tokens{after=1;keep=0.5}"), "forward", *inputs)
    assert len(outputs) == 1 and outputs[0].dim() == 2


def test_the_onnx_artifact_names_the_kept_mask(bert, tmp_path):
    import numpy as np

    from elision.ir import interpret
    from elision.frontend.model_spec import LoadedModel
    from elision.lowering.emit import emit_onnx
    from elision.runtime.artifact import load_artifact

    model, module, inputs = bert
    pruned = apply_pipeline(module, "prune-tokens{after=1;keep=0.5}")
    lm = LoadedModel(name="tiny-bert", model=model, example_inputs=inputs, dynamic_dims={}, kind="encoder",
                     input_names=["input_ids", "attention_mask"])
    emit_onnx(pruned, lm, tmp_path)
    art = load_artifact(tmp_path)
    out = art.run("forward", input_ids=inputs[0].numpy(), attention_mask=inputs[1].numpy())
    assert list(out) == ["last_hidden_state", "kept_mask"]
    hidden, kept = (torch.from_numpy(np.asarray(out[n])) for n in out)

    want_hidden, want_kept = interpret(pruned, "forward", *inputs)
    assert torch.equal(kept, want_kept)
    real = kept.bool()  # the slots that are not real tokens hold whatever padding computes, in either runtime
    torch.testing.assert_close(hidden[real], want_hidden[real], atol=1e-5, rtol=1e-5)


def test_elision_compile_returns_the_kept_mask_beside_last_hidden_state(bert):
    """The Python API: a pruned Hugging Face encoder's output carries `kept_mask`; pooling with it gives the pooled
    result."""
    import elision
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder
    from elision.models.vision import MeanPooledEncoder

    model, _, inputs = bert
    fast = elision.compile(model, example_inputs=inputs, passes="prune-tokens{after=1;keep=0.5}",
                           allow_approximate=True, select="elision")
    out = fast(*inputs)
    assert out.last_hidden_state.shape[:2] == out.kept_mask.shape
    want = run_encoder(adapter_for(MeanPooledEncoder(model).eval()), inputs, ReductionPlan(prune_after=1, keep=0.5))
    torch.testing.assert_close(_mean_pool(out.last_hidden_state, out.kept_mask), want, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ merge-tokens

MERGES = [("merge-tokens{r=2;start=1}", dict(merge_r=2, merge_start=1), 8),
          ("merge-tokens{r=1;start=0}", dict(merge_r=1, merge_start=0), 9)]


@pytest.mark.parametrize("pipeline,plan,k", MERGES)
def test_pooling_merged_states_with_the_token_sizes_matches_the_pooled_result(bert, pipeline, plan, k):
    """A merged slot is the size-weighted average of its tokens: pooling weighted by token_sizes is the executor's
    pooled embedding (bit for bit: the same sums); kept_mask marks the slots holding real tokens, padding slots are
    0 in both, and every row's sizes add up to its real length."""
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder
    from elision.ir import interpret
    from elision.models.vision import MeanPooledEncoder

    model, module, inputs = bert
    hidden, kept, sizes = interpret(apply_pipeline(module, pipeline), "forward", *inputs)
    assert hidden.shape == (3, k, 32) and kept.shape == sizes.shape == (3, k)
    assert kept.dtype == sizes.dtype == torch.int64
    assert sizes.sum(1).tolist() == inputs[1].sum(1).tolist() == [12, 9, 5]  # every real token is in one slot
    assert torch.equal(kept, (sizes > 0).long())
    assert (kept[2] == 0).any() and kept[0].all()  # the short row has padding-only slots, the full row none
    assert sizes.max() > 1  # tokens were merged into a slot
    want = run_encoder(adapter_for(MeanPooledEncoder(model).eval()), inputs, ReductionPlan(**plan))
    assert torch.equal(_mean_pool(hidden, sizes), want)
    # the kept mask counts a merged slot once: an approximation of the mean, not the pooled result
    assert not torch.allclose(_mean_pool(hidden, kept), want, atol=1e-4)


def test_a_merged_graph_that_pools_itself_gets_no_extra_output(bert_ir):
    from elision.ir import interpret

    _, module, inputs = bert_ir
    outputs = interpret(apply_pipeline(module, "merge-tokens{r=2;start=1}"), "forward", *inputs)
    assert len(outputs) == 1 and outputs[0].dim() == 2


class _ClsEmbedding(torch.nn.Module):
    """A text encoder returning only [CLS]'s state: neither mean-pooled nor token states."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder

    def forward(self, input_ids, attention_mask):
        return self.encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state[:, 0]


def test_merging_a_text_encoder_without_token_or_pooled_output_is_refused(bert):
    from elision.frontend.trace import export_to_ir
    from elision.passes.base import PassError

    model, _, inputs = bert
    module = export_to_ir(_ClsEmbedding(model).eval(), inputs)
    with pytest.raises(PassError, match="neither pooled with the attention mask after the merge .* nor the token states"):
        apply_pipeline(module, "merge-tokens{r=1}")


def test_the_onnx_artifact_of_a_merged_encoder_returns_the_same_marks(bert, tmp_path):
    """The artifact names its outputs last_hidden_state, kept_mask, token_sizes; on a padded batch other than the
    traced one, onnxruntime returns exactly the IR's marks (the torch target) and the same states at real slots."""
    import numpy as np

    from elision.frontend.model_spec import LoadedModel
    from elision.ir import interpret
    from elision.lowering.emit import emit_onnx
    from elision.runtime.artifact import load_artifact

    model, module, inputs = bert
    merged = apply_pipeline(module, "merge-tokens{r=2;start=1}")
    lm = LoadedModel(name="tiny-bert", model=model, example_inputs=inputs, dynamic_dims={}, kind="encoder",
                     input_names=["input_ids", "attention_mask"])
    emit_onnx(merged, lm, tmp_path)
    fresh = padded_bert_batch((4, 12, 7), 12, seed=5)
    out = load_artifact(tmp_path).run("forward", input_ids=fresh[0].numpy(), attention_mask=fresh[1].numpy())
    assert list(out) == ["last_hidden_state", "kept_mask", "token_sizes"]
    hidden, kept, sizes = (torch.from_numpy(np.asarray(out[n])) for n in out)
    want_hidden, want_kept, want_sizes = interpret(merged, "forward", *fresh)
    assert torch.equal(kept, want_kept) and torch.equal(sizes, want_sizes)
    assert sizes.sum(1).tolist() == [4, 12, 7] and (kept[0] == 0).any()
    real = kept.bool()
    torch.testing.assert_close(hidden[real], want_hidden[real], atol=1e-5, rtol=1e-5)


def test_elision_compile_returns_kept_mask_and_token_sizes_of_a_merged_encoder(bert):
    import elision
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder
    from elision.models.vision import MeanPooledEncoder

    model, _, inputs = bert
    fast = elision.compile(model, example_inputs=inputs, passes="merge-tokens{r=2;start=1}", allow_approximate=True,
                           select="elision")
    out = fast(*inputs)
    assert out.last_hidden_state.shape[:2] == out.kept_mask.shape == out.token_sizes.shape == (3, 8)
    assert torch.equal(out.kept_mask, (out.token_sizes > 0).long())
    want = run_encoder(adapter_for(MeanPooledEncoder(model).eval()), inputs, ReductionPlan(merge_r=2, merge_start=1))
    torch.testing.assert_close(_mean_pool(out.last_hidden_state, out.token_sizes), want, atol=1e-5, rtol=1e-5)


def test_a_merged_vit_returning_token_states_gets_its_token_sizes():
    """A ViT has no padding: every slot is real (kept_mask all 1) and the sizes count the 16 patches and [CLS]."""
    from transformers import ViTConfig, ViTModel

    from elision.frontend.trace import export_to_ir
    from elision.ir import interpret

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=3,
                    num_attention_heads=4, intermediate_size=48)
    cfg._attn_implementation = "sdpa"
    pixels = torch.randn(2, 1, 16, 16)
    module = export_to_ir(ViTModel(cfg, add_pooling_layer=False).eval(), (pixels,))
    hidden, kept, sizes = interpret(apply_pipeline(module, "merge-tokens{r=2;start=1}"), "forward", pixels)
    assert hidden.shape == (2, 13, 32) and kept.shape == sizes.shape == (2, 13)  # 17 tokens, 2 merged in layers 1, 2
    assert kept.eq(1).all() and sizes.sum(1).tolist() == [17, 17] and sizes.max() > 1
