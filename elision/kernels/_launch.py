"""Small helpers for launching elision's Triton kernels: block sizes and precision choices.

Block sizes are picked per call from the concrete shapes (no autotuning, nothing built at import
time).  ``tl.dot`` needs every block dim >= 16 on GPUs, so the matmul tiles never go below 16.
"""

from __future__ import annotations

import torch

__all__ = ["next_pow2", "block_size", "dot_precision"]


def next_pow2(n: int) -> int:
    """Smallest power of two >= n (1 for n <= 1)."""
    n = int(n)
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def block_size(n: int, lo: int, hi: int) -> int:
    """A power-of-two block covering ``n`` elements, clamped to [lo, hi]."""
    return max(lo, min(hi, next_pow2(n)))


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get exact IEEE dots (GPUs would otherwise use tf32); halves use tensor cores."""
    return "ieee" if dtype in (torch.float32, torch.float64) else "tf32"
