"""Every pass elision has, registered by importing the module that defines it (one place to add a new one).

One pass a file: `classic/` (dce, cse, constant_fold, canonicalize), `fusion/` (fuse_attention, fuse_norms,
fuse_qkv), `specdec/` (kv_cache, tree_verify, layer_skip_draft), `model_map` (the analysis-only pass), and the
token-reduction and volume families in their packages.
"""
from __future__ import annotations

import dataclasses
import re
import types
import typing
from typing import Any

from elision.passes import model_map, tokens, volume  # noqa: F401  (register their passes)
from elision.passes.base import PASS_REGISTRY, Pass
from elision.passes.classic import canonicalize, constant_fold, cse, dce  # noqa: F401  (register their passes)
from elision.passes.fusion import fuse_attention, fuse_norms, fuse_qkv  # noqa: F401  (register their passes)
from elision.passes.specdec import kv_cache, layer_skip_draft, tree_verify  # noqa: F401  (register their passes)


def all_passes() -> dict[str, type[Pass]]:
    """{pipeline name: pass class} of every registered pass."""
    return PASS_REGISTRY


def type_name(tp: Any) -> str:
    """An option's type as a user reads it: int, float, 'cls-attn' | 'key-norm', int | 'auto', int | None."""
    if typing.get_origin(tp) is typing.Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        return " | ".join(type_name(a) for a in typing.get_args(tp))
    if typing.get_origin(tp) in (tuple, list):
        return "list of " + type_name(typing.get_args(tp)[0]) if typing.get_args(tp) else "list"
    if tp is type(None):
        return "None"
    return getattr(tp, "__name__", str(tp))


def _doc_line(cls: type[Pass]) -> str:
    """The first line of the pass's docstring, without pointers to source-code documents."""
    line = (cls.__doc__ or "").strip().splitlines()[0] if cls.__doc__ else ""
    line = re.sub(r"\s*\(see [^)]*\)\s*\.?$", "", line).replace("``", "`").rstrip(".")
    return line + "." if line else ""


def describe_passes() -> list[dict[str, Any]]:
    """Every registered pass, sorted by name: {name, approximate, doc, options: [{name, type, default}]}."""
    out = []
    for name in sorted(PASS_REGISTRY):
        cls = PASS_REGISTRY[name]
        hints = typing.get_type_hints(cls)
        options = []
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
            options.append({"name": f.name, "type": type_name(hints.get(f.name, f.type)),
                            "default": list(default) if isinstance(default, (tuple, frozenset, set)) else default})
        out.append({"name": name, "approximate": bool(cls.approximate), "doc": _doc_line(cls), "options": options})
    return out
