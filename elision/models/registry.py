"""Registry of `builtin:NAME` models.

A builtin is a factory returning a ready `torch.nn.Module` in eval mode plus example inputs, so every
entry point (CLI, Python API, tests, demo) resolves `builtin:NAME` the same way. Modules that define
builtins register them at import time; `_ensure_loaded` imports those modules lazily so that importing
elision stays cheap.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable

# Modules that call register_builtin() when imported. Add yours here.
_BUILTIN_MODULES = [
    "elision.models.tiny",
    "elision.models.code_lm",
    "elision.models.vecset",
    "elision.models.vision",
]


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


_REGISTRY: dict[str, BuiltinModel] = {}
_loaded = False


def register_builtin(entry: BuiltinModel) -> BuiltinModel:
    _REGISTRY[entry.name] = entry
    return entry


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _BUILTIN_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a module not written yet is simply absent
            if e.name != mod:
                raise


def list_builtins() -> list[BuiltinModel]:
    _ensure_loaded()
    return sorted(_REGISTRY.values(), key=lambda b: b.name)


def get_builtin(name: str) -> BuiltinModel:
    _ensure_loaded()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise KeyError(f"unknown builtin model {name!r}; known builtins: {known}")
    return _REGISTRY[name]
