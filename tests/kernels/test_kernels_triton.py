"""Every Triton kernel against its torch reference: under TRITON_INTERPRET=1 on CPU (CI), or compiled on a
CUDA GPU when run there with TRITON_INTERPRET=0 (same tests, inputs moved to the GPU, references on CPU).

Shapes are drawn by hypothesis (few examples under the interpreter: it is slow) and deliberately include
ragged, non-power-of-two and multi-tile sizes.  Tolerances (absolute and relative, both):
float32 1e-5 (kernels and references both accumulate in fp32 with IEEE dots; only summation order differs);
float16 5e-3 (one fp16 rounding of the output, values of magnitude up to ~4, i.e. ~1-2 ulp);
bfloat16 (GPU only: the interpreter has no bf16) 3e-2, one bf16 rounding.  Index outputs must match exactly.
"""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

# tests/conftest.py sets TRITON_INTERPRET=1 before triton is imported; on a GPU machine run with
# TRITON_INTERPRET=0 and the kernels are compiled and run on CUDA.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRET else "cuda"
pytestmark = pytest.mark.skipif(
    not INTERPRET and not torch.cuda.is_available(),
    reason="needs TRITON_INTERPRET=1 (CPU interpreter) or a CUDA GPU",
)

from elision.kernels import reference  # noqa: E402
from elision.kernels import triton_attention, triton_norm  # noqa: E402

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=5e-3, rtol=5e-3),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}
DTYPES = st.sampled_from([torch.float32, torch.float16] + ([] if INTERPRET else [torch.bfloat16]))
FEW = settings(max_examples=6 if INTERPRET else 25, deadline=None, derandomize=True)


def _d(t: torch.Tensor | None) -> torch.Tensor | None:
    """Input for the kernel: on the GPU when the tests run compiled (references keep the CPU copy)."""
    return None if t is None else t.to(DEVICE)


def _close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype) -> None:
    actual = actual.cpu()
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    torch.testing.assert_close(actual.float(), expected.float(), **TOL[dtype])


def _tree_bias(q_len: int, kv_len: int, gen: torch.Generator) -> torch.Tensor:
    """A speculative-decoding style mask: whole prefix visible, each tree node sees its ancestors."""
    prefix = kv_len - q_len
    parents = [-1] + [int(torch.randint(0, i, (1,), generator=gen)) for i in range(1, q_len)]
    bias = torch.full((q_len, kv_len), float("-inf"))
    bias[:, :prefix] = 0.0
    for node in range(q_len):
        cur = node
        while cur >= 0:
            bias[node, prefix + cur] = 0.0
            cur = parents[cur]
    return bias


@FEW
@given(
    dtype=DTYPES,
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 3]),
    q_len=st.integers(1, 20),
    extra_kv=st.integers(0, 70),
    head_dim=st.sampled_from([8, 12, 16, 24]),
    mask=st.sampled_from(["none", "random", "tree", "causal", "causal+random"]),
    seed=st.integers(0, 2**16),
)
def test_attention_kernel_matches_reference(dtype, batch, kv_heads, group, q_len, extra_kv, head_dim, mask, seed):
    gen = torch.Generator().manual_seed(seed)
    q_heads = kv_heads * group
    kv_len = q_len + extra_kv
    q = torch.randn(batch, q_heads, q_len, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dtype)
    bias = None
    if "random" in mask:
        bias = torch.randn(batch, 1, q_len, kv_len, generator=gen)
        bias = bias.masked_fill(torch.rand(bias.shape, generator=gen) < 0.3, float("-inf")).to(dtype)
    elif mask == "tree":
        bias = _tree_bias(q_len, kv_len, gen)[None, None].expand(1, q_heads, q_len, kv_len).to(dtype)
    causal = "causal" in mask
    out = triton_attention.attention(_d(q), _d(k), _d(v), _d(bias), None, causal)
    _close(out, reference.attention(q, k, v, bias, None, causal), dtype)


def test_attention_kernel_fully_masked_rows_give_zeros():
    q, k, v = torch.randn(1, 2, 4, 16), torch.randn(1, 2, 6, 16), torch.randn(1, 2, 6, 16)
    bias = torch.zeros(1, 1, 4, 6)
    bias[:, :, 1] = float("-inf")
    out = triton_attention.attention(_d(q), _d(k), _d(v), _d(bias), 0.5, False).cpu()
    assert torch.all(out[:, :, 1] == 0)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, reference.attention(q, k, v, bias, 0.5, False), atol=1e-5, rtol=1e-5)


def test_attention_kernel_tree_mask_equals_sequential_attention_on_a_chain():
    """A chain-shaped tree (every node's parent is the previous node) is plain causal attention."""
    q, k, v = torch.randn(2, 4, 5, 16), torch.randn(2, 2, 12, 16), torch.randn(2, 2, 12, 16)
    prefix = 12 - 5
    bias = torch.full((5, 12), float("-inf"))
    bias[:, :prefix] = 0
    for i in range(5):
        bias[i, prefix : prefix + i + 1] = 0
    tree = triton_attention.attention(_d(q), _d(k), _d(v), _d(bias[None, None]), None, False)
    causal = triton_attention.attention(_d(q), _d(k), _d(v), None, None, True)
    torch.testing.assert_close(tree, causal, atol=1e-6, rtol=1e-6)


def test_attention_kernel_reads_strided_inputs():
    """Non-contiguous q/k/v (e.g. a transposed [B,L,H,D] projection) are read through strides."""
    q = torch.randn(2, 7, 4, 16).transpose(1, 2)
    k = torch.randn(2, 9, 2, 16).transpose(1, 2)
    v = torch.randn(2, 9, 2, 16).transpose(1, 2)
    out = triton_attention.attention(_d(q), _d(k), _d(v), None, None, True).cpu()
    torch.testing.assert_close(out, reference.attention(q, k, v, None, None, True), atol=1e-5, rtol=1e-5)


@FEW
@given(
    dtype=DTYPES,
    rows=st.lists(st.integers(1, 5), min_size=1, max_size=3),
    cols=st.integers(1, 300),
    with_weight=st.booleans(),
    with_bias=st.booleans(),
    with_residual=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_norm_kernels_match_reference(dtype, rows, cols, with_weight, with_bias, with_residual, seed):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(*rows, cols, generator=gen).to(dtype)
    residual = torch.randn(*rows, cols, generator=gen).to(dtype) if with_residual else None
    weight = torch.randn(cols, generator=gen).to(dtype) if with_weight else None
    bias = torch.randn(cols, generator=gen).to(dtype) if with_bias else None

    out, summed = triton_norm.rms_norm(_d(x), _d(weight), 1e-6, _d(residual))
    summed = None if summed is None else summed.cpu()
    if residual is None:
        _close(out, reference.rms_norm(x, weight, 1e-6), dtype)
        assert summed is None
    else:
        ref_out, ref_sum = reference.add_rms_norm(x, residual, weight, 1e-6)
        _close(out, ref_out, dtype)
        assert torch.equal(summed, ref_sum)  # the add happens in the input dtype, exactly like eager

    out, summed = triton_norm.layer_norm(_d(x), _d(weight), _d(bias), 1e-5, _d(residual))
    summed = None if summed is None else summed.cpu()
    if residual is None:
        _close(out, reference.layer_norm(x, weight, bias, 1e-5), dtype)
    else:
        ref_out, ref_sum = reference.add_layer_norm(x, residual, weight, bias, 1e-5)
        _close(out, ref_out, dtype)
        assert torch.equal(summed, ref_sum)


def test_norm_kernels_match_torch_modules():
    """The references themselves agree with torch.nn.LayerNorm / torch.nn.RMSNorm."""
    x = torch.randn(3, 7, 48)
    ln = torch.nn.LayerNorm(48)
    torch.nn.init.normal_(ln.weight)
    torch.nn.init.normal_(ln.bias)
    rms = torch.nn.RMSNorm(48, eps=1e-6)
    torch.nn.init.normal_(rms.weight)
    with torch.no_grad():
        torch.testing.assert_close(triton_norm.layer_norm(_d(x), _d(ln.weight), _d(ln.bias), 1e-5)[0].cpu(), ln(x),
                                   atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(triton_norm.rms_norm(_d(x), _d(rms.weight), 1e-6)[0].cpu(), rms(x), atol=1e-5, rtol=1e-5)


@FEW
@given(
    dtype=DTYPES,
    batch=st.integers(1, 2),
    kv_heads=st.integers(1, 2),
    group=st.sampled_from([1, 2]),
    n_queries=st.integers(1, 33),
    block=st.integers(3, 20),
    n_latents=st.integers(1, 80),
    topk=st.integers(1, 24),
    per_head=st.booleans(),
    head_dim=st.sampled_from([8, 16, 20]),
    seed=st.integers(0, 2**16),
)
def test_sparse_cross_attention_kernel_matches_reference(
    dtype, batch, kv_heads, group, n_queries, block, n_latents, topk, per_head, head_dim, seed
):
    gen = torch.Generator().manual_seed(seed)
    heads = kv_heads * group
    nblocks = -(-n_queries // block)
    q = torch.randn(batch, heads, n_queries, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, kv_heads, n_latents, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, kv_heads, n_latents, head_dim, generator=gen).to(dtype)
    index_shape = (batch, heads, nblocks, topk) if per_head else (batch, nblocks, topk)
    # -1 marks unused slots: ragged per-block lists, sometimes a block with no keys at all.
    index = torch.randint(-1, n_latents, index_shape, generator=gen)
    out = triton_attention.sparse_cross_attention(_d(q), _d(k), _d(v), _d(index), block, None)
    _close(out, reference.sparse_cross_attention(q, k, v, index, block, None), dtype)


def test_sparse_cross_attention_with_all_latents_equals_dense_attention():
    q, k, v = torch.randn(1, 2, 21, 16), torch.randn(1, 2, 30, 16), torch.randn(1, 2, 30, 16)
    index = torch.arange(30).expand(1, 3, 30)  # every block lists every latent
    dense = reference.attention(q, k, v)
    sparse = triton_attention.sparse_cross_attention(_d(q), _d(k), _d(v), _d(index), 8, None).cpu()
    torch.testing.assert_close(sparse, dense, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reference.sparse_cross_attention(q, k, v, index, 8, None), dense, atol=1e-5, rtol=1e-5)
