"""IR rewrite `prune-tokens`: golden before/after IR, differential check against the layer-by-layer executor,
keep=1 identity, print/parse round trip, ONNX lowering, bad options."""
from __future__ import annotations

import pytest
import torch

from pruning_models import (apply_pipeline, assert_round_trips, lower_and_run, onnx_input_dims, padded_bert_batch,
                            run_ir, tiny_bert, tiny_vit)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def vit_ir():
    from elision.frontend.trace import export_to_ir
    model = tiny_vit()
    x = torch.randn(2, 1, 16, 16)
    return model, export_to_ir(model, (x,)), (x,)


def _prune(module, opts: str):
    return apply_pipeline(module, "prune-tokens{" + opts + "}")


# padded text batches of 1, 2 and 5 rows at the traced length 12 (real lengths, shortest 3: [CLS] x [SEP])
DYNAMIC_BATCHES = [(7,), (12, 9), (12, 9, 5, 3, 11)]


@pytest.mark.parametrize("score, after, keep",
                         [("cls-attn", 1, 0.5), ("key-norm", 0, 0.3), ("last-token-attn", 1, 0.6)])
def test_bert_pruned_ir_matches_executor_with_padding(bert_ir, score, after, keep):
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = bert_ir
    pruned = _prune(module, f"score={score};after={after};keep={keep}")
    expect = run_encoder(adapter_for(model), inputs, ReductionPlan(prune_after=after, keep=keep, score=score))
    torch.testing.assert_close(run_ir(pruned, inputs), expect, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(run_ir(module, inputs), expect, atol=1e-4)  # the pruning did change the output


def test_tuner_pipeline_string_compiles_to_the_measured_plan(bert_ir):
    """What `elision tune` prints (progressive pruning + skipped branches) is a pipeline the IR passes apply, and
    the rewritten graph computes exactly what the tuner measured with the executor."""
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = bert_ir
    plan = ReductionPlan(prune_after=0, keep=0.75, extra_stages=((1, 0.5),), skip_mlp=frozenset({1}))
    pruned = apply_pipeline(module, plan.describe())
    assert str(pruned).count("aten.topk.default") == 2
    expect = run_encoder(adapter_for(model), inputs, plan)
    torch.testing.assert_close(run_ir(pruned, inputs), expect, atol=1e-6, rtol=1e-6)


def test_later_stage_must_follow_the_earlier_one(bert_ir):
    from elision.passes.base import PassError
    with pytest.raises(PassError, match="already pruned after layer 1; a further stage must come later"):
        _prune(_prune(bert_ir[1], "after=1;keep=0.5"), "after=0;keep=0.5")


def test_vit_pruned_ir_matches_executor(vit_ir):
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, inputs = vit_ir
    pruned = _prune(module, "after=1;keep=0.25")
    expect = run_encoder(adapter_for(model), inputs, ReductionPlan(prune_after=1, keep=0.25))
    torch.testing.assert_close(run_ir(pruned, inputs), expect, atol=1e-5, rtol=1e-5)


def test_golden_bert_before_after(bert_ir):
    """FileCheck-style facts of the printed IR: 12 tokens before layer 2, 1 + 1 + ceil(0.5 * 10) = 7 after."""
    _model, module, _inputs = bert_ir
    before = str(module)
    after = str(_prune(module, "after=1;keep=0.5"))
    assert "aten.topk" not in before
    lines = after.splitlines()
    # the tap: a contiguous copy of layer 1's keys, one attention row, static top-k, sort, gather of the states
    tap = [ln for ln in lines if 'loc("encoder_model.encoder.layer.1.prune_tokens")' in ln]
    ops = [ln.split("= ")[1].split("(")[0] for ln in tap]
    assert ops.index("aten.topk.default") < ops.index("aten.sort.default") < len(ops) - 1
    assert any(": (f32[3, 7], i64[3, 7]) = aten.topk.default(" in ln and ", 7, 1)" in ln for ln in tap)
    assert any("= aten._softmax.default(" in ln and ": f32[3, 4, 12]" in ln for ln in tap)
    assert tap[-1].split(" : ")[1].startswith("f32[3, 7, 32] = aten.gather.default(")
    # downstream: layer 2 attends over 7 tokens with a 7x7 mask gathered from the 12x12 one
    sdpa = [ln for ln in lines if "aten.scaled_dot_product_attention" in ln]
    assert ": f32[3, 4, 12, 8]" in sdpa[1] and ": f32[3, 4, 7, 8]" in sdpa[2]
    assert any(": bool[3, 1, 7, 7] = aten.__and__.Tensor(" in ln for ln in lines)
    assert any("aten.view.default(" in ln and "[3, 7, -1, 8]" in ln for ln in lines)
    assert "[3, 7, -1, 8]" not in before and before.count("[3, 12, -1, 8]") == 9
    assert after.count("[3, 12, -1, 8]") == 6  # layers 0 and 1 are untouched


def test_keep_one_is_bit_for_bit_and_round_trips(bert_ir):
    _model, module, inputs = bert_ir
    same = _prune(module, "after=1;keep=1.0")
    assert str(same) == str(module) and torch.equal(run_ir(same, inputs), run_ir(module, inputs))
    pruned = _prune(module, "after=1;keep=0.4")
    assert_round_trips(pruned, inputs)


def test_pruned_bert_lowers_to_onnx_and_matches_torch(bert_ir, tmp_path):
    _model, module, inputs = bert_ir
    _got, graph_ops = lower_and_run(_prune(module, "after=1;keep=0.5"), inputs, tmp_path)
    assert {"TopK", "GatherElements"} <= graph_ops


def test_dynamic_batch_pruned_bert_keeps_batch_symbolic_and_matches_executor(bert_dynamic_ir):
    """Traced with a symbolic batch, the pruned graph stays symbolic in the batch (the tap's shape arguments and the
    gathered mask's views read it with sym_size) and equals the executor at batch 1, 2 and 5, padding included."""
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module = bert_dynamic_ir
    assert module.functions["forward"].inputs[0].type.shape == ("batch", 12)
    plan = ReductionPlan(prune_after=0, keep=0.75, extra_stages=((1, 0.5),), score="last-token-attn")
    pruned = apply_pipeline(module, plan.describe())
    text = str(pruned)
    assert text.count("aten.topk.default") == 2 and "bool[batch, 1, 6, 6] = aten.__and__.Tensor(" in text
    assert "[3, " not in text.split("func @forward")[1]  # the traced batch of 3 is spelled nowhere
    for i, lengths in enumerate(DYNAMIC_BATCHES):
        inputs = padded_bert_batch(lengths, 12, seed=i)
        torch.testing.assert_close(run_ir(pruned, inputs), run_encoder(adapter_for(model), inputs, plan),
                                   atol=1e-6, rtol=1e-6)


def test_dynamic_batch_pruned_bert_onnx_serves_every_batch(bert_dynamic_ir, tmp_path):
    """One ONNX artifact of the pruned text encoder: its inputs are (batch, 12) with a symbolic batch, and
    onnxruntime computes the pruned IR's output (and so the executor's) at batch 1, 2 and 5 with padded rows."""
    from elision.lowering.emit import emit_onnx, run_onnx_artifact
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module = bert_dynamic_ir
    pruned = _prune(module, "after=1;keep=0.5")
    emit_onnx(pruned, None, tmp_path, ort_fusions=False)
    assert onnx_input_dims(tmp_path) == [["batch", 12], ["batch", 12]]
    for i, lengths in enumerate(DYNAMIC_BATCHES):
        inputs = padded_bert_batch(lengths, 12, seed=i)
        got = run_onnx_artifact(tmp_path, "forward", inputs)[0]
        assert got.shape == (len(lengths), 32)
        torch.testing.assert_close(got, run_ir(pruned, inputs), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(got, run_encoder(adapter_for(model), inputs, ReductionPlan(prune_after=1, keep=0.5)),
                                   atol=1e-5, rtol=1e-5)


def test_symbolic_sequence_length_is_refused():
    """Only the batch may stay symbolic: a graph traced with a dynamic sequence gets a PassError saying so."""
    from elision.frontend.trace import export_to_ir
    from elision.models.vision import MeanPooledEncoder
    from elision.passes.base import PassError
    from elision.analysis.token_axes import check_symbolic_batch

    with pytest.raises(PassError, match="dimension 'heads' \\(axis 1 of a 4-d value\\) is symbolic"):
        check_symbolic_batch("prune-tokens", ("batch", "heads", 12, 8), token_axis=2)
    check_symbolic_batch("prune-tokens", ("batch", 12, 32))
    model = MeanPooledEncoder(tiny_bert(num_hidden_layers=2, intermediate_size=48, add_pooling_layer=False)).eval()
    dims = {0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}}
    module = export_to_ir(model, padded_bert_batch((12, 9, 5), 12), dims)
    with pytest.raises(PassError, match="the sequence length is symbolic \\('seq'\\); token reduction needs a static "
                                        "sequence length"):
        _prune(module, "after=0;keep=0.5")


def test_tap_traced_with_symbolic_batch_or_refused():
    """`trace_tap` keeps a symbolic batch symbolic (a sym_size in the shape arguments, not the example's size) and
    refuses a tap whose code branches on the batch size instead of baking one branch in."""
    from elision.passes.base import PassError
    from elision.analysis.token_axes import trace_tap

    fn = trace_tap(lambda h: torch.ones(h.shape[0], 4) + h[:, :4, 0], {"h": (("batch", 6, 8), torch.float32)}, "t")
    text = str(fn)
    assert "aten.sym_size.int(%h, 0)" in text and "f32[batch, 4]" in text
    with pytest.raises(PassError, match="t: the tap's code depends on the value of the symbolic dims \\['batch'\\]"):
        trace_tap(lambda h: h[:1] if h.shape[0] > 3 else h, {"h": (("batch", 6, 8), torch.float32)}, "t")


@pytest.mark.parametrize("opts, message", [
    ("keep=0", "keep=0.0 is outside \\(0, 1\\]"),
    ("keep=1.5", "outside \\(0, 1\\]"),
    ("after=2;keep=0.5", "after=2 is out of range: the model has 3 layers, use 0..1"),
    ("after=-1;keep=0.5", "out of range"),
    ("score=entropy", "not one of cls-attn, last-token-attn, key-norm"),
    ("after=auto;keep=0.5", "needs calibration data .* run `elision tune MODEL --passes prune-tokens"),
    ("after=two;keep=0.5", "'two' is not any of int, 'auto'"),
])
def test_bad_options(bert_ir, opts, message):
    from elision.passes.base import PassError
    with pytest.raises(PassError, match=message):
        _prune(bert_ir[1], opts)


def test_model_without_attention_is_refused():
    from elision.frontend.trace import export_to_ir
    from elision.passes.base import PassError
    mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)).eval()
    with pytest.raises(PassError, match="no stack of attention layers was recognised"):
        _prune(export_to_ir(mlp, (torch.randn(2, 5, 8),)), "after=0;keep=0.5")


def test_prune_tokens_is_approximate(bert_ir):
    from elision.passes.base import PassError
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    with pytest.raises(PassError, match="approximate"):
        PassManager(parse_pipeline("prune-tokens{after=1;keep=0.5}")).run(bert_ir[1].copy())


def test_compile_cli_prunes_builtin_vit_to_onnx(tmp_path):
    """`elision compile --passes prune-tokens{...} --approximate --emit onnx` on the trained Fashion ViT: traced at
    a fixed image size with the spec's batch dim kept dynamic, the one ORT artifact equals the layer-by-layer
    executor with the same settings at batch 1, 2 and 5."""
    from typer.testing import CliRunner

    from elision.cli.main import app
    from elision.frontend.model_spec import load_model
    from elision.lowering.emit import run_onnx_artifact
    from elision.models.datasets import fashion_sample
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    out = tmp_path / "art"
    res = CliRunner().invoke(app, ["compile", "builtin:fashion-vit", "--passes", "prune-tokens{after=2;keep=0.25}",
                                   "--approximate", "--emit", "onnx", "-o", str(out)])
    assert res.exit_code == 0, res.output
    assert "exported at fixed input shapes [[batch, 1, 28, 28]] (the pipeline needs static shapes; batch stays " \
           "dynamic)" in " ".join(res.output.split())
    assert onnx_input_dims(out) == [["batch", 1, 28, 28]]
    x, _y = fashion_sample(5)
    model = load_model("builtin:fashion-vit").model
    for b in (1, 2, 5):
        got = run_onnx_artifact(out, "forward", (x[:b],))[0]
        expect = run_encoder(adapter_for(model), (x[:b],), ReductionPlan(prune_after=2, keep=0.25))
        torch.testing.assert_close(got, expect, atol=1e-4, rtol=1e-4)
    refused = CliRunner().invoke(app, ["compile", "builtin:fashion-vit", "--passes", "prune-tokens{after=2;keep=0.25}",
                                       "--emit", "onnx", "-o", str(tmp_path / "no")])
    # the command reports the PassError as one line and exits 2
    assert refused.exit_code == 2 and "approximate" in refused.output


def test_compile_cli_keeps_only_the_batch_dynamic():
    """Token-reduction pipelines fix every dynamic dim but the one named batch; a static-shape pass that does not
    handle a symbolic batch (no `dynamic_batch`) still fixes them all, as does a spec without a batch dim."""
    from elision.cli.main import _keep_dims, _static_shapes

    dims = {0: {0: "batch", 1: "seq"}, 1: {0: "batch", 1: "seq"}}
    assert _keep_dims(dims, "batch") == {0: {0: "batch"}, 1: {0: "batch"}}
    assert _keep_dims(dims, None) == {} and _keep_dims({0: {1: "seq"}}, "batch") == {}
    ids = torch.zeros(2, 16, dtype=torch.long)
    assert _static_shapes((ids, ids), _keep_dims(dims, "batch")) == [["batch", 16], ["batch", 16]]
    assert _static_shapes((ids, ids), {}) == [[2, 16], [2, 16]]


def test_onnx_timer_runs_the_deployed_plan(bert_ir):
    """`elision tune --measure onnx` times what it would ship: the artifact of a plan computes the executor's output
    for that plan (so the fidelity the tuner measured is the artifact's), and only IR-expressible plans qualify."""
    from elision.apps.tokens.deployed import OnnxTimer, deployable
    from elision.apps.tokens.executor import IDENTITY, ReductionPlan, adapter_for, run_encoder

    model, _module, inputs = bert_ir
    plan = ReductionPlan(prune_after=1, keep=0.5, skip_attn=frozenset({1}))
    adapter = adapter_for(model)
    merged = ReductionPlan(merge_r=2, merge_start=1, skip_attn=frozenset({1}))
    merged_mlp_skip = ReductionPlan(merge_r=2, merge_start=1, skip_mlp=frozenset({1}))  # the MLP of a merging layer
    assert deployable(plan, adapter) and deployable(merged, adapter) and deployable(merged_mlp_skip, adapter)
    # what the text merge pass does not follow: an earlier pruning stage
    assert not deployable(ReductionPlan(prune_after=0, keep=0.5, merge_r=2, merge_start=1), adapter)
    timer = OnnxTimer(model, inputs, ["input_ids", "attention_mask"], threads=1)
    try:
        for p in (IDENTITY, plan, merged, merged_mlp_skip):
            got = torch.from_numpy(next(iter(timer.runner(p)().values())))
            torch.testing.assert_close(got, run_encoder(adapter_for(model), inputs, p), atol=1e-5, rtol=1e-5)
    finally:
        timer.close()
