"""IR rewrite `compress-tokens{method=dct}` on the trained Fashion ViT ([CLS] + 7x7 patches, 6 layers): equal to the
layer-by-layer executor bit for bit, the token axis after the layer has the compressed length, keep=1 identity,
print/parse round trip, ONNX lowering run by onnxruntime, bad options and models it must refuse."""
from __future__ import annotations

import pytest
import torch
from pruning_models import (apply_pipeline, assert_matches_executor, assert_round_trips, lower_and_run, onnx_input_dims,
                            run_ir)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _compress(module, opts: str):
    return apply_pipeline(module, "compress-tokens{" + opts + "}")


@pytest.mark.parametrize("after, keep", [(1, 0.25), (3, 0.5), (0, 0.1)])
def test_compressed_ir_matches_executor_bit_for_bit(fashion_vit_ir, after, keep):
    """The tap is the executor's own `dct_low_pass` with the same constant matrices, and the all-true attention mask
    carried over stays all-true: the logits are identical, not just close."""
    from elision.apps.tokens.executor import ReductionPlan

    assert_matches_executor(*fashion_vit_ir, f"compress-tokens{{method=dct;after={after};keep={keep}}}",
                            ReductionPlan(dct_after=after, dct_keep=keep))


def test_golden_token_axis_after_the_layer(fashion_vit_ir):
    """keep=0.25 of a 7x7 grid keeps the 4x4 lowest frequencies (round(7 * 0.5) = 4): 1 + 16 = 17 tokens from
    layer 2 on, 50 up to layer 1; the tap is two pairs of matmuls with the DCT matrices stored as parameters."""
    from elision.kernels import token_reduction as alg

    assert alg.dct_grid_size(7, 7, 0.25) == (4, 4)
    _model, module, _inputs = fashion_vit_ir
    before = str(module)
    after = str(_compress(module, "after=1;keep=0.25"))
    lines = after.splitlines()
    tap = [ln for ln in lines if 'loc("vit.layers.1.compress_tokens")' in ln]
    assert sum("= aten.bmm.default(" in ln for ln in tap) == 4
    assert tap[-1].split(" : ")[1].startswith("f32[3, 17, 64] = aten.cat.default(")
    params = {ln.split('"')[1]: ln.split(" : ")[1] for ln in lines if ln.startswith('param "vit.layers.1.compress')}
    assert params == {"vit.layers.1.compress_tokens.dct_rows": "f32[4, 7]",
                      "vit.layers.1.compress_tokens.dct_cols": "f32[4, 7]",
                      "vit.layers.1.compress_tokens.dct_inv_rows": "f32[4, 4]",
                      "vit.layers.1.compress_tokens.dct_inv_cols": "f32[4, 4]"}
    sdpa = [ln for ln in lines if "aten.scaled_dot_product_attention" in ln]
    assert [": f32[3, 4, 50, 16]" in ln for ln in sdpa] == [True, True, False, False, False, False]
    assert all(": f32[3, 4, 17, 16]" in ln for ln in sdpa[2:])
    # the 50x50 all-true mask is read at [CLS] and the first patch for layers 2..5
    assert any(": bool[3, 1, 17, 17] = aten.gather.default(" in ln for ln in lines)
    assert before.count("[3, 50, -1, 16]") == 18 and after.count("[3, 50, -1, 16]") == 6
    assert after.count("[3, 17, -1, 16]") == 12
    assert "compress_tokens" not in before


def test_keep_one_is_untouched_and_round_trips(fashion_vit_ir):
    _model, module, inputs = fashion_vit_ir
    text = str(module)
    # keep=0.99 rounds to the whole 7x7 grid, so it is the identity too
    assert str(_compress(module, "after=1;keep=1.0")) == text and str(_compress(module, "after=1;keep=0.99")) == text
    compressed = _compress(module, "after=2;keep=0.3")
    assert_round_trips(compressed, inputs)


def test_compressed_vit_lowers_to_onnx_and_matches_torch(fashion_vit_ir, tmp_path):
    _model, module, inputs = fashion_vit_ir
    got, graph_ops = lower_and_run(_compress(module, "after=1;keep=0.25"), inputs, tmp_path)
    assert "MatMul" in graph_ops and "Cos" not in graph_ops  # the DCT matrices ship as initializers
    assert got.shape == (3, 10)


def test_tuner_plan_with_skips_compiles_to_the_measured_plan(fashion_vit_ir):
    """What `elision tune` prints for a compress-tokens plan with a skipped branch is deployable and the IR passes
    compute exactly what the executor measured."""
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    from elision.apps.tokens.deployed import deployable
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = fashion_vit_ir
    plan = ReductionPlan(dct_after=1, dct_keep=0.5, skip_mlp=frozenset({3}))
    assert plan.describe() == "compress-tokens{method=dct,after=1,keep=0.5},skip-layers{layers=mlp3}"
    assert deployable(plan, adapter_for(model))
    out = module.copy()
    PassManager(parse_pipeline(plan.describe()), verify_each=True, check_types=True, allow_approximate=True).run(out)
    assert torch.equal(run_ir(out, inputs), run_encoder(adapter_for(model), inputs, plan))


@pytest.mark.parametrize("opts, message", [
    ("keep=0", "keep=0.0 is outside \\(0, 1\\]"),
    ("keep=1.5", "outside \\(0, 1\\]"),
    ("after=5;keep=0.5", "after=5 is out of range: the model has 6 layers, use 0..4"),
    ("after=-1;keep=0.5", "out of range"),
    ("method=fft;keep=0.5", "not one of dct"),
])
def test_bad_options(fashion_vit_ir, opts, message):
    from elision.passes.base import PassError
    with pytest.raises(PassError, match=message):
        _compress(fashion_vit_ir[1], opts)


def test_only_before_pruning(fashion_vit_ir):
    from elision.passes.base import PassError
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    pruned = fashion_vit_ir[1].copy()
    PassManager(parse_pipeline("prune-tokens{after=0;keep=0.5}"), allow_approximate=True).run(pruned)
    with pytest.raises(PassError, match="does not output \\[CLS\\] \\+ the 7x7 patch grid; compress-tokens must come "
                                        "before any token pruning"):
        _compress(pruned, "after=1;keep=0.25")


def test_non_uniform_mask_is_refused(fashion_vit_ir):
    """A mask that hides some patches cannot be carried over to tokens that mix all patches."""
    from elision.passes.base import PassError
    module = fashion_vit_ir[1].copy()
    fn = module.functions["forward"]
    ge = next(n for n in fn.nodes if n.op == "aten.ge.Scalar")  # arange(50) >= 0: the all-true ViT mask
    ge.args = (ge.args[0], 5)
    with pytest.raises(PassError, match="compress-tokens\\{after=1\\}: %expand_1 .* differs between patches"):
        _compress(module, "after=1;keep=0.25")


def test_model_without_patch_grid_is_refused():
    from pruning_models import padded_bert_batch, tiny_bert

    from elision.frontend.trace import export_to_ir
    from elision.passes.base import PassError
    bert = export_to_ir(tiny_bert(num_hidden_layers=2, add_pooling_layer=False), padded_bert_batch((6, 4), 6))
    with pytest.raises(PassError, match="no patch grid was recognised in this model"):
        _compress(bert, "after=0;keep=0.5")


def test_compress_tokens_is_approximate(fashion_vit_ir):
    from elision.passes.base import PassError
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    with pytest.raises(PassError, match="approximate"):
        PassManager(parse_pipeline("compress-tokens{after=1;keep=0.5}")).run(fashion_vit_ir[1].copy())


def test_dynamic_batch_compressed_vit_onnx_serves_every_batch(fashion_vit_dynamic_ir, tmp_path):
    """Traced with a symbolic batch, the DCT tap and the carried-over mask (an all-true mask expanded to the batch,
    checked uniform at several batch sizes) stay symbolic in the batch: the IR equals the executor bit for bit and
    one ONNX artifact computes it at batch 1, 2 and 5."""
    from elision.lowering.emit import emit_onnx, run_onnx_artifact
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, (x,) = fashion_vit_dynamic_ir
    compressed = _compress(module, "after=1;keep=0.25")
    text = str(compressed)
    assert "bool[batch, 1, 17, 17]" in text and "f32[batch, 4, 17, 16] = aten.scaled_dot_product_attention" in text
    assert "[3, " not in text.split("func @forward")[1]  # the traced batch of 3 is spelled nowhere
    emit_onnx(compressed, None, tmp_path, ort_fusions=False)
    assert onnx_input_dims(tmp_path)[0] == ["batch", 1, 28, 28]
    plan = ReductionPlan(dct_after=1, dct_keep=0.25)
    for b in (1, 2, 5):
        expect = run_encoder(adapter_for(model), (x[:b],), plan)
        assert torch.equal(run_ir(compressed, (x[:b],)), expect)
        torch.testing.assert_close(run_onnx_artifact(tmp_path, "forward", (x[:b],))[0], expect, atol=1e-5, rtol=1e-5)


def test_dynamic_batch_non_uniform_mask_is_refused(fashion_vit_dynamic_ir):
    """A mask that varies over the patches stays refused when the batch is symbolic."""
    from elision.passes.base import PassError
    module = fashion_vit_dynamic_ir[1].copy()
    fn = module.functions["forward"]
    ge = next(n for n in fn.nodes if n.op == "aten.ge.Scalar")  # arange(50) >= 0: the all-true mask
    ge.args = (ge.args[0], 3)  # patches 1, 2 hidden, the rest visible
    with pytest.raises(PassError, match="differs between patches or depends on the inputs"):
        _compress(module, "after=1;keep=0.25")
