"""Differential checks of a compiled model against the original on fresh random inputs."""
from __future__ import annotations

from dataclasses import dataclass

import torch

# max |compiled - original| / max |original| allowed, per output dtype
REL_TOLERANCE = {torch.float32: 1e-4, torch.float64: 1e-10, torch.float16: 1e-2, torch.bfloat16: 2e-2}


@dataclass
class Comparison:
    max_abs: float
    max_rel: float
    tolerance: float
    shape: tuple

    @property
    def ok(self) -> bool:
        return self.max_rel <= self.tolerance

    def as_dict(self) -> dict:
        return {"max_abs_error": self.max_abs, "max_rel_error": self.max_rel, "tolerance": self.tolerance,
                "shape": list(self.shape), "ok": self.ok}


def fresh_inputs(example_inputs: tuple, dynamic_dims: dict | None, seed: int = 1234, grow: int = 3,
                 high: int | None = None) -> tuple:
    """Random inputs like ``example_inputs``, with every dynamic dim resized by ``grow`` (new shapes, new values)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, x in enumerate(example_inputs):
        shape = list(x.shape)
        for axis in (dynamic_dims or {}).get(i, {}) or {}:
            shape[int(axis)] += grow
        if x.dtype.is_floating_point:
            out.append((torch.randn(shape, generator=g) * x.float().std().clamp(min=1e-3) + x.float().mean()).to(x.dtype))
        elif x.dtype == torch.bool:
            out.append(torch.rand(shape, generator=g) > 0.5)
        else:
            hi = high if high is not None else int(x.max().item()) + 1
            lo = int(x.min().item())
            out.append(torch.randint(lo, max(hi, lo + 1), shape, generator=g, dtype=x.dtype))
    return tuple(out)


def primary(out) -> torch.Tensor:
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "keys") and hasattr(out, "__getitem__"):
        return out[next(iter(out.keys()))]
    return out[0]


def compare(got: torch.Tensor, want: torch.Tensor) -> Comparison:
    got, want = got.detach(), want.detach()
    if got.shape != want.shape:
        return Comparison(float("inf"), float("inf"), REL_TOLERANCE.get(want.dtype, 1e-4), tuple(got.shape))
    diff = (got.double() - want.double()).abs()
    max_abs = float(diff.max()) if diff.numel() else 0.0
    scale = float(want.double().abs().max()) if want.numel() else 0.0
    return Comparison(max_abs, max_abs / max(scale, 1e-30), REL_TOLERANCE.get(want.dtype, 1e-4), tuple(got.shape))
