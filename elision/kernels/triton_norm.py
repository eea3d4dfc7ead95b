"""Triton fused RMSNorm / LayerNorm kernels, with an optional fused residual add.

One program normalises a tile of ``BLOCK_R`` rows; the whole last dim (``C``) of a row is held in
one masked tile, so ``C`` need not be a power of two.  With a residual, the kernel writes both the
normalised output and the sum ``x + residual`` (rounded to the input dtype exactly like the eager
``x + residual`` it replaces, and normalised from that rounded value) — one read of each input,
two writes, instead of the three passes eager PyTorch makes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch.library import wrap_triton

from elision.kernels._launch import next_pow2

__all__ = ["rms_norm", "layer_norm"]

# Keep a tile to about this many elements so wide rows do not blow the register file.
_TILE_ELEMENTS = 4096


@triton.jit
def _norm_kernel(
    X, Residual, Weight, Bias, Out, SumOut,
    n_rows, n_cols, eps,
    IS_RMS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_C)
    col_ok = cols < n_cols
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    offsets = rows[:, None].to(tl.int64) * n_cols + cols[None, :]

    x = tl.load(X + offsets, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        h = x + tl.load(Residual + offsets, mask=mask, other=0.0)  # add in the input dtype, like eager
        tl.store(SumOut + offsets, h, mask=mask)
        x = h
    xf = x.to(tl.float32)
    if IS_RMS:
        inv = (1.0 / tl.sqrt(tl.sum(xf * xf, 1) / n_cols + eps)).to(tl.float32)  # eps is fp64 under inductor
        y = xf * inv[:, None]
    else:
        mean = tl.sum(xf, 1) / n_cols
        centered = tl.where(mask, xf - mean[:, None], 0.0)
        inv = (1.0 / tl.sqrt(tl.sum(centered * centered, 1) / n_cols + eps)).to(tl.float32)
        y = centered * inv[:, None]
    if HAS_WEIGHT:
        y = y * tl.load(Weight + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(Bias + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
    tl.store(Out + offsets, y.to(Out.dtype.element_ty), mask=mask)


def _launch(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    is_rms: bool,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    n_cols = x.shape[-1]
    x2 = x.contiguous()
    res2 = residual.contiguous() if residual is not None else None
    n_rows = x2.numel() // max(n_cols, 1)
    out = torch.empty_like(x2)
    sum_out = torch.empty_like(x2) if residual is not None else None
    block_c = next_pow2(n_cols)
    block_r = max(1, min(next_pow2(n_rows), _TILE_ELEMENTS // block_c))
    grid = (triton.cdiv(n_rows, block_r),)
    wrap_triton(_norm_kernel)[grid](
        x2, res2 if res2 is not None else x2,
        weight if weight is not None else x2, bias if bias is not None else x2,
        out, sum_out if sum_out is not None else out,
        n_rows, n_cols, eps,
        IS_RMS=is_rms, HAS_RESIDUAL=residual is not None,
        HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
        BLOCK_R=block_r, BLOCK_C=block_c,
    )
    return out, sum_out


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float, residual: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """RMSNorm over the last dim; returns (out, x + residual or None)."""
    return _launch(x, residual, weight, None, eps, is_rms=True)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LayerNorm over the last dim; returns (out, x + residual or None)."""
    return _launch(x, residual, weight, bias, eps, is_rms=False)
