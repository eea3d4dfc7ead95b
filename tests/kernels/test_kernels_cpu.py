"""The fast CPU implementations (SDPA / F.rms_norm / F.layer_norm based) against the references.

Tolerances: float32 atol = rtol = 1e-5; float16 atol = rtol = 5e-3 (fp16 output rounding; the
stock kernels may round intermediates to fp16 where the reference keeps fp32).
"""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from elision.kernels import cpu, reference

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=5e-3, rtol=5e-3)}
SOME = settings(max_examples=25, deadline=None, derandomize=True)


@SOME
@given(
    dtype=st.sampled_from([torch.float32, torch.float16]),
    batch=st.integers(1, 3),
    kv_heads=st.integers(1, 3),
    group=st.sampled_from([1, 2, 4]),
    q_len=st.integers(1, 24),
    extra_kv=st.integers(0, 40),
    head_dim=st.sampled_from([8, 24, 64]),
    mask=st.sampled_from(["none", "random", "causal", "causal+random", "rows-masked"]),
    bias_heads=st.booleans(),
    scale=st.sampled_from([None, 0.2]),
    seed=st.integers(0, 2**16),
)
def test_cpu_attention_matches_reference(dtype, batch, kv_heads, group, q_len, extra_kv, head_dim, mask, bias_heads, scale, seed):
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    kv_len = q_len + extra_kv
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dtype)
    bias = None
    if mask != "none" and mask != "causal":
        bias = torch.randn(1, heads if bias_heads else 1, q_len, kv_len, generator=gen)
        bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.3, float("-inf"))
        if mask == "rows-masked":
            bias[:, :, ::2] = float("-inf")  # whole query rows masked -> zeros
        bias = bias.to(dtype)
    causal = "causal" in mask
    out = cpu.attention(q, k, v, bias, scale, causal)
    expected = reference.attention(q, k, v, bias, scale, causal)
    assert out.dtype == expected.dtype and not torch.isnan(out).any()
    torch.testing.assert_close(out.float(), expected.float(), **TOL[dtype])


@SOME
@given(
    dtype=st.sampled_from([torch.float32, torch.float16]),
    rows=st.integers(1, 20),
    cols=st.integers(1, 200),
    with_weight=st.booleans(),
    with_bias=st.booleans(),
    mixed_weight_dtype=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_cpu_norms_match_reference(dtype, rows, cols, with_weight, with_bias, mixed_weight_dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, cols, generator=gen).to(dtype)
    residual = torch.randn(rows, cols, generator=gen).to(dtype)
    param_dtype = torch.float32 if mixed_weight_dtype else dtype
    weight = torch.randn(cols, generator=gen).to(param_dtype) if with_weight else None
    bias = torch.randn(cols, generator=gen).to(param_dtype) if with_bias else None
    tol = TOL[dtype]
    torch.testing.assert_close(cpu.rms_norm(x, weight, 1e-6).float(), reference.rms_norm(x, weight, 1e-6).float(), **tol)
    torch.testing.assert_close(
        cpu.layer_norm(x, weight, bias, 1e-5).float(), reference.layer_norm(x, weight, bias, 1e-5).float(), **tol
    )
    out, summed = cpu.add_rms_norm(x, residual, weight, 1e-6)
    ref_out, ref_sum = reference.add_rms_norm(x, residual, weight, 1e-6)
    assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)
    out, summed = cpu.add_layer_norm(x, residual, weight, bias, 1e-5)
    ref_out, ref_sum = reference.add_layer_norm(x, residual, weight, bias, 1e-5)
    assert torch.equal(summed, ref_sum)
    torch.testing.assert_close(out.float(), ref_out.float(), **tol)


def test_reference_attention_equals_sdpa_on_plain_inputs():
    """Anchor the reference itself to PyTorch: no mask, top-left causal with Lq == Lk, float mask."""
    q, k, v = torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16), torch.randn(2, 4, 9, 16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    torch.testing.assert_close(reference.attention(q, k, v), sdpa(q, k, v), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference.attention(q, k, v, None, None, True), sdpa(q, k, v, is_causal=True), atol=1e-5, rtol=1e-5)
    bias = torch.randn(1, 1, 9, 9)
    torch.testing.assert_close(reference.attention(q, k, v, bias), sdpa(q, k, v, attn_mask=bias), atol=1e-5, rtol=1e-5)
