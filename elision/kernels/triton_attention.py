"""Triton attention kernels: masked attention over a KV cache, and block-sparse cross-attention.

Both are flash-attention style forward kernels (online softmax over key tiles, fp32 accumulators):

* :func:`attention` — every query attends to all ``Lk`` keys with an arbitrary additive bias
  ``[B|1, 1|Hq, Lq, Lk]`` (a tree mask for speculative decoding is a bias of 0 / -inf), optional
  bottom-right causal masking and grouped-query heads.  Broadcast bias dims are read with stride 0.
* :func:`sparse_cross_attention` — query block ``i`` (``block_size`` consecutive queries) attends
  only to the KV rows listed in ``block_index[b, (h,) i, :]``; the rows are gathered inside the
  kernel, so no ``[B, H, nblocks, topk, D]`` copy of K/V is ever materialised (VecSet adaptive KV
  selection).  Slots holding -1 are skipped, which lets blocks have ragged index lists.

Semantics match :mod:`elision.kernels.reference` exactly (fully masked rows give zeros).  Every
tile load is masked, so sequence lengths and head dims need not be powers of two.  The launchers
go through ``torch.library.wrap_triton`` so ``triton_op`` bodies that call them stay traceable.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from elision.kernels._launch import block_size, dot_precision, next_pow2

__all__ = ["attention", "sparse_cross_attention"]


@triton.jit
def _online_softmax_step(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """Fold one [BLOCK_M, BLOCK_N] tile of logits (masked entries = -inf) into the running state."""
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen only masked keys keeps m = -inf; shift by 0 so exp() gives 0, not NaN.
    m_shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp(s - m_shift[:, None])
    alpha = tl.exp(m_i - m_shift)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION, out_dtype=tl.float32)
    return m_new, l_i, acc


@triton.jit
def _attention_kernel(
    Q, K, V, Bias, Out,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_bb, stride_bh, stride_bm, stride_bn,
    stride_ob, stride_oh, stride_om, stride_od,
    num_q_heads, q_len, kv_len, head_dim, group_size, causal_offset,
    HAS_BIAS: tl.constexpr, IS_CAUSAL: tl.constexpr, PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_q_heads
    h = pid_bh % num_q_heads
    h_kv = h // group_size

    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    dims = tl.arange(0, BLOCK_D)
    row_ok = rows < q_len
    dim_ok = dims < head_dim

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    kv_end = kv_len
    if IS_CAUSAL:
        # Bottom-right alignment: query row r sees keys <= r + (Lk - Lq); later tiles are all masked.
        kv_end = tl.minimum(kv_len, (pid_m + 1) * BLOCK_M + causal_offset)
    for start_n in range(0, kv_end, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N)
        col_ok = cols < kv_len
        k = tl.load(
            K + b * stride_kb + h_kv * stride_kh + cols[None, :] * stride_kn + dims[:, None] * stride_kd,
            mask=col_ok[None, :] & dim_ok[:, None], other=0.0,
        )
        # .to(fp32): torch.compile (inductor) passes Python floats as fp64, which would make the softmax state
        # fp64 (a loop-carried type change Triton rejects)
        s = (tl.dot(q, k, input_precision=PRECISION, out_dtype=tl.float32) * sm_scale).to(tl.float32)
        if HAS_BIAS:
            bias = tl.load(
                Bias + b * stride_bb + h * stride_bh + rows[:, None] * stride_bm + cols[None, :] * stride_bn,
                mask=row_ok[:, None] & col_ok[None, :], other=0.0,
            )
            s += bias.to(tl.float32)
        keep = col_ok[None, :] & row_ok[:, None]
        if IS_CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + causal_offset)
        s = tl.where(keep, s, float("-inf"))
        v = tl.load(
            V + b * stride_vb + h_kv * stride_vh + cols[:, None] * stride_vn + dims[None, :] * stride_vd,
            mask=col_ok[:, None] & dim_ok[None, :], other=0.0,
        )
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Launch the masked-attention kernel. Shapes as in ``reference.attention`` (validated by the caller)."""
    batch, q_heads, q_len, head_dim = q.shape
    kv_heads, kv_len = k.shape[1], k.shape[2]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if bias is not None:
        bias_view = bias.expand(batch, q_heads, q_len, kv_len)  # stride 0 on broadcast dims
        bias_strides = bias_view.stride()
    else:
        bias_view, bias_strides = q, (0, 0, 0, 0)  # never read: HAS_BIAS=False
    block_m = block_size(q_len, 16, 64)
    block_n = block_size(kv_len, 16, 64)
    grid = (triton.cdiv(q_len, block_m), batch * q_heads)
    wrap_triton(_attention_kernel)[grid](
        q, k, v, bias_view, out,
        sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *bias_strides, *out.stride(),
        q_heads, q_len, kv_len, head_dim, q_heads // kv_heads, kv_len - q_len,
        HAS_BIAS=bias is not None, IS_CAUSAL=bool(is_causal), PRECISION=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=max(16, next_pow2(head_dim)),
    )
    return out


@triton.jit
def _sparse_cross_attention_kernel(
    Q, K, V, Index, Out,
    sm_scale,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ib, stride_ih, stride_iblk, stride_ik,
    stride_ob, stride_oh, stride_om, stride_od,
    num_heads, q_len, head_dim, group_size, block_len, topk, tiles_per_block,
    PRECISION: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_bh = tl.program_id(1)
    blk = pid // tiles_per_block
    tile = pid % tiles_per_block
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    h_kv = h // group_size

    local = tile * BLOCK_M + tl.arange(0, BLOCK_M)  # position inside the query block
    rows = blk * block_len + local
    row_ok = (local < block_len) & (rows < q_len)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim

    q = tl.load(
        Q + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + dims[None, :] * stride_qd,
        mask=row_ok[:, None] & dim_ok[None, :], other=0.0,
    )
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    index_base = Index + b * stride_ib + h * stride_ih + blk * stride_iblk

    for start in range(0, topk, BLOCK_N):
        slots = start + tl.arange(0, BLOCK_N)
        kv_rows = tl.load(index_base + slots * stride_ik, mask=slots < topk, other=-1).to(tl.int64)
        slot_ok = kv_rows >= 0
        kv_rows = tl.where(slot_ok, kv_rows, 0)
        k = tl.load(
            K + b * stride_kb + h_kv * stride_kh + kv_rows[None, :] * stride_kn + dims[:, None] * stride_kd,
            mask=slot_ok[None, :] & dim_ok[:, None], other=0.0,
        )
        # .to(fp32): torch.compile (inductor) passes Python floats as fp64, which would make the softmax state
        # fp64 (a loop-carried type change Triton rejects)
        s = (tl.dot(q, k, input_precision=PRECISION, out_dtype=tl.float32) * sm_scale).to(tl.float32)
        s = tl.where(slot_ok[None, :] & row_ok[:, None], s, float("-inf"))
        v = tl.load(
            V + b * stride_vb + h_kv * stride_vh + kv_rows[:, None] * stride_vn + dims[None, :] * stride_vd,
            mask=slot_ok[:, None] & dim_ok[None, :], other=0.0,
        )
        m_i, l_i, acc = _online_softmax_step(s, v, m_i, l_i, acc, PRECISION)

    out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
    tl.store(
        Out + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + dims[None, :] * stride_od,
        out.to(Out.dtype.element_ty),
        mask=row_ok[:, None] & dim_ok[None, :],
    )


def sparse_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_size_q: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Launch the block-sparse cross-attention kernel (shapes as in ``reference.sparse_cross_attention``)."""
    batch, heads, q_len, head_dim = q.shape
    nblocks, topk = block_index.shape[-2], block_index.shape[-1]
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if block_index.dim() == 3:
        index_strides = (block_index.stride(0), 0, block_index.stride(1), block_index.stride(2))
    else:
        index_strides = block_index.stride()
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    block_m = block_size(block_size_q, 16, 64)
    tiles_per_block = triton.cdiv(block_size_q, block_m)
    grid = (nblocks * tiles_per_block, batch * heads)
    wrap_triton(_sparse_cross_attention_kernel)[grid](
        q, k, v, block_index, out,
        sm_scale,
        *q.stride(), *k.stride(), *v.stride(), *index_strides, *out.stride(),
        heads, q_len, head_dim, heads // k.shape[1], block_size_q, topk, tiles_per_block,
        PRECISION=dot_precision(q.dtype),
        BLOCK_M=block_m, BLOCK_N=block_size(topk, 16, 64), BLOCK_D=max(16, next_pow2(head_dim)),
    )
    return out
