"""Registry of `builtin:NAME` models.

A builtin is a factory returning a ready `torch.nn.Module` in eval mode plus example inputs, so every
entry point (CLI, Python API, tests, demo) resolves `builtin:NAME` the same way. The model modules list their
entries in `BUILTINS`; the registry collects them on the first lookup (entries registered before keep their
name). Importing it imports transformers and the model code: the CLI imports it only in the commands that need it.
`register_builtin` adds entries of your own.
"""
from __future__ import annotations

from elision.models import code_lm, tiny, vecset, vision
from elision.models.builtin_model import BuiltinModel

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
    for module in (tiny, code_lm, vecset, vision):
        for entry in module.BUILTINS:
            _REGISTRY.setdefault(entry.name, entry)


def list_builtins() -> list[BuiltinModel]:
    _ensure_loaded()
    return sorted(_REGISTRY.values(), key=lambda b: b.name)


def get_builtin(name: str) -> BuiltinModel:
    _ensure_loaded()
    if name not in _REGISTRY:
        known = ", ".join(sorted(_REGISTRY)) or "(none)"
        raise KeyError(f"unknown builtin model {name!r}; known builtins: {known}")
    return _REGISTRY[name]
