"""The base class of the token-reduction passes (prune-tokens, merge-tokens, compress-tokens)."""
from __future__ import annotations

from typing import ClassVar

from elision.ir.core import Function, Module, Value
from elision.passes.base import Pass


class TokenReductionPass(Pass):
    """What prune-tokens, merge-tokens and compress-tokens share: they change the model's output on purpose
    (approximate), the rewritten graph's shapes follow the number of tokens, so `elision compile` traces at a fixed
    sequence length / image size for them (static_shapes), and the batch stays symbolic through every rewrite here,
    so the spec's dynamic dim named "batch" is kept dynamic (dynamic_batch)."""

    approximate: ClassVar[bool] = True
    static_shapes: ClassVar[bool] = True
    dynamic_batch: ClassVar[bool] = True


def input_named(module: Module, fn: Function, name: str) -> Value | None:
    """`fn`'s input for the model argument `name` (the argument names the tracer records in the module's "inputs"
    attribute, in order), else the input value of that name; None when the model has no such input."""
    names = module.attrs.get("inputs") or []
    for i, n in enumerate(names):
        if n == name and i < len(fn.inputs):
            return fn.inputs[i]
    return next((v for v in fn.inputs if v.name == name), None)
