"""Plain-PyTorch reference implementations of elision's ops.

These are the CPU implementations behind ``torch.ops.elision.*`` and the ground truth the Triton
kernels are tested against.  They are written for clarity and for tracing (no data-dependent
Python control flow, symbolic shapes welcome), and compute in float32 internally whatever the
input dtype, casting the result back to the input dtype.

Semantics shared with the Triton kernels (and documented in ``ops.py``):

* attention: ``softmax(q k^T * scale + bias [+ causal]) v`` with grouped-query heads
  (query head ``h`` reads KV head ``h // (Hq // Hkv)``).  ``is_causal`` is *bottom-right* aligned,
  the convention a KV cache needs: query ``i`` sits at absolute position ``Lk - Lq + i`` and sees
  keys ``j <= Lk - Lq + i`` (identical to SDPA's ``is_causal`` when ``Lq == Lk``).  A query row whose
  keys are all masked (bias ``-inf`` everywhere) outputs zeros instead of NaN.
"""

from __future__ import annotations

import math

import torch

__all__ = [
    "attention",
    "rms_norm",
    "add_rms_norm",
    "layer_norm",
    "add_layer_norm",
    "sparse_cross_attention",
]


def _default_scale(head_dim: int, scale: float | None) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(head_dim)


def _masked_softmax(logits: torch.Tensor) -> torch.Tensor:
    """Softmax over the last dim where rows that are entirely -inf give all-zero probabilities."""
    row_max = logits.amax(dim=-1, keepdim=True)
    row_max = torch.where(torch.isinf(row_max) & (row_max < 0), torch.zeros_like(row_max), row_max)
    weights = torch.exp(logits - row_max)
    denom = weights.sum(dim=-1, keepdim=True)
    return weights / torch.where(denom == 0, torch.ones_like(denom), denom)


def _repeat_kv(t: torch.Tensor, n_rep: int) -> torch.Tensor:
    """[B, Hkv, L, D] -> [B, Hkv * n_rep, L, D] so query head h reads KV head h // n_rep."""
    if n_rep == 1:
        return t
    return t.repeat_interleave(n_rep, dim=1)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """Attention with an additive mask over a KV cache. q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D] -> [B,Hq,Lq,D]."""
    b, hq, lq, d = q.shape
    hkv, lk = k.shape[1], k.shape[2]
    group = hq // hkv
    # GQA without copying K/V: view the query heads as [Hkv, group] and broadcast K/V over group.
    q5 = q.float().reshape(b, hkv, group, lq, d)
    k5, v5 = k.float().unsqueeze(2), v.float().unsqueeze(2)
    logits = torch.matmul(q5, k5.transpose(-1, -2)).reshape(b, hq, lq, lk) * _default_scale(d, scale)
    if bias is not None:
        logits = logits + bias.float()
    if is_causal:
        q_pos = torch.arange(lq, device=q.device).unsqueeze(-1) + (lk - lq)
        k_pos = torch.arange(lk, device=q.device).unsqueeze(0)
        logits = logits.masked_fill(k_pos > q_pos, float("-inf"))
    probs = _masked_softmax(logits).reshape(b, hkv, group, lq, lk)
    return torch.matmul(probs, v5).reshape(b, hq, lq, d).to(q.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last dim (Llama RMSNorm), fp32 inside."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + RMSNorm: ``h = x + residual`` (in x's dtype); returns (rms_norm(h), h)."""
    h = x + residual
    return rms_norm(h, weight, eps), h


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """LayerNorm over the last dim (biased variance, like ``torch.nn.LayerNorm``), fp32 inside."""
    xf = x.float()
    mean = xf.mean(dim=-1, keepdim=True)
    centered = xf - mean
    y = centered * torch.rsqrt(centered.pow(2).mean(dim=-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused residual add + LayerNorm: returns (layer_norm(x + residual), x + residual)."""
    h = x + residual
    return layer_norm(h, weight, bias, eps), h


def sparse_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """Each block of ``block_size`` consecutive queries attends only to its own KV rows.

    q [B,H,Nq,D]; k/v [B,Hkv,M,D]; block_index [B,nblocks,topk] (shared by heads) or
    [B,H,nblocks,topk] (per head), entries in [0, M) or -1 for an unused slot.  Query ``n`` belongs
    to block ``n // block_size``.  A block whose slots are all -1 outputs zeros.
    """
    b, h, nq, d = q.shape
    n_rep = h // k.shape[1]
    kf, vf = _repeat_kv(k.float(), n_rep), _repeat_kv(v.float(), n_rep)
    nblocks, topk = block_index.shape[-2], block_index.shape[-1]
    index = block_index.long()
    if index.dim() == 3:
        index = index.unsqueeze(1).expand(b, h, nblocks, topk)
    padded = nblocks * block_size
    qf = torch.nn.functional.pad(q.float(), (0, 0, 0, padded - nq)).reshape(b, h, nblocks, block_size, d)
    valid = index >= 0
    flat = index.clamp(min=0).reshape(b, h, nblocks * topk, 1).expand(b, h, nblocks * topk, d)
    k_sel = torch.gather(kf, 2, flat).reshape(b, h, nblocks, topk, d)
    v_sel = torch.gather(vf, 2, flat).reshape(b, h, nblocks, topk, d)
    logits = torch.matmul(qf, k_sel.transpose(-1, -2)) * _default_scale(d, scale)
    logits = logits.masked_fill(~valid.unsqueeze(-2), float("-inf"))
    out = torch.matmul(_masked_softmax(logits), v_sel)
    return out.reshape(b, h, padded, d)[:, :, :nq].to(q.dtype)
