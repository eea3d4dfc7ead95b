"""query-independence{function=forward;query_input=0;query_dim=1}: prove that the field function treats query
points independently (an analysis: the IR is not changed).

It fails with a PassError naming the op and the model location where the proof fails, so no rewrite that evaluates
a subset of the queries (sparse-volume, adaptive-kv) runs on a decoder that mixes them; on success the verdict is
recorded in the module's volume record. sparse-volume and adaptive-kv run the same (cached) analysis themselves when
this pass is not in the pipeline.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from elision.analysis.query_independence import cached_query_independence
from elision.ir.core import Module
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.volume.record import FieldOptions, field_function, volume_record


def require_query_independence(module: Module, pass_name: str, function: str | None = None, query_input: int = 0,
                               query_dim: int = 1):
    """(field function, query input, query axis, proof); a PassError naming the failing ops when it does not hold."""
    fn, qi, qd = field_function(module, pass_name, function, query_input, query_dim)
    report = cached_query_independence(module, fn.name, qi, qd)
    if not report.ok:
        raise PassError(f"{pass_name}: @{fn.name} is {report.explain()}\nsparse volume decoding is refused for this "
                        "decoder; decode densely instead (--passes '')")
    return fn, qi, qd, report


@register_pass
@dataclass(frozen=True)
class QueryIndependence(FieldOptions, Pass):
    """Prove that the field function treats query points independently (analysis only: the IR is unchanged)."""

    name: ClassVar[str] = "query-independence"
    query_dim: int = 1

    def run(self, module: Module) -> bool:
        fn, *_, report = require_query_independence(module, self.name, self.function, self.query_input,
                                                    self.query_dim)
        volume_record(module)["query_independent"] = {"function": fn.name,
                                                      "invariant_nodes": len(report.invariant_nodes)}
        return False
