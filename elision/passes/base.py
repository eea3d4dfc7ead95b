"""Pass infrastructure: passes are frozen dataclasses whose fields are their options.

A pipeline string names passes with options, e.g. ``"canonicalize,cse,dce"`` or
``"skip-layers{layers=3,7;budget=0.1},dce"``; options are separated by ``,`` or ``;`` inside braces (a
comma followed by something that is not ``name=`` continues a list value).
"""
from __future__ import annotations

import dataclasses
import json
import re
import time
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar

from elision.compiler.errors import ElisionError
from elision.ir.core import Module
from elision.ir.verify import verify


class PassError(ElisionError):
    """A pipeline string, a pass option, or a pass precondition is wrong; the message says which."""


@dataclass(frozen=True)
class Pass:
    name: ClassVar[str] = ""
    # approximate passes change the model's output on purpose: pipelines refuse them unless allowed
    approximate: ClassVar[bool] = False

    def run(self, module: Module) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError(f"pass {self.name} does not implement run()")

    def spec(self) -> str:
        """The pipeline-string spelling of this pass with its non-default options."""
        opts = []
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            default = f.default if f.default is not dataclasses.MISSING else (
                f.default_factory() if f.default_factory is not dataclasses.MISSING else dataclasses.MISSING)
            if v != default:
                if isinstance(v, (list, tuple)):
                    v = ",".join(str(x) for x in v)
                opts.append(f"{f.name}={v}")
        return self.name + ("{" + ";".join(opts) + "}" if opts else "")


PASS_REGISTRY: dict[str, type[Pass]] = {}
_PASS_MODULES = [
    "elision.passes.classic",
    "elision.passes.model_map",
    "elision.passes.fusion",
    "elision.passes.specdec",
    "elision.passes.pruning",
    "elision.passes.volume",
]


def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no pass name")
    PASS_REGISTRY[cls.name] = cls
    return cls


def load_passes() -> dict[str, type[Pass]]:
    import importlib

    for mod in _PASS_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name is None or not mod.startswith(e.name):
                raise
    return PASS_REGISTRY


# ------------------------------------------------------------------------------------- pipeline strings
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
    registry = load_passes()
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


# ------------------------------------------------------------------------------------- analyses
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


# ------------------------------------------------------------------------------------- manager
@dataclass
class PassRecord:
    name: str
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class PassManager:
    passes: list[Pass]
    verify_each: bool = False
    check_types: bool = False
    dump_dir: str | Path | None = None
    allow_approximate: bool = False
    progress: Callable[[str], None] | None = None
    records: list[PassRecord] = field(default_factory=list)

    def run(self, module: Module) -> Module:
        for p in self.passes:
            if p.approximate and not self.allow_approximate:
                raise PassError(f"pass {p.name!r} changes the model's output (approximate); it runs only when "
                                f"asked for explicitly (allow_approximate=True / --approximate)")
        if self.dump_dir is not None:
            Path(self.dump_dir).mkdir(parents=True, exist_ok=True)
        for i, p in enumerate(self.passes):
            if self.progress:
                self.progress(p.spec())
            if self.dump_dir is not None:
                (Path(self.dump_dir) / f"{i:02d}-{p.name}.before.ir").write_text(module.print())
            before = module.node_count()
            t0 = time.perf_counter()
            try:
                changed = bool(p.run(module))
            except ElisionError:
                raise
            except Exception as e:
                done = ", ".join(q.name for q in self.passes[:i]) or "(none)"
                raise PassError(f"pass {p.spec()} failed: {type(e).__name__}: {e} (after passes: {done})") from e
            dt = time.perf_counter() - t0
            if changed:
                analyses().invalidate()
            self.records.append(PassRecord(p.spec(), dt, before, module.node_count(), changed))
            if self.dump_dir is not None:
                (Path(self.dump_dir) / f"{i:02d}-{p.name}.after.ir").write_text(module.print())
            if self.verify_each:
                try:
                    verify(module, check_types=self.check_types)
                except Exception as e:
                    raise PassError(f"IR is invalid after pass {p.spec()}: {e}") from e
        if self.dump_dir is not None:
            (Path(self.dump_dir) / "passes.json").write_text(json.dumps([r.as_dict() for r in self.records], indent=2))
        return module

    def report(self) -> list[dict]:
        return [r.as_dict() for r in self.records]


def run_pipeline(module: Module, pipeline: str, **kwargs) -> tuple[Module, list[dict]]:
    pm = PassManager(parse_pipeline(pipeline), **kwargs)
    pm.run(module)
    return module, pm.report()
