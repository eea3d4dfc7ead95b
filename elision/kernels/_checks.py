"""Shape and argument validation shared by the reference, Triton and fake implementations.

Every elision op validates its inputs the same way no matter which implementation runs, so a bad
call fails with the same clear message in eager, under ``torch.export`` and on CUDA.  Conditions
on concrete sizes raise :class:`ValueError`; conditions that involve symbolic sizes (during
tracing with dynamic dims) go through ``torch._check`` so they become runtime asserts instead of
specialising the traced graph.
"""

from __future__ import annotations

from typing import Any

import torch

__all__ = [
    "require",
    "check_attention",
    "check_norm",
    "check_sparse_cross_attention",
    "check_index_range",
]

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def require(condition: Any, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``condition`` holds (``torch._check`` if symbolic)."""
    if isinstance(condition, torch.SymBool):
        torch._check(condition, lambda: message)
        return
    if not condition:
        raise ValueError(message)


def _require_float(name: str, t: torch.Tensor) -> None:
    require(t.dtype in _FLOAT_DTYPES, f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _require_int(name: str, t: torch.Tensor) -> None:
    require(
        t.dtype in (torch.int32, torch.int64),
        f"{name} must be an int32 or int64 index tensor, got dtype {t.dtype}",
    )


def check_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor | None
) -> None:
    """Validate ``elision::attention`` inputs: q [B,Hq,Lq,D], k/v [B,Hkv,Lk,D], bias [B|1,1|Hq,Lq,Lk]."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require(t.dim() == 4, f"attention: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        _require_float(f"attention: {name}", t)
    require(q.dtype == k.dtype == v.dtype, f"attention: q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, hq, lq, d = q.shape
    _, hkv, lk, _ = k.shape
    require(k.shape == v.shape, f"attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    require(k.shape[0] == b, f"attention: batch of k ({k.shape[0]}) must equal batch of q ({b})")
    require(k.shape[3] == d, f"attention: head_dim of k ({k.shape[3]}) must equal head_dim of q ({d})")
    require(
        hq % hkv == 0,
        f"attention: the number of query heads ({hq}) must be a multiple of the number of key/value heads ({hkv}) "
        "for grouped-query attention; repeat or regroup the KV heads so that Hq % Hkv == 0",
    )
    require(lk >= 1, "attention: the key/value sequence must not be empty")
    if bias is not None:
        _require_float("attention: bias", bias)
        require(
            bias.dim() == 4,
            f"attention: bias must be 4-D [batch|1, heads|1, Lq, Lk] (additive, 0 = attend, -inf = masked), got shape {tuple(bias.shape)}",
        )
        require(bias.shape[0] == 1 or bias.shape[0] == b, f"attention: bias batch dim must be 1 or {b}, got {bias.shape[0]}")
        require(bias.shape[1] == 1 or bias.shape[1] == hq, f"attention: bias head dim must be 1 or {hq}, got {bias.shape[1]}")
        require(bias.shape[2] == lq, f"attention: bias dim 2 must equal Lq={lq}, got {bias.shape[2]}")
        require(bias.shape[3] == lk, f"attention: bias dim 3 must equal Lk={lk}, got {bias.shape[3]}")


def check_norm(
    op: str,
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None = None,
    residual: torch.Tensor | None = None,
) -> None:
    """Validate a norm over the last dim of ``x`` with optional weight/bias [C] and residual like x."""
    _require_float(f"{op}: x", x)
    require(x.dim() >= 1, f"{op}: x must have at least one dimension")
    c = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is not None:
            require(t.dim() == 1 and t.shape[0] == c, f"{op}: {name} must have shape [{c}] (the last dim of x), got {tuple(t.shape)}")
            _require_float(f"{op}: {name}", t)
    if residual is not None:
        require(residual.shape == x.shape, f"{op}: residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")
        require(residual.dtype == x.dtype, f"{op}: residual must have the dtype of x ({x.dtype}), got {residual.dtype}")


def check_index_range(name: str, idx: torch.Tensor, upper: int, allow_padding: bool) -> None:
    """Check index values on concrete tensors (a host sync; only done on CPU)."""
    if idx.numel() == 0:
        return
    lo = int(idx.min())
    hi = int(idx.max())
    low_bound = -1 if allow_padding else 0
    require(
        lo >= low_bound and hi < upper,
        f"{name}: indices must lie in [{low_bound}, {upper}), got values in [{lo}, {hi}]"
        + (" (-1 marks an unused slot)" if allow_padding else ""),
    )


def check_sparse_cross_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_index: torch.Tensor, block_size: int
) -> None:
    """Validate ``elision::sparse_cross_attention`` inputs."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        require(t.dim() == 4, f"sparse_cross_attention: {name} must be 4-D [batch, heads, seq, head_dim], got shape {tuple(t.shape)}")
        _require_float(f"sparse_cross_attention: {name}", t)
    require(q.dtype == k.dtype == v.dtype, "sparse_cross_attention: q, k, v must share a dtype")
    require(k.shape == v.shape, f"sparse_cross_attention: k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    b, h, nq, d = q.shape
    require(k.shape[0] == b and k.shape[3] == d, "sparse_cross_attention: k must be [B, Hkv, M, D] with the batch and head_dim of q")
    require(h % k.shape[1] == 0, f"sparse_cross_attention: query heads ({h}) must be a multiple of key/value heads ({k.shape[1]})")
    require(block_size >= 1, f"sparse_cross_attention: block_size must be >= 1, got {block_size}")
    _require_int("sparse_cross_attention: block_index", block_index)
    require(
        block_index.dim() in (3, 4),
        "sparse_cross_attention: block_index must be [B, nblocks, topk] (shared by all heads) or "
        f"[B, H, nblocks, topk] (per head), got shape {tuple(block_index.shape)}",
    )
    require(block_index.shape[0] == b, f"sparse_cross_attention: batch of block_index ({block_index.shape[0]}) must equal batch of q ({b})")
    if block_index.dim() == 4:
        require(block_index.shape[1] == h, f"sparse_cross_attention: per-head block_index must have {h} heads, got {block_index.shape[1]}")
    nblocks = block_index.shape[-2]
    require(
        nblocks * block_size >= nq,
        f"sparse_cross_attention: {nblocks} blocks of {block_size} queries cover fewer than Nq={nq} queries; "
        "pass ceil(Nq / block_size) index lists",
    )
    require(block_index.shape[-1] >= 1, "sparse_cross_attention: topk (last dim of block_index) must be >= 1")
