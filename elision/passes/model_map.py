"""`model-map`: an analysis-only pass that builds (and caches) the model map, so `--passes model-map` checks recognition."""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from elision.analysis.model_map import build_model_map
from elision.ir.core import Module
from elision.passes.base import Pass, register_pass


@register_pass
@dataclass(frozen=True)
class ModelMapPass(Pass):
    """Analysis only: builds (and caches) the model map so ``--passes model-map`` checks recognition."""

    name: ClassVar[str] = "model-map"
    fn_name: str = "forward"

    def run(self, module: Module) -> bool:
        build_model_map(module, self.fn_name)
        return False
