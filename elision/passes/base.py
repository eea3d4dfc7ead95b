"""The pass base class and registry: passes are frozen dataclasses whose fields are their options.

Each pass module registers its passes with `@register_pass`; `elision.passes.catalog` imports them all, and
`elision.passes.pipeline` turns a pipeline string into configured passes.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from elision.errors import PassError
from elision.ir.core import Module

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
def register_pass(cls: type[Pass]) -> type[Pass]:
    if not cls.name:
        raise TypeError(f"{cls.__name__} has no pass name")
    PASS_REGISTRY[cls.name] = cls
    return cls


__all__ = ["PASS_REGISTRY", "Pass", "PassError", "register_pass"]
