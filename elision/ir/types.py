"""Types of IR values.

Tensor shapes keep symbolic dimensions as strings (``"batch"``, ``"seq + 1"``): they print as written,
survive passes untouched, and are turned into sympy expressions only where arithmetic is needed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Union

import torch

from elision.ir.symbolic import free_symbols

Dim = Union[int, str]

# short, stable spellings for the textual form
_DTYPE_NAMES: dict[torch.dtype, str] = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "bool",
    torch.complex64: "c64",
}
_NAME_TO_DTYPE = {v: k for k, v in _DTYPE_NAMES.items()}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by the elision IR") from None


def torch_dtype(name: str) -> torch.dtype:
    try:
        return _NAME_TO_DTYPE[name]
    except KeyError:
        raise ValueError(f"unknown dtype name {name!r}; known: {sorted(_NAME_TO_DTYPE)}") from None


def is_dtype_name(name: str) -> bool:
    return name in _NAME_TO_DTYPE


@dataclass(frozen=True)
class TensorType:
    dtype: str
    shape: tuple[Dim, ...]

    @property
    def rank(self) -> int:
        return len(self.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch_dtype(self.dtype)

    @property
    def is_static(self) -> bool:
        return all(isinstance(d, int) for d in self.shape)

    def symbols(self) -> set[str]:
        out: set[str] = set()
        for d in self.shape:
            if isinstance(d, str):
                out |= free_symbols(d)
        return out

    def __str__(self) -> str:
        return f"{self.dtype}[{', '.join(str(d) for d in self.shape)}]"


@dataclass(frozen=True)
class ScalarType:
    """A non-tensor value: ``int``, ``float``, ``bool``; ``expr`` keeps a symbolic int's expression."""

    kind: str
    expr: str | None = None

    def __str__(self) -> str:
        return f"{self.kind}<{self.expr}>" if self.expr is not None else self.kind


@dataclass(frozen=True)
class TupleType:
    elems: tuple["Type", ...]

    def __str__(self) -> str:
        return "(" + ", ".join(str(e) for e in self.elems) + ("," if len(self.elems) == 1 else "") + ")"


@dataclass(frozen=True)
class NoneType:
    def __str__(self) -> str:
        return "none"


Type = Union[TensorType, ScalarType, TupleType, NoneType]
NONE = NoneType()
