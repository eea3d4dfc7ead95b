"""A pruned text encoder that returns token states also returns the attention mask of the tokens it kept, so users
can pool its shorter last_hidden_state: mean pooling with that mask equals the pooled embedding the layer-by-layer
executor computes for the same plan, on padded batches (padding and kept tokens are told apart)."""
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
