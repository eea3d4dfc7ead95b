"""Every pass elision has, registered by importing the module that defines it (one place to add a new one)."""
from __future__ import annotations

from elision.passes import classic, fusion, model_map, specdec, tokens, volume  # noqa: F401  (registers their passes)
from elision.passes.base import PASS_REGISTRY, Pass


def all_passes() -> dict[str, type[Pass]]:
    """{pipeline name: pass class} of every registered pass."""
    return PASS_REGISTRY
