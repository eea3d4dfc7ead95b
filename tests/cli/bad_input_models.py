"""Factories for `package.module:factory` specs in the bad-input tests (loaded with --trust-code)."""
from __future__ import annotations

import torch


class Eigh(torch.nn.Module):
    """Traces into the IR, but torch.onnx has no translation for linalg.eigh: the ONNX export fails."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.proj(x)
        return torch.linalg.eigh(h.transpose(-1, -2) @ h).eigenvalues


def eigh_model():
    return Eigh().eval(), (torch.randn(3, 4, 4),)


def raising_factory():
    raise RuntimeError("the checkpoint server is down")


def not_a_model():
    return 42
