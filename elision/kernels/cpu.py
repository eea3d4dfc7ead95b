"""Fast CPU implementations of the elision ops, built on PyTorch's fused CPU kernels.

The ops dispatch CPU tensors here (unless ``ELISION_FORCE_TRITON=1``).  Each function has exactly
the semantics of its counterpart in :mod:`elision.kernels.reference` (the tests check them against
each other) but uses ``scaled_dot_product_attention`` / ``F.rms_norm`` / ``F.layer_norm``, which
are several times faster on CPU than the step-by-step reference math:

* attention: the bias and the bottom-right causal mask are merged into one additive mask for
  SDPA (whose own ``is_causal`` is top-left aligned, so it is only used when ``Lq == Lk`` and there
  is no bias).  SDPA's CPU kernels return zeros for rows whose keys are all masked, which is the
  elision contract.
* norms: the residual add happens in the input dtype, like the eager code the op replaces.

Sparse cross-attention has no faster stock kernel and uses the reference.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from elision.kernels import reference

__all__ = [
    "attention",
    "rms_norm",
    "add_rms_norm",
    "layer_norm",
    "add_layer_norm",
]


def _bottom_right_causal_bias(q_len: int, kv_len: int, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    q_pos = torch.arange(q_len, device=device).unsqueeze(-1) + (kv_len - q_len)
    k_pos = torch.arange(kv_len, device=device).unsqueeze(0)
    return torch.zeros((q_len, kv_len), device=device, dtype=dtype).masked_fill(k_pos > q_pos, float("-inf"))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``reference.attention`` semantics through ``F.scaled_dot_product_attention``."""
    q_len, kv_len = q.shape[2], k.shape[2]
    mask = bias.to(q.dtype) if bias is not None else None
    sdpa_causal = False
    if is_causal:
        if mask is None and q_len == kv_len:
            sdpa_causal = True
        else:
            causal = _bottom_right_causal_bias(q_len, kv_len, q.device, q.dtype)
            mask = causal if mask is None else mask + causal
    out = F.scaled_dot_product_attention(
        q, k, v, attn_mask=mask, is_causal=sdpa_causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
    )
    return out.contiguous()  # the op's fake impl promises a contiguous result


def _same_dtype(x: torch.Tensor, *params: torch.Tensor | None) -> bool:
    return all(p is None or p.dtype == x.dtype for p in params)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``reference.rms_norm`` via ``F.rms_norm`` (mixed weight/input dtypes use the reference)."""
    if not _same_dtype(x, weight):
        return reference.rms_norm(x, weight, eps)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return rms_norm(summed, weight, eps), summed


def layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    """``reference.layer_norm`` via ``F.layer_norm`` (mixed dtypes use the reference)."""
    if not _same_dtype(x, weight, bias):
        return reference.layer_norm(x, weight, bias, eps)
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    summed = x + residual
    return layer_norm(summed, weight, bias, eps), summed
