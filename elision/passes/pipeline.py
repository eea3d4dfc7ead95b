"""Pipeline strings: ``"canonicalize,cse,dce"`` or ``"skip-layers{layers=3,7;budget=0.1},dce"``.

Options are separated by ``,`` or ``;`` inside braces (a comma followed by something that is not ``name=``
continues a list value); each value is converted to the type of the pass's dataclass field.
"""
from __future__ import annotations

import dataclasses
import re
import typing
from typing import Any

from elision.errors import PassError
from elision.passes.base import Pass
from elision.passes.catalog import all_passes


def _split_passes(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth < 0:
                raise PassError(f"unbalanced '}}' in pipeline {text!r}")
        if ch == "," and depth == 0:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    if depth:
        raise PassError(f"unbalanced '{{' in pipeline {text!r}")
    if cur.strip():
        parts.append(cur.strip())
    return [p for p in parts if p]


def _split_options(body: str) -> dict[str, str]:
    opts: dict[str, str] = {}
    last = None
    for piece in re.split(r"[;,]", body):
        piece = piece.strip()
        if not piece:
            continue
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_-]*)\s*=\s*(.*)", piece)
        if m:
            last = m.group(1).replace("-", "_")
            opts[last] = m.group(2).strip()
        elif last is not None:
            opts[last] += "," + piece
        else:
            raise PassError(f"option {piece!r} has no name (write name=value)")
    return opts


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is typing.Literal:
        return ", ".join(repr(a) for a in typing.get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _convert(value: str, tp: Any, where: str):
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin is typing.Union:
        errors = []
        for a in args:
            if a is type(None):
                if value.lower() in ("none", ""):
                    return None
                continue
            try:
                return _convert(value, a, where)
            except PassError as e:
                errors.append(str(e))
        raise PassError(f"{where}: {value!r} is not any of {', '.join(_type_name(a) for a in args)}")
    if origin is typing.Literal:
        if value in args:
            return value
        raise PassError(f"{where}: {value!r} is not one of {', '.join(map(str, args))}")
    if origin in (tuple, list):
        elem = args[0] if args else str
        items = [v for v in value.split(",") if v.strip()]
        conv = [_convert(v.strip(), elem, where) for v in items]
        return tuple(conv) if origin is tuple else conv
    if tp is bool:
        if value.lower() in ("1", "true", "yes", "on"):
            return True
        if value.lower() in ("0", "false", "no", "off"):
            return False
        raise PassError(f"{where}: {value!r} is not a boolean (true/false)")
    if tp is int:
        try:
            return int(value)
        except ValueError:
            raise PassError(f"{where}: {value!r} is not an integer") from None
    if tp is float:
        try:
            return float(value)
        except ValueError:
            raise PassError(f"{where}: {value!r} is not a number") from None
    if tp is str:
        return value
    raise PassError(f"{where}: unsupported option type {tp}")


def make_pass(name: str, options: dict[str, str] | None = None) -> Pass:
    registry = all_passes()
    if name not in registry:
        raise PassError(f"unknown pass {name!r}; available passes: {', '.join(sorted(registry))}")
    cls = registry[name]
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, raw in (options or {}).items():
        if key not in fields:
            raise PassError(f"pass {name!r} has no option {key!r}; options: {', '.join(fields) or '(none)'}")
        kwargs[key] = _convert(raw, hints[key], f"option {key} of pass {name}")
    try:
        return cls(**kwargs)
    except (ValueError, TypeError) as e:
        raise PassError(f"pass {name!r}: {e}") from None


def parse_pipeline(text: str) -> list[Pass]:
    passes = []
    for part in _split_passes(text or ""):
        m = re.fullmatch(r"([A-Za-z_][A-Za-z0-9_-]*)\s*(?:\{(.*)\})?", part, re.S)
        if not m:
            raise PassError(f"cannot parse pipeline element {part!r}; write name or name{{opt=value}}")
        passes.append(make_pass(m.group(1), _split_options(m.group(2) or "")))
    return passes
