"""SSA values, the IR's error type, and walks over the nested argument structures that hold values.

This is the bottom of the IR package: the printer, type inference and the node/function containers all build on
it, and it imports none of them.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterator

from elision.ir.types import Type


class IRError(Exception):
    """Malformed IR; the message names the function, the node and what is wrong."""


@dataclass(frozen=True)
class Value:
    name: str
    type: Type

    # Values key every map over the IR (the use index, interpreters' environments): hash the name and the type
    # once, not on every lookup. Equality stays the dataclass's (same name and type).
    def __post_init__(self) -> None:
        object.__setattr__(self, "_hash", hash((self.name, self.type)))

    def __hash__(self) -> int:
        return self._hash

    def __getstate__(self) -> tuple:  # a copy in another process must hash with that process's string hashes
        return (self.name, self.type)

    def __setstate__(self, state: tuple) -> None:
        object.__setattr__(self, "name", state[0])
        object.__setattr__(self, "type", state[1])
        self.__post_init__()

    def __str__(self) -> str:
        return f"%{self.name}"

    def __repr__(self) -> str:
        return f"Value(%{self.name}: {self.type})"


def iter_values(obj: Any) -> Iterator[Value]:
    """All Values inside a (nested) args structure, in order."""
    if isinstance(obj, Value):
        yield obj
    elif isinstance(obj, (list, tuple)):
        for o in obj:
            yield from iter_values(o)
    elif isinstance(obj, dict):
        for o in obj.values():
            yield from iter_values(o)


def map_values(obj: Any, fn: Callable[[Value], Any]) -> Any:
    """Rebuild a (nested) args structure with every Value replaced by ``fn(value)``."""
    if isinstance(obj, Value):
        return fn(obj)
    if isinstance(obj, list):
        return [map_values(o, fn) for o in obj]
    if isinstance(obj, tuple):
        return tuple(map_values(o, fn) for o in obj)
    if isinstance(obj, dict):
        return {k: map_values(v, fn) for k, v in obj.items()}
    return obj
