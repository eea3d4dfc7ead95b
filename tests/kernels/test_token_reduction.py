"""Token pruning / merging / DCT / layer-skip algorithms: exactness against eager HF attention and invariants."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elision.kernels import token_reduction as alg

torch.set_num_threads(1)


def _tiny_bert(attn="eager"):
    from transformers import BertConfig, BertModel

    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=120, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64)
    cfg._attn_implementation = attn
    return BertModel(cfg).eval()


def _capture(linears):
    store = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, key=key: store.__setitem__(key, o)) for key, m in linears]
    return store, hooks


def _heads(x, h):
    b, n, c = x.shape
    return x.view(b, n, h, c // h).transpose(1, 2)


def test_cls_score_tap_matches_eager_attention_weights_bert_with_padding():
    model = _tiny_bert("eager")
    ids = torch.randint(5, 120, (3, 12))
    mask = torch.ones_like(ids)
    mask[1, 8:] = 0
    mask[2, 5:] = 0
    linears = []
    for i, layer in enumerate(model.encoder.layer):
        linears += [(f"q{i}", layer.attention.self.query), (f"k{i}", layer.attention.self.key)]
    store, hooks = _capture(linears)
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=mask, output_attentions=True)
    for h in hooks:
        h.remove()
    for i, att in enumerate(out.attentions):
        q, k = _heads(store[f"q{i}"], 4), _heads(store[f"k{i}"], 4)
        tap = alg.attention_row_scores(q, k, 0, valid=mask.bool())
        torch.testing.assert_close(tap, att[:, :, 0, :].mean(1), atol=1e-6, rtol=1e-5)
        # last-token row under right padding
        last = alg.last_valid_index(mask.bool())
        tap_last = alg.attention_row_scores(q, k, last, valid=mask.bool())
        expect = att.mean(1)[torch.arange(3), last]
        torch.testing.assert_close(tap_last, expect, atol=1e-6, rtol=1e-5)


def test_last_token_score_tap_matches_eager_llama_gqa_causal():
    """Decoder: last-token row from post-RoPE q/k with grouped-query attention equals eager weights."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    cfg._attn_implementation = "eager"
    model = LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, 100, (2, 10))
    layer = model.model.layers[1].self_attn
    store, hooks = _capture([("q", layer.q_proj), ("k", layer.k_proj)])
    with torch.no_grad():
        out = model(input_ids=ids, output_attentions=True)
        pos = torch.arange(10).unsqueeze(0)
        cos, sin = model.model.rotary_emb(store["q"], pos)
    for h in hooks:
        h.remove()
    q = _heads(store["q"], 4)
    k = _heads(store["k"], 2)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    tap = alg.attention_row_scores(q, k, -1, causal=True)
    torch.testing.assert_close(tap, out.attentions[1][:, :, -1, :].mean(1), atol=1e-6, rtol=1e-5)
    # an earlier query row (index 4) must ignore the future keys
    tap4 = alg.attention_row_scores(q, k, torch.tensor([4, 4]), causal=True)
    torch.testing.assert_close(tap4, out.attentions[1][:, :, 4, :].mean(1), atol=1e-6, rtol=1e-5)


def test_cls_score_tap_matches_eager_vit():
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(0)
    cfg = ViTConfig(image_size=16, patch_size=4, num_channels=1, hidden_size=32, num_hidden_layers=2,
                    num_attention_heads=4, intermediate_size=64)
    cfg._attn_implementation = "eager"
    model = ViTModel(cfg, add_pooling_layer=False).eval()
    a = model.layers[1].attention
    store, hooks = _capture([("q", a.q_proj), ("k", a.k_proj)])
    with torch.no_grad():
        out = model(pixel_values=torch.randn(2, 1, 16, 16), output_attentions=True)
    for h in hooks:
        h.remove()
    tap = alg.attention_row_scores(_heads(store["q"], 4), _heads(store["k"], 4), 0)
    torch.testing.assert_close(tap, out.attentions[1][:, :, 0, :].mean(1), atol=1e-6, rtol=1e-5)


def test_keep_one_is_identity_bit_for_bit():
    x = torch.randn(3, 10, 8)
    scores = torch.rand(3, 10)
    h, idx, kept = alg.prune_tokens(x, scores, 1.0)
    assert torch.equal(idx, torch.arange(10).expand(3, 10))
    assert torch.equal(h, x) and kept.all()


@settings(max_examples=25, deadline=None)
@given(n=st.integers(4, 20), keep=st.floats(0.05, 1.0), b=st.integers(1, 3), seed=st.integers(0, 1000))
def test_select_tokens_keeps_protected_sorted_and_static(n, keep, b, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.rand(b, n, generator=g)
    lengths = torch.randint(2, n + 1, (b,), generator=g)
    valid = torch.arange(n).view(1, -1) < lengths.view(-1, 1)
    protected = torch.zeros(b, n, dtype=torch.bool)
    protected[:, 0] = True
    protected[torch.arange(b), lengths - 1] = True  # [SEP] at the end of each row
    idx, kept = alg.select_tokens(scores, keep, protected, valid)
    k_static = 2 + alg.keep_count(n - 2, keep)
    assert idx.shape == (b, k_static) and alg.pruned_length(n, keep, num_protected=2) == k_static
    assert torch.all(idx[:, 1:] > idx[:, :-1]), "indices must be sorted and unique"
    for r in range(b):
        chosen = set(idx[r][kept[r]].tolist())
        assert {0, int(lengths[r]) - 1} <= chosen, "protected tokens must survive"
        real_cand = int(lengths[r]) - 2
        assert len(chosen) == 2 + math.ceil(keep * real_cand - 1e-9) if real_cand else len(chosen) == 2
        assert all(valid[r, i] for i in chosen), "padding is never marked as a kept real token"
        # the kept candidates are the best-scoring real candidates of this row
        cand = [i for i in range(1, int(lengths[r]) - 1)]
        best = sorted(cand, key=lambda i: -scores[r, i].item())[: len(chosen) - 2]
        assert set(best) <= chosen


def test_tome_merge_r0_identity_and_size_weighted_mean():
    x = torch.randn(2, 9, 6)
    size = torch.ones(2, 9)
    out, s, src = alg.tome_merge(x, size, x, 0)
    assert torch.equal(out, x) and torch.equal(s, size)
    protected = torch.zeros(2, 9, dtype=torch.bool)
    protected[:, 0] = True
    size = torch.tensor([[1., 2, 1, 3, 1, 1, 2, 1, 1]] * 2)
    out, s, src = alg.tome_merge(x, size, x, 3, protected=protected)
    assert out.shape == (2, 6, 6) and s.shape == (2, 6)
    torch.testing.assert_close(s.sum(1), size.sum(1))
    assert torch.equal(out[:, 0], x[:, 0]) and torch.all(src[:, 0] == 0), "[CLS] stays first and untouched"
    for r in range(2):
        for j in range(6):
            members = (src[r] == j).nonzero().flatten()
            w = size[r, members]
            expect = (x[r, members] * w[:, None]).sum(0) / w.sum()
            torch.testing.assert_close(out[r, j], expect, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(s[r, j], w.sum())


def test_tome_merge_padding_never_pollutes_real_tokens():
    torch.manual_seed(0)
    x = torch.randn(1, 10, 4)
    size_full = torch.ones(1, 10)
    out_alone, s_alone, _ = alg.tome_merge(x[:, :6], size_full[:, :6], x[:, :6], 2)
    size_pad = size_full.clone()
    size_pad[:, 6:] = 0
    out_pad, s_pad, _ = alg.tome_merge(x, size_pad, x, 2)
    real = s_pad[0] > 0
    torch.testing.assert_close(out_pad[0, real], out_alone[0])
    torch.testing.assert_close(s_pad[0, real], s_alone[0])
    assert torch.isneginf(alg.proportional_attention_bias(s_pad)[0, 0, 0, ~real]).all()


def test_tome_merge_rejects_too_large_r():
    with pytest.raises(alg.PruningError, match="too large"):
        alg.tome_merge(torch.randn(1, 6, 2), torch.ones(1, 6), torch.randn(1, 6, 2), 4)


def test_stable_order_descending_is_a_stable_sort_and_source_map_interleaves():
    """The ONNX-friendly ranking ToMe uses equals torch's stable sort, ties and -inf included; the source map of an
    odd-length merge points every token at the output slot holding it."""
    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (3, 25), generator=g).float()
    x[0, 3], x[1, :5] = float("-inf"), float("-inf")
    assert torch.equal(alg.stable_order_descending(x), torch.sort(x, dim=1, descending=True, stable=True).indices)
    h = torch.randn(2, 7, 3, generator=g)
    prot = torch.zeros(2, 7, dtype=torch.bool)
    prot[:, 0] = True
    out, size, src = alg.tome_merge(h, torch.ones(2, 7), h, 2, protected=prot, num_protected_a=1)
    assert src.shape == (2, 7) and torch.equal(size.sum(1), torch.full((2,), 7.0))
    for row in range(2):
        for j in range(5):
            torch.testing.assert_close(out[row, j], h[row, src[row] == j].mean(0))


def test_dct_compress_identity_constant_and_low_pass():
    x = torch.randn(2, 49, 5)
    assert torch.equal(alg.dct_compress(x, (7, 7), 1.0), x)
    d = alg.dct_matrix(7)
    torch.testing.assert_close(d @ d.T, torch.eye(7), atol=1e-6, rtol=0)
    const = torch.full((1, 49, 3), 2.5)
    small = alg.dct_compress(const, (7, 7), 0.25)
    assert small.shape == (1, 16, 3)
    torch.testing.assert_close(small, torch.full_like(small, 2.5), atol=1e-5, rtol=0)
    # a pure high-frequency DCT basis image vanishes; a low-frequency one keeps its energy
    d8 = alg.dct_matrix(8)
    high = torch.outer(d8[5], d8[6]).reshape(1, 64, 1)
    assert alg.dct_compress(high, (8, 8), 0.25).abs().max() < 1e-6
    low = torch.outer(d8[1], d8[0]).reshape(1, 64, 1)
    small = alg.dct_compress(low, (8, 8), 0.25)
    assert small.norm().item() == pytest.approx(low.norm().item() * math.sqrt(16 / 64), rel=1e-5)


def test_block_influence_and_kl():
    h = torch.randn(2, 5, 8)
    assert alg.block_influence(h, h).item() == pytest.approx(0.0, abs=1e-6)
    assert alg.block_influence(h, -h).item() == pytest.approx(2.0, abs=1e-6)
    logits = torch.randn(4, 10)
    assert alg.kl_divergence(logits, logits).item() == pytest.approx(0.0, abs=1e-7)
    p = torch.tensor([[0.0, math.log(3.0)]])
    q = torch.zeros(1, 2)
    expect = 0.25 * math.log(0.25 / 0.5) + 0.75 * math.log(0.75 / 0.5)
    assert alg.kl_divergence(p, q).item() == pytest.approx(expect, rel=1e-5)


@pytest.mark.parametrize("keep", [0.0, -0.1, 1.5, float("nan")])
def test_bad_keep_ratio_message(keep):
    with pytest.raises(alg.PruningError, match=r"outside \(0, 1\]"):
        alg.select_tokens(torch.rand(1, 5), keep)


def test_bad_layer_index_message():
    with pytest.raises(alg.PruningError, match="out of range: the model has 6 layers, use 0..5"):
        alg.check_layer_index(6, 6)
