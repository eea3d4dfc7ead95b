"""Cached analyses: results are kept per module until a pass changes the graph (the pass manager invalidates them)."""
from __future__ import annotations

from typing import Any, Callable

from elision.ir.core import Module


class AnalysisManager:
    """Caches analysis results per module; a pass that changes the graph invalidates them all."""

    def __init__(self) -> None:
        # values are (module, result): holding the module keeps its id from being reused by another module
        self._cache: dict[tuple[str, int], tuple[Module, Any]] = {}

    def get(self, name: str, module: Module, compute: Callable[[Module], Any]) -> Any:
        key = (name, id(module))
        hit = self._cache.get(key)
        if hit is None or hit[0] is not module:
            self._cache[key] = (module, compute(module))
        return self._cache[key][1]

    def invalidate(self) -> None:
        self._cache.clear()


_ANALYSES = AnalysisManager()


def analyses() -> AnalysisManager:
    return _ANALYSES
