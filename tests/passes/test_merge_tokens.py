"""IR rewrite `merge-tokens{r,start}` (ToMe) on the trained Fashion ViT ([CLS] + 49 patches, 6 layers) and on mean-pooled
BERT text encoders with padding (a tiny BERT, all-MiniLM-L6-v2): equal to the layer-by-layer executor bit for bit,
the token axis shrinks by r per layer with proportional attention threaded through (padding at size 0), the text
pooling weighted by token size, combined with skip-layers as the tuner prints it, r=0 identity, print/parse round
trip, ONNX lowering run by onnxruntime, a dynamic batch, bad options and models it must refuse."""
from __future__ import annotations

import pytest
import torch
from pruning_models import (apply_pipeline, assert_matches_executor, assert_round_trips, lower_and_run, onnx_input_dims,
                            run_ir)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.mark.parametrize("r, start", [(4, 0), (8, 1), (30, 0)])
def test_merged_ir_matches_executor_bit_for_bit(fashion_vit_ir, r, start):
    """r=30 is more than half the tokens: every layer clamps it as the executor does (50 -> 26 -> 14 -> ... -> 2)."""
    from elision.apps.tokens.executor import ReductionPlan

    assert_matches_executor(*fashion_vit_ir, f"merge-tokens{{r={r},start={start}}}",
                            ReductionPlan(merge_r=r, merge_start=start))


def test_golden_lengths_and_proportional_attention(fashion_vit_ir):
    """r=8 from layer 1: 50 tokens through layer 1's attention, then 42, 34, 26, 18 (and 10 after layer 5's merge);
    every layer after the first merge attends with the float bias log(size) of the tokens it sees."""
    _model, module, _inputs = fashion_vit_ir
    before = str(module)
    lines = str(apply_pipeline(module, "merge-tokens{r=8,start=1}")).splitlines()
    sdpa = [ln for ln in lines if "aten.scaled_dot_product_attention" in ln]
    assert [int(ln.split(" : f32[3, 4, ")[1].split(",")[0]) for ln in sdpa] == [50, 50, 42, 34, 26, 18]
    masks = [ln.split("(")[1].split(", ")[3] for ln in sdpa]
    assert masks[0] == masks[1] == "%expand_1"  # the model's own all-true mask before any merge
    for length, mask in zip((42, 34, 26, 18), masks[2:]):
        assert any(ln.startswith(f"  {mask} : f32[3, 1, 1, {length}] = aten.view.default(") for ln in lines)
    for layer, n_out in zip(range(1, 6), (42, 34, 26, 18, 10)):
        tap = [ln for ln in lines if f'loc("vit.layers.{layer}.merge_tokens")' in ln]
        assert any(f": f32[3, {n_out}, 64] = aten.gather.default(" in ln for ln in tap)
    assert not any("merge_tokens" in ln for ln in lines if "vit.layers.0." in ln)
    assert "merge_tokens" not in before and "aten.sort.stable" not in "\n".join(lines)  # ONNX has no stable sort


def test_tuner_pipeline_with_skips_compiles_to_the_measured_plan(fashion_vit_ir):
    """The tuned Fashion-ViT pipeline (merging + a skipped layer inside the merging range) is deployable and the IR
    passes compute exactly what the executor measured: skip-layers still finds layer 4's MLP after the merge."""
    from elision.apps.tokens.deployed import deployable
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = fashion_vit_ir
    plan = ReductionPlan(merge_r=16, merge_start=1, skip_attn=frozenset({4}), skip_mlp=frozenset({4}))
    assert plan.describe() == "merge-tokens{r=16,start=1},skip-layers{layers=attn4+mlp4}"
    assert deployable(plan, adapter_for(model))
    assert torch.equal(run_ir(apply_pipeline(module, plan.describe()), inputs), run_encoder(adapter_for(model), inputs, plan))


def test_r_zero_is_untouched_and_round_trips(fashion_vit_ir):
    _model, module, inputs = fashion_vit_ir
    assert str(apply_pipeline(module, "merge-tokens{r=0,start=1}")) == str(module)
    merged = apply_pipeline(module, "merge-tokens{r=6,start=2}")
    assert_round_trips(merged, inputs)


def test_merged_vit_lowers_to_onnx_and_matches_torch(fashion_vit_ir, tmp_path):
    _model, module, inputs = fashion_vit_ir
    merged = apply_pipeline(module, "merge-tokens{r=8,start=3}")  # three merges keep the export short
    _got, graph_ops = lower_and_run(merged, inputs, tmp_path)
    assert {"ArgMax", "TopK", "ScatterElements", "GatherElements", "Log"} <= graph_ops


@pytest.mark.parametrize("opts, message", [
    ("r=-1", "r=-1 must be >= 0"),
    ("r=4;start=6", "start=6 is out of range: the model has 6 layers, use 0..5"),
    ("r=4;start=-1", "out of range"),
])
def test_bad_options(fashion_vit_ir, opts, message):
    from elision.passes.base import PassError
    with pytest.raises(PassError, match=message):
        apply_pipeline(fashion_vit_ir[1], "merge-tokens{" + opts + "}")


def test_merge_tokens_is_approximate(fashion_vit_ir):
    from elision.passes.base import PassError
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    with pytest.raises(PassError, match="approximate"):
        PassManager(parse_pipeline("merge-tokens{r=4}")).run(fashion_vit_ir[1].copy())


def test_dynamic_batch_merges_stay_symbolic_and_match_executor(fashion_vit_dynamic_ir):
    """Traced with a symbolic batch, three merges (matching, the size and protected marks threaded from one merge to
    the next, proportional attention) stay symbolic in the batch and equal the executor bit for bit at batch 1, 2, 5."""
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, (x,) = fashion_vit_dynamic_ir
    merged = apply_pipeline(module, "merge-tokens{r=8,start=3}")
    text = str(merged)
    assert "f32[batch, 4, 34, 16] = aten.scaled_dot_product_attention" in text
    assert "[3, " not in text.split("func @forward")[1]  # the traced batch of 3 is spelled nowhere
    plan = ReductionPlan(merge_r=8, merge_start=3)
    for b in (1, 2, 5):
        assert torch.equal(run_ir(merged, (x[:b],)), run_encoder(adapter_for(model), (x[:b],), plan))


def test_dynamic_batch_merged_vit_onnx_serves_every_batch(fashion_vit_dynamic_ir, tmp_path):
    """One ONNX artifact of a merged ViT traced with a symbolic batch: its input is (batch, 1, 28, 28) and
    onnxruntime computes the executor's output at batch 1, 2 and 5."""
    from elision.lowering.emit import emit_onnx, run_onnx_artifact
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, (x,) = fashion_vit_dynamic_ir
    merged = apply_pipeline(module, "merge-tokens{r=8,start=5}")  # one merge keeps the (dynamic-shape) export short
    emit_onnx(merged, None, tmp_path, ort_fusions=False)
    assert onnx_input_dims(tmp_path)[0] == ["batch", 1, 28, 28]
    plan = ReductionPlan(merge_r=8, merge_start=5)
    for b in (1, 2, 5):
        expect = run_encoder(adapter_for(model), (x[:b],), plan)
        assert torch.equal(run_ir(merged, (x[:b],)), expect)
        torch.testing.assert_close(run_onnx_artifact(tmp_path, "forward", (x[:b],))[0], expect, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ text encoders

# padded text batches of 1, 2 and 5 rows at the traced length 12 (real lengths, shortest 3: [CLS] x [SEP])
TEXT_BATCHES = [(7,), (12, 9), (12, 9, 5, 3, 11)]


@pytest.mark.parametrize("r, start", [(1, 0), (2, 0), (3, 1), (2, 2)])
def test_text_merged_ir_matches_executor_bit_for_bit(bert_ir, r, start):
    """Padded rows (sizes 0 never pull a real token's value), [CLS] and [SEP] protected, proportional attention and the
    size-weighted mean pooling: the merged IR computes exactly what the executor measured."""
    from elision.apps.tokens.executor import ReductionPlan

    assert_matches_executor(*bert_ir, f"merge-tokens{{r={r},start={start}}}",
                            ReductionPlan(merge_r=r, merge_start=start))


def test_text_golden_lengths_masks_and_pooling(bert_ir):
    """r=3 from layer 1: 12 tokens through layers 0 and 1's attention, 9 and 6 after; layer 2 attends with the float
    bias log(size) instead of the model's boolean padding mask, and the pooling weights are the last sizes (cast to
    the mask's integer dtype and back), not the attention mask."""
    _model, module, _inputs = bert_ir
    lines = str(apply_pipeline(module, "merge-tokens{r=3,start=1}")).splitlines()
    sdpa = [ln for ln in lines if "aten.scaled_dot_product_attention" in ln]
    assert [int(ln.split(" : f32[3, 4, ")[1].split(",")[0]) for ln in sdpa] == [12, 12, 9]
    masks = [ln.split("(")[1].split(", ")[3] for ln in sdpa]
    assert masks[0] == masks[1] and any(ln.startswith(f"  {masks[0]} : bool[3, 1, 12, 12]") for ln in lines)
    assert any(ln.startswith(f"  {masks[2]} : f32[3, 1, 1, 9] = aten.view.default(") for ln in lines)
    for layer, n_out in ((1, 9), (2, 6)):
        tap = [ln for ln in lines if f'loc("encoder_model.encoder.layer.{layer}.merge_tokens")' in ln]
        assert any(f": f32[3, {n_out}, 32] = aten.gather.default(" in ln for ln in tap)
    producers = {ln.split(" : ")[0].strip(): ln for ln in lines if " = " in ln}

    def arg0(line):
        return line.split("(", 1)[1].split(",")[0].split(")")[0]

    weight_sum = next(ln for ln in lines if ": f32[3, 1] = aten.sum.dim_IntList(" in ln)  # the pooling denominator
    weight = producers[arg0(weight_sum)]
    assert ": f32[3, 6, 1] = aten.unsqueeze.default(" in weight
    to_float = producers[arg0(weight)]
    assert ": f32[3, 6] = aten._to_copy.default(" in to_float
    size = producers[arg0(to_float)]  # the mask's i64 dtype, holding the last merge's sizes (whole token counts)
    assert ": i64[3, 6] = aten._to_copy.default(%merge_" in size
    assert "attention_mask" not in "\n".join(lines[lines.index(weight_sum) - 12:])


def test_text_r_zero_is_untouched_and_round_trips(bert_ir):
    _model, module, inputs = bert_ir
    assert str(apply_pipeline(module, "merge-tokens{r=0,start=1}")) == str(module)
    merged = apply_pipeline(module, "merge-tokens{r=2,start=0}")
    assert_round_trips(merged, inputs)


def test_merged_text_encoder_lowers_to_onnx_and_matches_torch(bert_ir, tmp_path):
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = bert_ir
    got, _ops = lower_and_run(apply_pipeline(module, "merge-tokens{r=2,start=1}"), inputs, tmp_path)
    torch.testing.assert_close(got, run_encoder(adapter_for(model), inputs, ReductionPlan(merge_r=2, merge_start=1)),
                               atol=1e-5, rtol=1e-5)


def test_dynamic_batch_merged_text_encoder_matches_executor(bert_dynamic_ir):
    """Traced with a symbolic batch, the text merges (the first one reading the attention mask and [SEP] marks, the
    sizes and protected marks threaded to the next, the pooling weights) stay symbolic in the batch and equal the
    executor bit for bit at batch 1, 2 and 5 with padded rows."""
    from pruning_models import padded_bert_batch

    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module = bert_dynamic_ir
    merged = apply_pipeline(module, "merge-tokens{r=2,start=1}")
    text = str(merged)
    assert "f32[batch, 4, 10, 8] = aten.scaled_dot_product_attention" in text  # layer 2 attends over 12 - 2 tokens
    assert "[3, " not in text.split("func @forward")[1]  # the traced batch of 3 is spelled nowhere
    plan = ReductionPlan(merge_r=2, merge_start=1)
    for i, lengths in enumerate(TEXT_BATCHES):
        inputs = padded_bert_batch(lengths, 12, seed=i)
        assert torch.equal(run_ir(merged, inputs), run_encoder(adapter_for(model), inputs, plan))


def test_dynamic_batch_merged_text_encoder_onnx_serves_every_batch(bert_dynamic_ir, tmp_path):
    """One ONNX artifact of a merged text encoder traced with a symbolic batch: its inputs are (batch, 12) and
    onnxruntime computes the executor's output at batch 1, 2 and 5 with padded rows."""
    from pruning_models import padded_bert_batch

    from elision.lowering.emit import emit_onnx, run_onnx_artifact
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module = bert_dynamic_ir
    merged = apply_pipeline(module, "merge-tokens{r=2,start=2}")  # one merge keeps the (dynamic-shape) export short
    emit_onnx(merged, None, tmp_path, ort_fusions=False)
    assert onnx_input_dims(tmp_path) == [["batch", 12], ["batch", 12]]
    plan = ReductionPlan(merge_r=2, merge_start=2)
    for i, lengths in enumerate(TEXT_BATCHES):
        inputs = padded_bert_batch(lengths, 12, seed=i)
        expect = run_encoder(adapter_for(model), inputs, plan)
        torch.testing.assert_close(run_onnx_artifact(tmp_path, "forward", inputs)[0], expect, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts, message", [
    ("r=4", "r=4 is too large for this text sequence: 8 tokens reach layer 1, where at most 2 can merge with "
            r"\[CLS\] and \[SEP\] protected .* use r <= 2 with start=0"),
    ("r=7;start=1", "r=7 is too large for this text sequence: 12 tokens reach layer 1, where at most 4 can merge"),
    ("r=2;start=3", "start=3 is out of range: the model has 3 layers, use 0..2"),
    ("r=-1", "r=-1 must be >= 0"),
])
def test_text_bad_options(bert_ir, opts, message):
    from elision.passes.base import PassError
    with pytest.raises(PassError, match=message):
        apply_pipeline(bert_ir[1], "merge-tokens{" + opts + "}")


@pytest.mark.parametrize("skips", [{"skip_mlp": frozenset({1})},
                                   {"skip_attn": frozenset({1}), "skip_mlp": frozenset({1})},
                                   {"skip_attn": frozenset({1})}])
def test_text_merge_with_skips_in_a_merging_layer_compiles_to_the_measured_plan(bert_ir, skips):
    """A BERT layer merges after its attention LayerNorm; skip-layers still finds that layer's MLP branch (it reads
    the merged tokens), so the plans the tuner prints are deployable and the IR equals the executor."""
    from elision.apps.tokens.deployed import deployable
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = bert_ir
    plan = ReductionPlan(merge_r=2, merge_start=0, **skips)
    assert deployable(plan, adapter_for(model))
    out = run_ir(apply_pipeline(module, plan.describe()), inputs)
    assert torch.equal(out, run_encoder(adapter_for(model), inputs, plan))
    assert not torch.equal(out, run_encoder(adapter_for(model), inputs, ReductionPlan(merge_r=2, merge_start=0)))


def test_text_merge_after_prune_is_refused(bert_ir):
    from elision.passes.base import PassError
    with pytest.raises(PassError, match="already pruned by prune-tokens; the IR pass does not merge after pruning"):
        apply_pipeline(bert_ir[1], "prune-tokens{after=0;keep=0.75},merge-tokens{r=1;start=1}")


def test_minilm_merged_ir_matches_executor():
    """The committed all-MiniLM-L6-v2 (6 post-norm layers, 384 wide) on three padded sentences: two merges per layer
    from layer 3 equal the executor bit for bit."""
    from pruning_models import padded_bert_batch

    from elision.frontend.trace import export_to_ir
    from elision.models.registry import get_builtin
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model = get_builtin("minilm").build()
    inputs = padded_bert_batch((16, 11, 6), 16, seed=3)
    merged = apply_pipeline(export_to_ir(model, inputs), "merge-tokens{r=2,start=3}")
    expect = run_encoder(adapter_for(model), inputs, ReductionPlan(merge_r=2, merge_start=3))
    assert torch.equal(run_ir(merged, inputs), expect)
