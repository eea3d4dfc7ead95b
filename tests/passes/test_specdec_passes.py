"""kv-cache / tree-verify / layer-skip-draft: differential tests against eager Hugging Face models (fp32).

Tolerances: prefill vs the traced forward: identical ops, <= 1e-6; decode through the cache and tree
verification vs full-sequence HF forwards: <= 1e-5 (same math, different reduction lengths in SDPA).
"""
from __future__ import annotations

import copy

import pytest
import torch

from elision.ir import Module, to_fx, verify
from elision.passes import PassError, run_pipeline
from elision.passes.specdec import parse_layers
from specdec_compiled_models import VOCAB, compile_arch, compiled, hf_logits, path_to, tree_inputs

ARCHS = ["llama", "qwen2", "mistral", "gpt2"]
torch.set_num_threads(1)


def _ids(shape, seed):
    return torch.randint(0, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


def _kv_shape(ir, batch: int, past: int):
    a = ir.attrs["specdec"]
    return (batch, a["kv_heads"], past, a["head_dim"])


@pytest.mark.parametrize("arch", ARCHS)
def test_prefill_equals_traced_forward(arch):
    model, ir = compiled(arch)
    verify(ir)
    ids = _ids((2, 11), 3)
    fwd = to_fx(ir, "forward")(ids)[0]
    out = to_fx(ir, "prefill")(ids)
    assert (out[0] - fwd).abs().max().item() <= 1e-6
    assert (fwd - hf_logits(model, ids)).abs().max().item() <= 1e-5
    # one new K and V per layer, [batch, kv_heads, n, head_dim]
    assert len(out) == 1 + 2 * ir.attrs["specdec"]["num_layers"]
    assert tuple(out[1].shape) == _kv_shape(ir, 2, 11)


@pytest.mark.parametrize("arch", ARCHS)
def test_decode_token_by_token_matches_full_sequence(arch):
    model, ir = compiled(arch)
    ids = _ids((2, 10), 4)
    ref = hf_logits(model, ids)
    decode = to_fx(ir, "decode")
    layers = ir.attrs["specdec"]["num_layers"]
    kv = [torch.zeros(_kv_shape(ir, 2, 0)) for _ in range(2 * layers)]
    for t in range(ids.shape[1]):
        out = decode(ids[:, t:t + 1], *kv)
        assert (out[0][:, 0] - ref[:, t]).abs().max().item() <= 1e-5, f"position {t}"
        kv = [torch.cat([a, b], 2) for a, b in zip(kv, out[1:])]
    # a chunk of several tokens on top of a cache (prefill 4, then 6 at once)
    first = decode(ids[:, :4], *[k[:, :, :0] for k in kv])
    rest = decode(ids[:, 4:], *first[1:])
    assert (rest[0] - ref[:, 4:]).abs().max().item() <= 1e-5


@pytest.mark.parametrize("arch", ARCHS)
def test_verify_tree_matches_each_path_as_a_sequence(arch):
    model, ir = compiled(arch)
    past = 5
    prefix = _ids((2, past), 5)
    cache = to_fx(ir, "prefill")(prefix)[1:]
    gen = torch.Generator().manual_seed(6)
    parents = [-1] + [int(torch.randint(0, i, (), generator=gen)) for i in range(1, 9)]  # random 9-node tree
    tokens = _ids((2, len(parents)), 7)
    positions, bias = tree_inputs(parents, past, 2)
    logits, hidden, *new_kv = to_fx(ir, "verify")(tokens, positions, bias, *cache)
    assert tuple(hidden.shape) == (2, len(parents), model.config.hidden_size)
    assert len(new_kv) == len(cache)
    for node in range(len(parents)):
        seq = torch.cat([prefix, tokens[:, path_to(parents, node)]], 1)
        ref = hf_logits(model, seq)[:, -1]
        assert (logits[:, node] - ref).abs().max().item() <= 1e-5, f"tree node {node}"


def test_layer_skip_draft_equals_bypassed_hf_model():
    model, ir = compiled("llama")
    assert ir.attrs["specdec"]["skip_layers"] == [2, 3]
    draft_fn = ir.functions["draft"]
    assert [v.name for v in draft_fn.inputs] == ["input_ids", "positions", "attn_bias",
                                                 "past_k_0", "past_v_0", "past_k_1", "past_v_1"]
    bypassed = copy.deepcopy(model)
    from elision.apps.specdec.backends import _Bypass, find_decoder_layers

    layers = find_decoder_layers(bypassed)
    layers[2] = _Bypass()
    layers[3] = _Bypass()
    draft = to_fx(ir, "draft")
    past = 6
    prefix = _ids((2, past), 8)
    causal_pos, causal_bias = tree_inputs(list(range(-1, past - 1)), 0, 2)
    kv0 = [torch.zeros(_kv_shape(ir, 2, 0)) for _ in range(4)]
    pre = draft(prefix, causal_pos, causal_bias, *kv0)
    assert (pre[0] - hf_logits(bypassed, prefix)).abs().max().item() <= 1e-5
    parents = [-1, 0, 0, 1, 2, 3]
    tokens = _ids((2, len(parents)), 9)
    positions, bias = tree_inputs(parents, past, 2)
    out = draft(tokens, positions, bias, *pre[2:])  # pre = (logits, hidden, k_0, v_0, k_1, v_1)
    for node in range(len(parents)):
        seq = torch.cat([prefix, tokens[:, path_to(parents, node)]], 1)
        assert (out[0][:, node] - hf_logits(bypassed, seq)[:, -1]).abs().max().item() <= 1e-5
    # the draft really is cheaper: the skipped layers' weights are not read
    read = {n.args[0] for n in draft_fn.nodes if n.op == "param"}
    assert not any(p.startswith(("model.layers.2.", "model.layers.3.")) for p in read)
    assert any(p.startswith("model.layers.1.") for p in read)


def test_layer_skip_draft_on_parallel_residual_blocks():
    """GPT-NeoX adds attention and MLP to the residual stream in parallel: the model map records such layers
    (``parallel``), and the location-span reading of a layer's residual stream (for blocks the map does not
    structure) finds the same streams. @draft equals the HF model with layer 1's attention and MLP outputs zeroed."""
    from elision.analysis.model_map import build_model_map, residual_streams

    model, ir = compile_arch("gpt_neox", 3, "layer-skip-draft{layers=1},dce")
    layers = build_model_map(ir, "verify").layers
    assert [ly.parallel for ly in layers] == [True] * 3
    by_span = residual_streams(ir.functions["verify"], [], layers[0].stack, 3, layers[0].input.type)
    assert by_span == [(ly.input, ly.output) for ly in layers]
    zeroed = copy.deepcopy(model)
    block = zeroed.gpt_neox.layers[1]
    block.attention.register_forward_hook(lambda mod, args, out: (torch.zeros_like(out[0]),) + tuple(out[1:]))
    block.mlp.register_forward_hook(lambda mod, args, out: torch.zeros_like(out))
    draft = to_fx(ir, "draft")
    assert [v.name for v in ir.functions["draft"].inputs][3:] == ["past_k_0", "past_v_0", "past_k_2", "past_v_2"]
    prefix = _ids((2, 6), 16)
    causal_pos, causal_bias = tree_inputs(list(range(-1, 5)), 0, 2)
    kv0 = [torch.zeros(_kv_shape(ir, 2, 0)) for _ in range(4)]
    out = draft(prefix, causal_pos, causal_bias, *kv0)
    assert (out[0] - hf_logits(zeroed, prefix)).abs().max().item() <= 1e-5
    assert (out[0] - hf_logits(model, prefix)).abs().max().item() > 1e-3  # skipping the layer changed the output
    read = {n.args[0] for n in ir.functions["draft"].nodes if n.op == "param"}
    assert not any(p.startswith("gpt_neox.layers.1.") for p in read)


# ------------------------------------------------------------------------------------------- golden IR
def test_golden_ir_prefill_decode_verify_draft():
    from _filecheck import filecheck

    _, ir = compiled("llama")
    filecheck(str(ir.functions["prefill"]), """
        CHECK: func @prefill(%input_ids : i64[batch, n]) {
        CHECK-NOT: past_k
        CHECK: %k_0 : f32[batch, 2, n, 16] = aten.add.Tensor
        CHECK: aten.scaled_dot_product_attention.default
        CHECK: return ({{%[a-z_0-9]+}}, %k_0, %v_0, %k_1, %v_1, %k_2, %v_2, %k_3, %v_3)
    """)
    filecheck(str(ir.functions["decode"]), """
        CHECK: func @decode(%input_ids : i64[batch, n], %past_k_0 : f32[batch, 2, past, 16], %past_v_0 : f32[batch, 2, past, 16]
        CHECK: %past_len : int<past> = aten.sym_size.int(%past_k_0, 2)
        CHECK: %q_pos : i64[n] = aten.add.Tensor(%q_arange, %past_len)
        CHECK: %causal : bool[n, n + past] = aten.le.Tensor(%kv_row, %q_col)
        CHECK: %causal_bias : f32[1, 1, n, n + past] = aten.unsqueeze.default
        CHECK: %k_0 : f32[batch, 2, n, 16] = aten.add.Tensor
        CHECK: %k_all_0 : f32[batch, 2, n + past, 16] = aten.cat.default([%past_k_0, %k_0], 2)
        CHECK: %rep : f32[batch, 4, n + past, 16] = aten.reshape.default
        CHECK: aten.scaled_dot_product_attention.default({{.*}}, %rep, %rep_1, %causal_bias
        CHECK-NOT: aten.cumsum
        CHECK: return ({{%[a-z_0-9]+}}, %k_0, %v_0, %k_1, %v_1, %k_2, %v_2, %k_3, %v_3)
    """)
    filecheck(str(ir.functions["verify"]), """
        CHECK: func @verify(%input_ids : i64[batch, n], %positions : i64[batch, n], %attn_bias : f32[batch, 1, n, n + past], %past_k_0
        CHECK-NOT: aten.arange
        CHECK: aten._to_copy.default(%{{.*}}) loc("model.rotary_emb")
        CHECK: %cos : f32[batch, n, 16] = aten.cos.default
        CHECK: aten.scaled_dot_product_attention.default({{.*}}, %attn_bias
        CHECK: %hidden : f32[batch, n, 64]
        CHECK: return ({{%[a-z_0-9]+}}, %hidden, %k_0, %v_0
    """)
    filecheck(str(ir.functions["draft"]), """
        CHECK: func @draft({{.*}}%past_v_1 : f32[batch, 2, past, 16]) {
        CHECK-NOT: model.layers.2
        CHECK-NOT: model.layers.3
        CHECK: loc("model.norm")
        CHECK: return ({{%[a-z_0-9]+}}, %hidden, %k_0, %v_0, %k_1, %v_1)
    """)


def test_gpt2_learned_positions_come_from_the_positions_input():
    from _filecheck import filecheck

    _, ir = compiled("gpt2")
    filecheck(str(ir.functions["verify"]), """
        CHECK: func @verify(%input_ids : i64[batch, n], %positions : i64[batch, n]
        CHECK: f32[batch, n, 64] = aten.embedding.default(%p_transformer_wpe_weight, %positions) loc("transformer.wpe")
    """)


# ------------------------------------------------------------------------------------------- errors
def test_pass_order_and_option_errors():
    _, ir = compiled("qwen2")
    bare = ir.copy()
    del bare.functions["decode"], bare.functions["verify"]
    with pytest.raises(PassError, match="run kv-cache first"):
        run_pipeline(bare, "tree-verify")
    with pytest.raises(PassError, match="run kv-cache and tree-verify first"):
        run_pipeline(Module({"forward": ir.functions["forward"].copy()}, dict(ir.params), {}),
                     "layer-skip-draft{layers=1}")
    with pytest.raises(PassError, match=r"out of range for a 4-layer model \(0..3\)"):
        parse_layers("2,7", 4)
    with pytest.raises(PassError, match="keep at least one"):
        parse_layers("0,1", 2)
    with pytest.raises(PassError, match="not a list of layer indices"):
        parse_layers("two", 4)
    assert parse_layers("3;1", 4) == [1, 3]
    # passes take concrete options: the search for layers lives in the application, and the error says where
    with pytest.raises(PassError, match=r"compile_specdec\(model, skip_layers='auto'\)"):
        run_pipeline(ir.copy(), "layer-skip-draft{layers=auto}")
    with pytest.raises(PassError, match="needs layers=I,J"):
        run_pipeline(ir.copy(), "layer-skip-draft")


def test_kv_cache_refuses_a_model_without_attention():
    from elision.ir import parse

    m = parse("""
        param "w" : f32[8, 4]
        func @forward(%x : i64[batch, seq]) {
          %w : f32[8, 4] = param("w")
          %e : f32[batch, seq, 4] = aten.embedding.default(%w, %x)
          return (%e)
        }
    """.replace("\n        ", "\n"))
    m.params["w"] = torch.zeros(8, 4)
    with pytest.raises(PassError, match="has no scaled_dot_product_attention"):
        run_pipeline(m, "kv-cache")


# ------------------------------------------------------------------------------------------- lowering variants
def test_fuse_attention_after_specdec_passes_uses_elision_attention():
    """kv-cache/tree-verify output lowers to elision.attention (Triton on CUDA; torch reference here)."""
    _, ir = compiled("llama")
    fused = ir.copy()
    run_pipeline(fused, "fuse-attention,dce")
    for fn in ("verify", "draft"):
        ops = [n.op for n in fused.functions[fn].nodes]
        assert "aten.scaled_dot_product_attention.default" not in ops and "elision.attention.default" in ops
    parents = [-1, 0, 0, 1, 2]
    positions, bias = tree_inputs(parents, 4, 2)
    tokens = _ids((2, 5), 14)
    past = [torch.randn(_kv_shape(ir, 2, 4), generator=torch.Generator().manual_seed(i)) for i in range(8)]
    got = to_fx(fused, "verify")(tokens, positions, bias, *past)
    want = to_fx(ir, "verify")(tokens, positions, bias, *past)
    for a, b in zip(got, want):
        assert (a - b).abs().max().item() <= 1e-5


def test_decode_sliding_window_equals_verify_with_a_windowed_bias():
    from elision.passes.specdec import build_decode

    _, ir = compiled("mistral")
    m = ir.copy()
    m.functions["decode"] = build_decode(m, "forward", window=3)
    m.functions["decode"].module = m
    ids = _ids((2, 7), 15)
    kv0 = [torch.zeros(_kv_shape(ir, 2, 0)) for _ in range(4)]
    got = to_fx(m, "decode")(ids, *kv0)
    q = torch.arange(7)[:, None]
    k = torch.arange(7)[None, :]
    allowed = (k <= q) & (k > q - 3)
    bias = torch.zeros(2, 1, 7, 7).masked_fill(~allowed, float("-inf"))
    want = to_fx(ir, "verify")(ids, torch.arange(7)[None].expand(2, 7), bias, *kv0)
    assert (got[0] - want[0]).abs().max().item() <= 1e-5
    unwindowed = to_fx(ir, "decode")(ids, *kv0)
    assert (unwindowed[0] - got[0]).abs().max().item() > 1e-3  # the window really changed the mask
