"""IR rewrite `merge-tokens{r,start}` (ToMe) on the trained Fashion ViT ([CLS] + 49 patches, 6 layers): equal to the
layer-by-layer executor bit for bit, the token axis shrinks by r per layer with proportional attention threaded
through, combined with skip-layers as the tuner prints it, r=0 identity, print/parse round trip, ONNX lowering run
by onnxruntime, bad options and models it must refuse."""
from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _apply(module, pipeline: str):
    from elision.passes.base import PassManager, parse_pipeline

    out = module.copy()
    PassManager(parse_pipeline(pipeline), verify_each=True, check_types=True, allow_approximate=True).run(out)
    return out


def _run(module, inputs):
    from elision.ir import interpret

    return interpret(module, "forward", *inputs)[0]


@pytest.mark.parametrize("r, start", [(4, 0), (8, 1), (30, 0)])
def test_merged_ir_matches_executor_bit_for_bit(fashion_vit_ir, r, start):
    """r=30 is more than half the tokens: every layer clamps it as the executor does (50 -> 26 -> 14 -> ... -> 2)."""
    from elision.passes.pruning.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = fashion_vit_ir
    merged = _apply(module, f"merge-tokens{{r={r},start={start}}}")
    expect = run_encoder(adapter_for(model), inputs, ReductionPlan(merge_r=r, merge_start=start))
    assert torch.equal(_run(merged, inputs), expect)
    assert not torch.allclose(_run(module, inputs), expect, atol=1e-3)  # the merging did change the output


def test_golden_lengths_and_proportional_attention(fashion_vit_ir):
    """r=8 from layer 1: 50 tokens through layer 1's attention, then 42, 34, 26, 18 (and 10 after layer 5's merge);
    every layer after the first merge attends with the float bias log(size) of the tokens it sees."""
    _model, module, _inputs = fashion_vit_ir
    before = str(module)
    lines = str(_apply(module, "merge-tokens{r=8,start=1}")).splitlines()
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
    from elision.passes.pruning.deployed import deployable
    from elision.passes.pruning.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = fashion_vit_ir
    plan = ReductionPlan(merge_r=16, merge_start=1, skip_attn=frozenset({4}), skip_mlp=frozenset({4}))
    assert plan.describe() == "merge-tokens{r=16,start=1},skip-layers{layers=attn4+mlp4}"
    assert deployable(plan, adapter_for(model))
    assert torch.equal(_run(_apply(module, plan.describe()), inputs), run_encoder(adapter_for(model), inputs, plan))


def test_r_zero_is_untouched_and_round_trips(fashion_vit_ir):
    from elision.ir import verify
    from elision.ir.parser import parse

    _model, module, inputs = fashion_vit_ir
    assert str(_apply(module, "merge-tokens{r=0,start=1}")) == str(module)
    merged = _apply(module, "merge-tokens{r=6,start=2}")
    text = str(merged)
    reparsed = parse(text, merged.params)
    verify(reparsed, check_types=True)
    assert str(reparsed) == text
    assert torch.equal(_run(reparsed, inputs), _run(merged, inputs))


def test_merged_vit_lowers_to_onnx_and_matches_torch(fashion_vit_ir, tmp_path):
    import onnx

    from elision.compiler.lowering import emit_onnx, run_onnx_artifact

    _model, module, inputs = fashion_vit_ir
    merged = _apply(module, "merge-tokens{r=8,start=3}")  # three merges keep the export short
    emit_onnx(merged, None, tmp_path, ort_fusions=False)
    graph_ops = {n.op_type for p in tmp_path.glob("*.onnx") for n in onnx.load(str(p)).graph.node}
    assert {"ArgMax", "TopK", "ScatterElements", "GatherElements", "Log"} <= graph_ops
    got = run_onnx_artifact(tmp_path, "forward", inputs)[0]
    torch.testing.assert_close(got, _run(merged, inputs), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("opts, message", [
    ("r=-1", "r=-1 must be >= 0"),
    ("r=4;start=6", "start=6 is out of range: the model has 6 layers, use 0..5"),
    ("r=4;start=-1", "out of range"),
])
def test_bad_options(fashion_vit_ir, opts, message):
    from elision.passes.base import PassError

    with pytest.raises(PassError, match=message):
        _apply(fashion_vit_ir[1], "merge-tokens{" + opts + "}")


def test_text_encoder_is_refused():
    from pruning_models import padded_bert_batch, tiny_bert

    from elision.compiler.frontend import export_to_ir
    from elision.passes.base import PassError

    bert = export_to_ir(tiny_bert(num_hidden_layers=2, add_pooling_layer=False), padded_bert_batch((6, 4), 6))
    with pytest.raises(PassError, match="merge-tokens: the IR pass handles ViT-style encoders"):
        _apply(bert, "merge-tokens{r=1}")


def test_merge_tokens_is_approximate(fashion_vit_ir):
    from elision.passes.base import PassError, PassManager, parse_pipeline

    with pytest.raises(PassError, match="approximate"):
        PassManager(parse_pipeline("merge-tokens{r=4}")).run(fashion_vit_ir[1].copy())


def test_dynamic_batch_merges_stay_symbolic_and_match_executor(fashion_vit_dynamic_ir):
    """Traced with a symbolic batch, three merges (matching, the size and protected marks threaded from one merge to
    the next, proportional attention) stay symbolic in the batch and equal the executor bit for bit at batch 1, 2, 5."""
    from elision.passes.pruning.executor import ReductionPlan, adapter_for, run_encoder

    model, module, (x,) = fashion_vit_dynamic_ir
    merged = _apply(module, "merge-tokens{r=8,start=3}")
    text = str(merged)
    assert "f32[batch, 4, 34, 16] = aten.scaled_dot_product_attention" in text
    assert "[3, " not in text.split("func @forward")[1]  # the traced batch of 3 is spelled nowhere
    plan = ReductionPlan(merge_r=8, merge_start=3)
    for b in (1, 2, 5):
        assert torch.equal(_run(merged, (x[:b],)), run_encoder(adapter_for(model), (x[:b],), plan))


def test_dynamic_batch_merged_vit_onnx_serves_every_batch(fashion_vit_dynamic_ir, tmp_path):
    """One ONNX artifact of a merged ViT traced with a symbolic batch: its input is (batch, 1, 28, 28) and
    onnxruntime computes the executor's output at batch 1, 2 and 5."""
    import onnx

    from elision.compiler.lowering import emit_onnx, run_onnx_artifact
    from elision.passes.pruning.executor import ReductionPlan, adapter_for, run_encoder

    model, module, (x,) = fashion_vit_dynamic_ir
    merged = _apply(module, "merge-tokens{r=8,start=5}")  # one merge keeps the (dynamic-shape) export short
    emit_onnx(merged, None, tmp_path, ort_fusions=False)
    inputs = onnx.load(str(tmp_path / "forward.onnx")).graph.input
    assert [d.dim_param or d.dim_value for d in inputs[0].type.tensor_type.shape.dim] == ["batch", 1, 28, 28]
    plan = ReductionPlan(merge_r=8, merge_start=5)
    for b in (1, 2, 5):
        expect = run_encoder(adapter_for(model), (x[:b],), plan)
        assert torch.equal(_run(merged, (x[:b],)), expect)
        torch.testing.assert_close(run_onnx_artifact(tmp_path, "forward", (x[:b],))[0], expect, atol=1e-5, rtol=1e-5)
