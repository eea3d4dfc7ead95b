"""IR rewrite `skip-layers`: golden before/after IR facts, differential check against the eager executor."""
from __future__ import annotations

import pytest
import torch

from pruning_models import tiny_vit

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def vit_ir():
    from elision.frontend.trace import export_to_ir
    model = tiny_vit()
    x = torch.randn(2, 1, 16, 16)
    return model, export_to_ir(model, (x,)), x


def _run(module, x):
    from elision.ir import interpret

    return interpret(module, "forward", x)[0]


def test_skip_layers_ir_rewrite_matches_executor(vit_ir):
    from elision.ir import verify
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    from elision.apps.tokens.executor import ReductionPlan, adapter_for, run_encoder

    model, module, x = vit_ir
    rewritten = module.copy()
    PassManager(parse_pipeline("skip-layers{layers=attn1,mlp2}"), verify_each=True,
                allow_approximate=True).run(rewritten)
    verify(rewritten)
    text = str(rewritten)
    # golden facts of the textual IR: the skipped branches' weights and nodes are gone, the rest stays
    assert "vit.layers.1.attention.o_proj.weight" not in text
    assert "vit.layers.1.attention.q_proj.weight" not in text
    assert "vit.layers.2.mlp.fc1.weight" not in text and "vit.layers.2.mlp.fc2.weight" not in text
    assert "vit.layers.1.mlp.fc1.weight" in text and "vit.layers.2.attention.q_proj.weight" in text
    assert text.count("aten.scaled_dot_product_attention") == str(module).count("aten.scaled_dot_product_attention") - 1
    expect = run_encoder(adapter_for(model), (x,), ReductionPlan(skip_attn=frozenset({1}), skip_mlp=frozenset({2})))
    torch.testing.assert_close(_run(rewritten, x), expect, atol=1e-5, rtol=1e-5)


def test_golden_skip_layers(vit_ir):
    """FileCheck: layer 1's LayerNorm after attention reads layer 0's output (its attention branch is gone), and
    layer 2's stream continues from its attention add straight into layer 3 (its MLP branch is gone)."""
    from _filecheck import filecheck

    from elision.passes import run_pipeline

    _model, module, _x = vit_ir
    rewritten = module.copy()
    run_pipeline(rewritten, "skip-layers{layers=attn1,mlp2}", allow_approximate=True)
    filecheck(str(rewritten.functions["forward"]), """
        CHECK-NOT: param("vit.layers.1.attention.q_proj.weight")
        CHECK: %[[L0:add_[0-9]+]] : f32[2, 17, 32] = aten.add.Tensor(%{{[a-z_0-9]+}}, %{{add_[0-9]+}}) loc("vit.layers.0")
        CHECK-NEXT: aten.layer_norm.default(%[[L0]], [32], %p_vit_layers_1_layernorm_after_weight
        CHECK: %[[L1:add_[0-9]+]] : f32[2, 17, 32] = aten.add.Tensor(%{{[a-z_0-9]+}}, %[[L0]]) loc("vit.layers.1")
        CHECK: aten.linear.default({{.*}}%p_vit_layers_2_attention_o_proj_weight
        CHECK: %[[L2:add_[0-9]+]] : f32[2, 17, 32] = aten.add.Tensor(%{{[a-z_0-9]+}}, %[[L1]]) loc("vit.layers.2")
        CHECK-NOT: vit.layers.2.mlp
        CHECK: aten.layer_norm.default(%[[L2]], [32], %p_vit_layers_3_layernorm_before_weight
    """)


def test_skip_layers_nothing_skipped_is_unchanged(vit_ir):
    from elision.passes.tokens.skip_layers import SkipLayers

    _model, module, x = vit_ir
    copy = module.copy()
    assert SkipLayers(layers=()).run(copy) is False
    assert str(copy) == str(module)
    assert torch.equal(_run(copy, x), _run(module, x))


@pytest.mark.parametrize("opts, message", [
    ("layers=0", "first or last layer"),
    ("layers=attn9", "out of range: the model has 4 layers, use 0..3"),
    ("layers=auto", "needs calibration data"),
    ("layers=ffn2", "write I \\(both branches\\), attnI or mlpI"),
])
def test_skip_layers_bad_options(vit_ir, opts, message):
    from elision.passes.base import PassError
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    _model, module, _x = vit_ir
    with pytest.raises(PassError, match=message):
        PassManager(parse_pipeline("skip-layers{" + opts + "}"), allow_approximate=True).run(module.copy())


def test_skip_layers_is_approximate_and_refused_by_default(vit_ir):
    from elision.passes.base import PassError
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    with pytest.raises(PassError, match="approximate"):
        PassManager(parse_pipeline("skip-layers{layers=attn1}")).run(vit_ir[1].copy())


def test_skip_layers_reads_the_tuner_spelling():
    """`elision tune` joins branches with "+"; the pass reads that and the comma form alike."""
    from elision.passes.pipeline import parse_pipeline
    from elision.passes.tokens.skip_layers import parse_branches

    (p,) = parse_pipeline("skip-layers{layers=attn1+mlp2+3}")
    assert parse_branches(p.layers, 5) == [("attn", 1), ("mlp", 2), ("attn", 3), ("mlp", 3)]
    (q,) = parse_pipeline("skip-layers{layers=attn1,mlp2,3}")
    assert parse_branches(q.layers, 5) == parse_branches(p.layers, 5)
