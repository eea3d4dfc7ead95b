"""The pass manager: runs a pipeline over a module, timing, dumping and (optionally) verifying after each pass.

Verifying (``verify_each=True``, ``--verify-ir``, or the environment variable ``ELISION_VERIFY_IR=1``, which the
test suite sets) checks the IR's structure after every pass (types too with ``check_types``) and that a pass
reporting no change left the functions and parameters exactly as they were.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from elision.analysis.cache import analyses
from elision.errors import ElisionError, PassError
from elision.ir.core import Module
from elision.ir.verify import verify
from elision.passes.base import Pass
from elision.passes.pipeline import parse_pipeline

VERIFY_ENV = "ELISION_VERIFY_IR"


def verify_from_env() -> bool:
    """``ELISION_VERIFY_IR`` is set to something other than empty or ``0``."""
    return os.environ.get(VERIFY_ENV, "").strip() not in ("", "0")


def _structure(module: Module) -> str:
    """The functions and parameter types as text (module attributes left out: a pass may note what it skipped)."""
    params = "".join(f"{name}: {module.param_type(name)}\n" for name in module.params)
    return params + "".join(f"{fn}\n" for fn in module.functions.values())


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
        checking = self.verify_each or verify_from_env()
        for i, p in enumerate(self.passes):
            if self.progress:
                self.progress(p.spec())
            if self.dump_dir is not None:
                (Path(self.dump_dir) / f"{i:02d}-{p.name}.before.ir").write_text(module.print())
            before = module.node_count()
            structure = _structure(module) if checking else None
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
            if checking:
                try:
                    verify(module, check_types=self.check_types)
                except Exception as e:
                    raise PassError(f"IR is invalid after pass {p.spec()}: {e}") from e
                if not changed and _structure(module) != structure:
                    raise PassError(f"pass {p.spec()} reported no change but edited the IR (a pass that cannot "
                                    f"rewrite must leave the graph alone)")
        if self.dump_dir is not None:
            (Path(self.dump_dir) / "passes.json").write_text(json.dumps([r.as_dict() for r in self.records], indent=2))
        return module

    def report(self) -> list[dict]:
        return [r.as_dict() for r in self.records]


def run_pipeline(module: Module, pipeline: str, **kwargs) -> tuple[Module, list[dict]]:
    pm = PassManager(parse_pipeline(pipeline), **kwargs)
    pm.run(module)
    return module, pm.report()
