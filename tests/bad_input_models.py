"""Models for the bad-input and hardening tests, and factories for `package.module:factory` specs (with --trust-code)."""
from __future__ import annotations

import torch


class TokenModel(torch.nn.Module):
    """Token ids -> embedding -> linear: the smallest model whose artifact has a token-id input (range [0, 256))."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(256, 8)
        self.head = torch.nn.Linear(8, 4)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(input_ids))


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


class WithCond(torch.nn.Module):
    """Cannot be traced into the IR (a data-dependent torch.cond): a bad pipeline must be reported before this fails."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(4, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cond(x.sum() > 0, lambda y: self.proj(y), lambda y: y * 2, (x,))


def untraceable():
    return WithCond().eval(), (torch.randn(3, 4),)
