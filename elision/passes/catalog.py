"""Every pass elision has, registered by importing the module that defines it (one place to add a new one).

One pass a file: `classic/` (dce, cse, constant_fold, canonicalize), `fusion/` (fuse_attention, fuse_norms,
fuse_qkv), `specdec/` (kv_cache, tree_verify, layer_skip_draft), `model_map` (the analysis-only pass), and the
token-reduction and volume families in their packages.
"""
from __future__ import annotations

from elision.passes import model_map, tokens, volume  # noqa: F401  (register their passes)
from elision.passes.base import PASS_REGISTRY, Pass
from elision.passes.classic import canonicalize, constant_fold, cse, dce  # noqa: F401  (register their passes)
from elision.passes.fusion import fuse_attention, fuse_norms, fuse_qkv  # noqa: F401  (register their passes)
from elision.passes.specdec import kv_cache, layer_skip_draft, tree_verify  # noqa: F401  (register their passes)


def all_passes() -> dict[str, type[Pass]]:
    """{pipeline name: pass class} of every registered pass."""
    return PASS_REGISTRY
