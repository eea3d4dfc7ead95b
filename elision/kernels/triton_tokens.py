"""Triton token-selection kernels: gather selected tokens, and score + top-k + gather for pruning.

:func:`gather_tokens` copies ``x[b, idx[b, i], :]`` into ``out[b, i, :]`` tile by tile.

:func:`score_topk_gather` prunes tokens without a sort and without materialising attention maps,
in three launches that never leave the GPU:

1. ``_token_scores_kernel`` — per batch row, the softmax attention of one query row over all keys,
   per head (two passes over the keys: running max/sum, then normalised probabilities), summed
   into a float32 ``[B, L]`` buffer and divided by the head count, plus an optional ``score_bias``.
2. ``_rank_kernel`` — token ``j`` is kept iff fewer than ``keep`` tokens outrank it, where ``i``
   outranks ``j`` when ``s_i > s_j`` or ``s_i == s_j and i < j`` (a strict total order, so exactly
   ``keep`` tokens survive; ties go to the lower index like a stable descending sort).
3. ``_compact_gather_kernel`` — kept token ``j`` goes to slot ``#kept tokens before j`` (a prefix
   count), which yields the kept indices already in ascending order, and its row of ``x`` is copied.

NaN scores break the order (the selection is then unspecified, but stores stay in bounds).
The rank step compares all pairs (O(L^2) comparisons per batch row, in tiles); that is cheap for
the few hundred to few thousand tokens pruning is applied to and avoids a data-dependent sort.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from elision.kernels._launch import block_size, next_pow2

__all__ = ["gather_tokens", "token_scores", "score_topk_gather"]


@triton.jit
def _gather_kernel(
    X, Idx, Out,
    stride_xb, stride_xl, stride_xc, stride_ib, stride_ik, stride_ob, stride_ok, stride_oc,
    n_kept, n_channels,
    BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    slots = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    chans = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    slot_ok = slots < n_kept
    mask = slot_ok[:, None] & (chans < n_channels)[None, :]
    tokens = tl.load(Idx + b * stride_ib + slots * stride_ik, mask=slot_ok, other=0).to(tl.int64)
    rows = tl.load(X + b * stride_xb + tokens[:, None] * stride_xl + chans[None, :] * stride_xc, mask=mask, other=0.0)
    tl.store(Out + b * stride_ob + slots[:, None] * stride_ok + chans[None, :] * stride_oc, rows, mask=mask)


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """out[b, i, :] = x[b, idx[b, i], :] for x [B,L,C], idx [B,K] (indices assumed in range)."""
    batch, n_channels = x.shape[0], x.shape[2]
    n_kept = idx.shape[1]
    out = x.new_empty((batch, n_kept, n_channels))
    block_c = block_size(n_channels, 1, 256)
    block_k = max(1, min(block_size(n_kept, 1, 64), 4096 // block_c))
    grid = (batch, triton.cdiv(n_kept, block_k), triton.cdiv(n_channels, block_c))
    wrap_triton(_gather_kernel)[grid](
        x, idx, out, *x.stride(), *idx.stride(), *out.stride(), n_kept, n_channels,
        BLOCK_K=block_k, BLOCK_C=block_c,
    )
    return out


@triton.jit
def _token_scores_kernel(
    Q, K, ScoreBias, Scores,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kh, stride_kl, stride_kd,
    stride_sbb, stride_sbl,
    n_heads, group_size, n_tokens, head_dim, sm_scale,
    HAS_BIAS: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr,
):
    b = tl.program_id(0)
    dims = tl.arange(0, BLOCK_D)
    dim_ok = dims < head_dim
    score_row = Scores + b * n_tokens
    for start in range(0, n_tokens, BLOCK_L):
        toks = start + tl.arange(0, BLOCK_L)
        tl.store(score_row + toks, tl.zeros([BLOCK_L], dtype=tl.float32), mask=toks < n_tokens)
    for h in range(0, n_heads):
        q = tl.load(Q + b * stride_qb + h * stride_qh + dims * stride_qd, mask=dim_ok, other=0.0).to(tl.float32)
        k_head = K + b * stride_kb + (h // group_size) * stride_kh
        # Pass 1: running max and sum of exp over all keys for this head.
        m = tl.full([1], float("-inf"), dtype=tl.float32)
        total = tl.zeros([1], dtype=tl.float32)
        for start in range(0, n_tokens, BLOCK_L):
            toks = start + tl.arange(0, BLOCK_L)
            tok_ok = toks < n_tokens
            k = tl.load(k_head + toks[:, None] * stride_kl + dims[None, :] * stride_kd,
                        mask=tok_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            # .to(fp32): under torch.compile sm_scale arrives as fp64
            logits = tl.where(tok_ok, (tl.sum(k * q[None, :], 1) * sm_scale).to(tl.float32), float("-inf"))
            m_new = tl.maximum(m, tl.max(logits, 0))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(logits - m_new), 0)
            m = m_new
        # Pass 2: normalised probabilities, accumulated over heads (this program owns the row).
        for start in range(0, n_tokens, BLOCK_L):
            toks = start + tl.arange(0, BLOCK_L)
            tok_ok = toks < n_tokens
            k = tl.load(k_head + toks[:, None] * stride_kl + dims[None, :] * stride_kd,
                        mask=tok_ok[:, None] & dim_ok[None, :], other=0.0).to(tl.float32)
            logits = (tl.sum(k * q[None, :], 1) * sm_scale).to(tl.float32)
            probs = tl.exp(logits - m) / total
            acc = tl.load(score_row + toks, mask=tok_ok, other=0.0)
            tl.store(score_row + toks, acc + probs, mask=tok_ok)
    for start in range(0, n_tokens, BLOCK_L):
        toks = start + tl.arange(0, BLOCK_L)
        tok_ok = toks < n_tokens
        s = tl.load(score_row + toks, mask=tok_ok, other=0.0) / n_heads
        if HAS_BIAS:
            s += tl.load(ScoreBias + b * stride_sbb + toks * stride_sbl, mask=tok_ok, other=0.0).to(tl.float32)
        tl.store(score_row + toks, s, mask=tok_ok)


@triton.jit
def _rank_kernel(
    Scores, Keep, n_tokens, n_keep,
    BLOCK_J: tl.constexpr, BLOCK_I: tl.constexpr,
):
    b = tl.program_id(0)
    js = tl.program_id(1) * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < n_tokens
    s_j = tl.load(Scores + b * n_tokens + js, mask=j_ok, other=0.0)
    rank = tl.zeros([BLOCK_J], dtype=tl.int32)
    for start in range(0, n_tokens, BLOCK_I):
        is_ = start + tl.arange(0, BLOCK_I)
        i_ok = is_ < n_tokens
        s_i = tl.load(Scores + b * n_tokens + is_, mask=i_ok, other=0.0)
        beats = (s_i[:, None] > s_j[None, :]) | ((s_i[:, None] == s_j[None, :]) & (is_[:, None] < js[None, :]))
        beats = beats & i_ok[:, None]
        rank += tl.sum(beats.to(tl.int32), 0)
    tl.store(Keep + b * n_tokens + js, (rank < n_keep).to(tl.int32), mask=j_ok)


@triton.jit
def _compact_gather_kernel(
    Keep, X, OutIdx, Out,
    stride_xb, stride_xl, stride_xc, stride_ob, stride_ok, stride_oc,
    n_tokens, n_keep, n_channels,
    BLOCK_J: tl.constexpr, BLOCK_C: tl.constexpr,
):
    b = tl.program_id(0)
    chunk = tl.program_id(1)
    keep_row = Keep + b * n_tokens
    before = tl.zeros([BLOCK_J], dtype=tl.int32)  # kept tokens in earlier chunks (broadcast count)
    for start in range(0, chunk * BLOCK_J, BLOCK_J):
        earlier = start + tl.arange(0, BLOCK_J)
        before += tl.sum(tl.load(keep_row + earlier, mask=earlier < n_tokens, other=0), 0)
    js = chunk * BLOCK_J + tl.arange(0, BLOCK_J)
    j_ok = js < n_tokens
    kept = tl.load(keep_row + js, mask=j_ok, other=0)
    slot = before + tl.cumsum(kept, 0) - 1
    # The slot bound only matters for NaN scores (which break the total order); it keeps every
    # store inside the [B, keep] outputs no matter what the scores are.
    is_kept = (kept > 0) & j_ok & (slot < n_keep)
    tl.store(OutIdx + b * n_keep + slot, js.to(tl.int64), mask=is_kept)
    for c0 in range(0, n_channels, BLOCK_C):
        chans = c0 + tl.arange(0, BLOCK_C)
        mask = is_kept[:, None] & (chans < n_channels)[None, :]
        rows = tl.load(X + b * stride_xb + js[:, None].to(tl.int64) * stride_xl + chans[None, :] * stride_xc,
                       mask=mask, other=0.0)
        tl.store(Out + b * stride_ob + slot[:, None] * stride_ok + chans[None, :] * stride_oc, rows, mask=mask)


def token_scores(
    q_row: torch.Tensor,
    k: torch.Tensor,
    scale: float | None = None,
    score_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Head-averaged attention of one query row over all keys: q_row [B,H,D], k [B,Hkv,L,D] -> fp32 [B,L]."""
    batch, heads, head_dim = q_row.shape
    n_tokens = k.shape[2]
    scores = torch.empty((batch, n_tokens), device=q_row.device, dtype=torch.float32)
    sm_scale = scale if scale is not None else 1.0 / math.sqrt(head_dim)
    if score_bias is not None:
        bias_view = score_bias.expand(batch, n_tokens)
        bias_strides = bias_view.stride()
    else:
        bias_view, bias_strides = scores, (0, 0)
    wrap_triton(_token_scores_kernel)[(batch,)](
        q_row, k, bias_view, scores,
        *q_row.stride(), *k.stride(), *bias_strides,
        heads, heads // k.shape[1], n_tokens, head_dim, sm_scale,
        HAS_BIAS=score_bias is not None,
        BLOCK_L=block_size(n_tokens, 16, 128), BLOCK_D=next_pow2(head_dim),
    )
    return scores


def score_topk_gather(
    q_row: torch.Tensor,
    k: torch.Tensor,
    x: torch.Tensor,
    keep: int,
    scale: float | None = None,
    score_bias: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the ``keep`` highest-scoring tokens of x [B,L,C] in original order; returns (x_kept, idx)."""
    batch, n_tokens, n_channels = x.shape
    scores = token_scores(q_row, k, scale, score_bias)
    keep_mask = torch.empty((batch, n_tokens), device=x.device, dtype=torch.int32)
    block_j = block_size(n_tokens, 16, 128)
    grid = (batch, triton.cdiv(n_tokens, block_j))
    wrap_triton(_rank_kernel)[grid](scores, keep_mask, n_tokens, keep, BLOCK_J=block_j, BLOCK_I=block_j)
    out = x.new_empty((batch, keep, n_channels))
    kept_index = torch.empty((batch, keep), device=x.device, dtype=torch.int64)
    wrap_triton(_compact_gather_kernel)[grid](
        keep_mask, x, kept_index, out,
        *x.stride(), *out.stride(),
        n_tokens, keep, n_channels,
        BLOCK_J=block_j, BLOCK_C=block_size(n_channels, 16, 128),
    )
    return out, kept_index
