"""What a `builtin:NAME` model is: a factory for a ready `torch.nn.Module` plus its example inputs and dynamic dims.

Each model module (`tiny`, `code_lm`, `vecset`, `vision`) lists its entries in `BUILTINS`; `elision.models.registry`
collects them.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass(frozen=True)
class BuiltinModel:
    name: str
    description: str
    # () -> nn.Module (eval mode, float32 unless the entry says otherwise)
    build: Callable[[], Any]
    # (model) -> tuple of example input tensors for tracing (dynamic dims should have size >= 2)
    example_inputs: Callable[[Any], tuple]
    # names of the dynamic dims of each example input: {input_index: {dim: "batch"|"seq"|...}}
    dynamic_dims: dict = field(default_factory=dict)
    kind: str = "generic"  # "causal-lm" | "encoder" | "vision" | "shape-decoder" | "generic"
