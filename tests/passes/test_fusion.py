"""fuse-attention / fuse-norms / fuse-qkv: differential tests against the unfused IR, golden FileCheck tests on a
hand-written block, and negative cases whose reason is recorded.

Tolerance (fp32): max |fused - unfused| <= 1e-5 * max(1, max |unfused|). The elision kernels compute softmax and
norms in fp32, so on fp32 models the only differences are reassociation.
"""
from __future__ import annotations

import pytest
import torch

from elision.ir import interpret, parse, to_fx, verify
from elision.passes import run_pipeline
from elision.passes.fusion import DEFAULT_PIPELINE
from elision.analysis.model_map import build_model_map
from tests._filecheck import filecheck
from tests.model_map_models import built, exported

TOL = 1e-5


def _close(ref: torch.Tensor, out: torch.Tensor) -> float:
    err = (out.float() - ref.float()).abs().max().item()
    bound = TOL * max(1.0, ref.float().abs().max().item())
    assert err <= bound, f"max abs err {err} > {bound}"
    return err


def _ops(mod) -> dict[str, int]:
    hist: dict[str, int] = {}
    for n in mod.functions["forward"].nodes:
        hist[n.op] = hist.get(n.op, 0) + 1
    return hist


@pytest.mark.parametrize("name,attn,norms,add_norms,qkv", [
    ("llama", 2, 1, 4, 2),
    ("qwen2", 2, 1, 4, 2),          # q/k/v biases are concatenated too
    ("gpt2", 2, 1, 4, 0),           # c_attn is already one projection
    ("bert", 2, 1, 4, 2),           # post-norm: every add feeds a LayerNorm
    ("clip_vision", 2, 2, 3, 2),
    ("handwritten", 2, 1, 3, 2),    # masked_fill(~tril, -inf)
    ("handwritten_additive", 2, 1, 3, 2),
    ("handwritten_bias", 2, 1, 3, 2),  # arbitrary additive bias from a model input
])
def test_default_pipeline_matches_unfused(name, attn, norms, add_norms, qkv):
    model, example, _ = built(name)
    ref_mod = exported(name)
    ref = interpret(ref_mod, "forward", *example)[0]
    with torch.no_grad():
        eager = model(*example)
    eager = eager if isinstance(eager, torch.Tensor) else eager[0]
    _close(eager, ref)  # the unfused IR is the model
    mod = exported(name)
    _, report = run_pipeline(mod, DEFAULT_PIPELINE, verify_each=True)
    hist = _ops(mod)
    assert hist.get("elision.attention.default", 0) == attn
    assert hist.get("elision.rms_norm.default", 0) + hist.get("elision.layer_norm.default", 0) == norms
    assert hist.get("elision.add_rms_norm.default", 0) + hist.get("elision.add_layer_norm.default", 0) == add_norms
    assert hist.get("aten.split_with_sizes.default", 0) == qkv
    for gone in ("aten.scaled_dot_product_attention.default", "aten.softmax.int", "aten.rsqrt.default",
                 "aten.layer_norm.default"):
        assert gone not in hist, f"{gone} left after fusion"
    _close(ref, interpret(mod, "forward", *example)[0])
    # the fused IR prints and parses back to the same text
    assert parse(mod.print()).print() == mod.print()


@pytest.mark.parametrize("pipeline", ["canonicalize,fuse-attention,dce", "canonicalize,fuse-norms,dce",
                                      "canonicalize,fuse-qkv,dce"])
def test_each_pass_alone_on_llama(pipeline):
    _, example, _ = built("llama")
    ref = interpret(exported("llama"), "forward", *example)[0]
    mod = exported("llama")
    _, report = run_pipeline(mod, pipeline, verify_each=True)
    assert report[1]["changed"]
    _close(ref, interpret(mod, "forward", *example)[0])


def test_fused_model_still_maps():
    """After fuse-attention + fuse-qkv the map still finds every attention (as kind "fused") and its masks."""
    mod = exported("llama")
    run_pipeline(mod, "canonicalize,fuse-attention,fuse-qkv,dce")
    mm = build_model_map(mod)
    assert [a.kind for a in mm.attentions] == ["fused", "fused"]
    assert all(a.causal and a.mask_kind == "causal" for a in mm.attentions)
    assert mm.kind == "decoder" and len(mm.layers) == 2


# ------------------------------------------------------------------------------------------ golden IR
BLOCK = """
param "blk.norm.weight" : f32[32]
param "blk.q.weight" : f32[32, 32]
param "blk.q.bias" : f32[32]
param "blk.k.weight" : f32[16, 32]
param "blk.k.bias" : f32[16]
param "blk.v.weight" : f32[16, 32]
param "blk.v.bias" : f32[16]
param "blk.o.weight" : f32[32, 32]
func @forward(%x : f32[batch, seq, 32], %res : f32[batch, seq, 32]) {
  %nw : f32[32] = param("blk.norm.weight")
  %wq : f32[32, 32] = param("blk.q.weight")
  %bq : f32[32] = param("blk.q.bias")
  %wk : f32[16, 32] = param("blk.k.weight")
  %bk : f32[16] = param("blk.k.bias")
  %wv : f32[16, 32] = param("blk.v.weight")
  %bv : f32[16] = param("blk.v.bias")
  %wo : f32[32, 32] = param("blk.o.weight")
  %B : int<batch> = aten.sym_size.int(%x, 0)
  %L : int<seq> = aten.sym_size.int(%x, 1)
  %h : f32[batch, seq, 32] = aten.add.Tensor(%x, %res) loc("blk")
  %sq : f32[batch, seq, 32] = aten.pow.Tensor_Scalar(%h, 2) loc("blk.norm")
  %ms : f32[batch, seq, 1] = aten.mean.dim(%sq, [-1], True) loc("blk.norm")
  %me : f32[batch, seq, 1] = aten.add.Tensor(%ms, 1e-06) loc("blk.norm")
  %rs : f32[batch, seq, 1] = aten.rsqrt.default(%me) loc("blk.norm")
  %nx : f32[batch, seq, 32] = aten.mul.Tensor(%h, %rs) loc("blk.norm")
  %n : f32[batch, seq, 32] = aten.mul.Tensor(%nw, %nx) loc("blk.norm")
  %q : f32[batch, seq, 32] = aten.linear.default(%n, %wq, %bq) loc("blk.attn.q")
  %q4 : f32[batch, seq, 4, 8] = aten.view.default(%q, [%B, %L, 4, 8]) loc("blk.attn")
  %qt : f32[batch, 4, seq, 8] = aten.transpose.int(%q4, 1, 2) loc("blk.attn")
  %k : f32[batch, seq, 16] = aten.linear.default(%n, %wk, %bk) loc("blk.attn.k")
  %k4 : f32[batch, seq, 2, 8] = aten.view.default(%k, [%B, %L, 2, 8]) loc("blk.attn")
  %kt : f32[batch, 2, seq, 8] = aten.transpose.int(%k4, 1, 2) loc("blk.attn")
  %v : f32[batch, seq, 16] = aten.linear.default(%n, %wv, %bv) loc("blk.attn.v")
  %v4 : f32[batch, seq, 2, 8] = aten.view.default(%v, [%B, %L, 2, 8]) loc("blk.attn")
  %vt : f32[batch, 2, seq, 8] = aten.transpose.int(%v4, 1, 2) loc("blk.attn")
  %ones : bool[seq, seq] = aten.ones.default([%L, %L], dtype=torch.bool, pin_memory=False) loc("blk.attn")
  %keep : bool[seq, seq] = aten.tril.default(%ones) loc("blk.attn")
  %att : f32[batch, 4, seq, 8] = aten.scaled_dot_product_attention.default(%qt, %kt, %vt, %keep, scale=0.25, enable_gqa=True) loc("blk.attn")
  %at : f32[batch, seq, 4, 8] = aten.transpose.int(%att, 1, 2) loc("blk.attn")
  %af : f32[batch, seq, 32] = aten.reshape.default(%at, [%B, %L, 32]) loc("blk.attn")
  %o : f32[batch, seq, 32] = aten.linear.default(%af, %wo) loc("blk.attn.o")
  %out : f32[batch, seq, 32] = aten.add.Tensor(%h, %o) loc("blk")
  return (%out)
}
"""


def _block():
    g = torch.Generator().manual_seed(0)
    shapes = {"blk.norm.weight": (32,), "blk.q.weight": (32, 32), "blk.q.bias": (32,), "blk.k.weight": (16, 32),
              "blk.k.bias": (16,), "blk.v.weight": (16, 32), "blk.v.bias": (16,), "blk.o.weight": (32, 32)}
    params = {k: torch.randn(s, generator=g) * 0.3 for k, s in shapes.items()}
    mod = parse(BLOCK, params=params)
    verify(mod, check_types=True)
    inputs = (torch.randn(2, 6, 32, generator=g), torch.randn(2, 6, 32, generator=g))
    return mod, inputs, interpret(mod, "forward", *inputs)[0]


def _golden(pipeline: str, checks: str):
    mod, inputs, ref = _block()
    run_pipeline(mod, pipeline, verify_each=True, check_types=True)
    filecheck(mod.print(), checks)
    _close(ref, interpret(mod, "forward", *inputs)[0])
    return mod


def test_golden_fuse_attention():
    _golden("fuse-attention", """
        CHECK: %keep : bool[seq, seq] = aten.tril.default(%ones)
        CHECK: %[[DROP:[a-z_0-9]+]] : bool[seq, seq] = aten.logical_not.default(%keep)
        CHECK: %[[Z:[a-z_0-9]+]] : f32[seq, seq] = aten.zeros_like.default(%keep, dtype=torch.float32)
        CHECK: %[[B2:[a-z_0-9]+]] : f32[seq, seq] = aten.masked_fill.Scalar(%[[Z]], %[[DROP]], -inf)
        CHECK: %[[B3:[a-z_0-9]+]] : f32[1, seq, seq] = aten.unsqueeze.default(%[[B2]], 0)
        CHECK: %[[B4:[a-z_0-9]+]] : f32[1, 1, seq, seq] = aten.unsqueeze.default(%[[B3]], 0)
        CHECK: %[[A:[a-z_0-9]+]] : f32[batch, 4, seq, 8] = elision.attention.default(%qt, %kt, %vt, %[[B4]], 0.25, False) loc("blk.attn")
        CHECK: aten.transpose.int(%[[A]], 1, 2)
        CHECK-NOT: scaled_dot_product_attention
    """)


def test_golden_fuse_norms_with_residual():
    _golden("fuse-norms,dce", """
        CHECK-NOT: aten.rsqrt
        CHECK: %[[F:[a-z_0-9]+]] : (f32[batch, seq, 32], f32[batch, seq, 32]) = elision.add_rms_norm.default(%x, %res, %nw, 1e-06) loc("blk.norm")
        CHECK-NEXT: %[[N:[a-z_0-9]+]] : f32[batch, seq, 32] = getitem(%[[F]], 0) loc("blk.norm")
        CHECK-NEXT: %[[H:[a-z_0-9]+]] : f32[batch, seq, 32] = getitem(%[[F]], 1) loc("blk")
        CHECK: aten.linear.default(%[[N]], %wq, %bq)
        CHECK: aten.add.Tensor(%[[H]], %o)
        CHECK-NOT: aten.pow
    """)


def test_golden_fuse_qkv():
    mod = _golden("fuse-qkv,dce", """
        CHECK: param "blk.attn.qkv_fused.weight" : f32[64, 32]
        CHECK: param "blk.attn.qkv_fused.bias" : f32[64]
        CHECK: %[[L:[a-z_0-9]+]] : f32[batch, seq, 64] = aten.linear.default(%n, %{{[a-z_0-9]+}}, %{{[a-z_0-9]+}}) loc("blk.attn.qkv_fused")
        CHECK-NEXT: %[[S:[a-z_0-9]+]] : (f32[batch, seq, 32], f32[batch, seq, 16], f32[batch, seq, 16]) = aten.split_with_sizes.default(%[[L]], [32, 16, 16], -1)
        CHECK-NEXT: %[[Q:[a-z_0-9]+]] : f32[batch, seq, 32] = getitem(%[[S]], 0) loc("blk.attn.q")
        CHECK: aten.view.default(%[[Q]], [%B, %L, 4, 8])
        CHECK-NOT: param("blk.q.weight")
    """)
    assert "blk.q.weight" not in mod.params and "blk.attn.qkv_fused.weight" in mod.params


# ------------------------------------------------------------------------------------------ negatives
def test_finite_masked_fill_is_not_fused():
    """masked_fill(scores, m, -100.0) keeps masked positions in the softmax; as an additive bias it would not."""
    text = """
func @forward(%q : f32[2, 4, 5, 8], %k : f32[2, 4, 5, 8], %v : f32[2, 4, 5, 8], %m : bool[5, 5]) {
  %kt : f32[2, 4, 8, 5] = aten.transpose.int(%k, -2, -1) loc("attn")
  %s : f32[2, 4, 5, 5] = aten.matmul.default(%q, %kt) loc("attn")
  %f : f32[2, 4, 5, 5] = aten.masked_fill.Scalar(%s, %m, -100.0) loc("attn")
  %p : f32[2, 4, 5, 5] = aten.softmax.int(%f, -1) loc("attn")
  %o : f32[2, 4, 5, 8] = aten.matmul.default(%p, %v) loc("attn")
  return (%o)
}
"""
    mod = parse(text)
    before = str(mod.functions["forward"])
    _, report = run_pipeline(mod, "fuse-attention")
    assert not report[0]["changed"] and str(mod.functions["forward"]) == before
    assert any("masked_fill value -100.0 does not remove positions" in s for s in mod.attrs["fusion_skipped"])


def test_cross_attention_projections_are_not_merged():
    """q reads the queries, k/v read the memory: one concatenated linear would need two inputs."""
    text = """
param "q.weight" : f32[16, 16]
param "k.weight" : f32[16, 16]
param "v.weight" : f32[16, 16]
func @forward(%x : f32[2, 5, 16], %mem : f32[2, 7, 16]) {
  %wq : f32[16, 16] = param("q.weight")
  %wk : f32[16, 16] = param("k.weight")
  %wv : f32[16, 16] = param("v.weight")
  %q : f32[2, 5, 16] = aten.linear.default(%x, %wq) loc("xattn.q")
  %k : f32[2, 7, 16] = aten.linear.default(%mem, %wk) loc("xattn.k")
  %v : f32[2, 7, 16] = aten.linear.default(%mem, %wv) loc("xattn.v")
  %q4 : f32[2, 5, 2, 8] = aten.view.default(%q, [2, 5, 2, 8]) loc("xattn")
  %k4 : f32[2, 7, 2, 8] = aten.view.default(%k, [2, 7, 2, 8]) loc("xattn")
  %v4 : f32[2, 7, 2, 8] = aten.view.default(%v, [2, 7, 2, 8]) loc("xattn")
  %qt : f32[2, 2, 5, 8] = aten.transpose.int(%q4, 1, 2) loc("xattn")
  %kt : f32[2, 2, 7, 8] = aten.transpose.int(%k4, 1, 2) loc("xattn")
  %vt : f32[2, 2, 7, 8] = aten.transpose.int(%v4, 1, 2) loc("xattn")
  %a : f32[2, 2, 5, 8] = aten.scaled_dot_product_attention.default(%qt, %kt, %vt) loc("xattn")
  return (%a)
}
"""
    g = torch.Generator().manual_seed(0)
    mod = parse(text, params={n: torch.randn(16, 16, generator=g) for n in ("q.weight", "k.weight", "v.weight")})
    _, report = run_pipeline(mod, "fuse-qkv")
    assert not report[0]["changed"]
    assert any("read different inputs (cross-attention)" in s for s in mod.attrs["fusion_skipped"])
    # the attention itself still fuses (no mask, Lq != Lk is fine without is_causal)
    x, mem = torch.randn(2, 5, 16, generator=g), torch.randn(2, 7, 16, generator=g)
    ref = interpret(mod, "forward", x, mem)[0]
    _, report = run_pipeline(mod, "fuse-attention")
    assert report[0]["changed"]
    _close(ref, interpret(mod, "forward", x, mem)[0])


def test_layer_norm_over_two_dims_is_not_fused():
    text = """
param "ln.weight" : f32[4, 8]
param "ln.bias" : f32[4, 8]
func @forward(%x : f32[2, 4, 8]) {
  %w : f32[4, 8] = param("ln.weight")
  %b : f32[4, 8] = param("ln.bias")
  %y : f32[2, 4, 8] = aten.layer_norm.default(%x, [4, 8], %w, %b, 1e-05, False) loc("ln")
  return (%y)
}
"""
    mod = parse(text, params={"ln.weight": torch.ones(4, 8), "ln.bias": torch.zeros(4, 8)})
    _, report = run_pipeline(mod, "fuse-norms")
    assert not report[0]["changed"]
    assert any("layer_norm over [4, 8], not only the last dim" in s for s in mod.attrs["fusion_skipped"])


def test_rms_like_chain_over_wrong_dim_is_not_a_norm():
    """mean over dim 1 (the sequence) is not RMSNorm: nothing is recognized, nothing fused."""
    text = """
func @forward(%x : f32[2, 4, 8]) {
  %sq : f32[2, 4, 8] = aten.pow.Tensor_Scalar(%x, 2)
  %ms : f32[2, 1, 8] = aten.mean.dim(%sq, [1], True)
  %me : f32[2, 1, 8] = aten.add.Tensor(%ms, 1e-06)
  %rs : f32[2, 1, 8] = aten.rsqrt.default(%me)
  %y : f32[2, 4, 8] = aten.mul.Tensor(%x, %rs)
  return (%y)
}
"""
    mod = parse(text)
    assert build_model_map(mod).norms == []
    _, report = run_pipeline(mod, "fuse-norms")
    assert not report[0]["changed"]


@pytest.mark.parametrize("name,attn,norms", [("gemma", 2, 1), ("gemma2", 0, 5), ("gemma3", 2, 9)])
def test_default_pipeline_on_gemma(name, attn, norms):
    """Gemma's RMSNorm multiplies by ``1 + weight``; constant-fold turns that into a parameter read where the add
    was, after the residual add fuse-norms anchors at. The fused norm must read the weight before itself (it once
    read it after: undefined value, KeyError in to_fx). Gemma 2's soft-capped eager attention is left alone."""
    model, example, _ = built(name)
    with torch.no_grad():
        eager = model(*example).logits
    mod = exported(name)
    _, report = run_pipeline(mod, DEFAULT_PIPELINE, verify_each=True, check_types=True)
    verify(mod)
    hist = _ops(mod)
    assert "aten.rsqrt.default" not in hist, "every (1 + w) RMSNorm is fused"
    assert hist.get("elision.add_rms_norm.default", 0) == 4  # each branch's residual add feeds the next norm
    assert hist.get("elision.attention.default", 0) == attn
    assert hist.get("elision.rms_norm.default", 0) == norms  # the rest (Gemma 2/3: post-branch and q/k norms)
    _close(eager, to_fx(mod, "forward")(*example)[0])
    _close(eager, interpret(mod, "forward", *example)[0])


def test_bf16_llama_norm_casts_fuse():
    """In bf16 HF's RMSNorm casts to fp32 and back; the chain (casts included) is still one norm. The kernel
    multiplies the weight before rounding to bf16, HF after: bound 2e-2 relative to the output scale."""
    from tests.model_map_models import llama

    model, example, dyn = llama()
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("layernorm.weight") or name == "model.norm.weight":
                p.copy_(1 + 0.3 * torch.randn(p.shape, generator=g))
    model = model.to(torch.bfloat16)
    from elision.frontend.trace import export_to_ir
    mod = export_to_ir(model, example, dyn)
    mm = build_model_map(mod)
    assert [n.kind for n in mm.norms] == ["rmsnorm"] * 5
    assert any(n.op == "aten._to_copy.default" for n in mm.norms[0].nodes), "the fp32 cast belongs to the norm"
    ref = interpret(mod, "forward", *example)[0].float()
    run_pipeline(mod, DEFAULT_PIPELINE, verify_each=True)
    assert "aten.rsqrt.default" not in _ops(mod)
    out = interpret(mod, "forward", *example)[0].float()
    assert (out - ref).abs().max().item() <= 2e-2 * ref.abs().max().item()
