"""What each compiled graph actually runs, queryable after the fact (fallbacks are never silent).

Every graph the `torch.compile` backend compiles, and every `elision.compile(...)` result, owns one
`GraphRecord`: the target asked for, what runs (`runs`), why that differs from what was asked for (`fallback`),
the candidates measured on the first call and their medians. `graph_records()` lists the backend's records of
this process in compile order; the callable the backend returns and `CompiledModule` carry theirs as
`.elision_record`. A fallback to eager also raises an `ElisionFallbackWarning` once per graph, on the call that
decided it, and a log line.
"""
from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass, field

__all__ = ["GraphRecord", "ElisionFallbackWarning", "graph_records", "clear_graph_records", "warn_once"]

log = logging.getLogger("elision.apps.compile")

_records: list["GraphRecord"] = []
_warned: set[str] = set()


class ElisionFallbackWarning(UserWarning):
    """A graph (or a call of it) ran in eager PyTorch, or without elision's rewrites, instead of what was asked."""


def warn_once(key: str, message: str, stacklevel: int = 3) -> None:
    """Warn (ElisionFallbackWarning) and log `message` the first time `key` is seen in this process."""
    if key in _warned:
        return
    _warned.add(key)
    log.warning(message)
    warnings.warn(message, ElisionFallbackWarning, stacklevel=stacklevel)


@dataclass
class GraphRecord:
    """One compiled graph: what was asked, what runs, and why."""

    graph_id: str
    target: str
    runs: str | None = None  # the candidate that runs: "elision+inductor", "inductor", "eager", "onnxruntime", ...
    fallback: str | None = None  # why `runs` is not the requested target with elision's rewrites; None when it is
    reason: str = ""  # how `runs` was chosen ("inductor (default route): ...", "only candidate", ...)
    candidates: list[str] = field(default_factory=list)
    timings_ms: dict[str, float] = field(default_factory=dict)  # first-call medians per candidate
    ratios: dict[str, float] = field(default_factory=dict)  # first-call median per-round time ratio to the default route
    selection_seconds: float = 0.0  # first-call time spent warming up and timing the candidates
    dropped: dict[str, str] = field(default_factory=dict)  # candidate -> why it was not considered
    compile_seconds: dict[str, float] = field(default_factory=dict)
    first_call_seconds: dict[str, float] = field(default_factory=dict)  # includes lazy compilation (torch.compile)
    eager_calls: int = 0  # calls that ran eager for a per-call reason (autograd, changed weights) in `runs`' place

    @property
    def eager(self) -> bool:
        """True when this graph runs in eager PyTorch (chosen on the first call, or as a fallback)."""
        return self.runs == "eager"

    def fall_back(self, runs: str, reason: str, *, warn: bool = True) -> None:
        """Record (and, by default, warn once) that the graph runs `runs` instead of what was asked."""
        self.runs = runs
        self.fallback = reason
        if warn:
            warn_once(f"{self.graph_id}:{runs}:{reason}", f"elision backend: graph {self.graph_id} (target {self.target}) "
                                                         f"runs {runs}: {reason}", stacklevel=4)

    def as_dict(self) -> dict:
        return {"graph": self.graph_id, "target": self.target, "runs": self.runs, "fallback": self.fallback,
                "reason": self.reason, "candidates": list(self.candidates), "timings_ms": dict(self.timings_ms),
                "ratios": dict(self.ratios), "selection_seconds": self.selection_seconds,
                "dropped": dict(self.dropped), "compile_seconds": dict(self.compile_seconds),
                "first_call_seconds": dict(self.first_call_seconds),
                "eager_calls": self.eager_calls}

    def summary(self) -> str:
        timing = ", ".join(f"{k} {v:.2f} ms" for k, v in self.timings_ms.items())
        text = f"graph {self.graph_id}: target {self.target}, runs {self.runs or '(decided on the first call)'}"
        if self.reason:
            text += f" ({self.reason})"
        if timing:
            text += f"; first-call medians: {timing}"
        if self.fallback:
            text += f"; FALLBACK: {self.fallback}"
        return text


def register_record(record: GraphRecord) -> GraphRecord:
    _records.append(record)
    return record


def graph_records() -> list[GraphRecord]:
    """Records of every graph compiled by the elision backend in this process, oldest first."""
    return list(_records)


def clear_graph_records() -> None:
    _records.clear()
