"""The base class of the token-reduction passes (prune-tokens, merge-tokens, compress-tokens)."""
from __future__ import annotations

from typing import ClassVar

from elision.passes.base import Pass


class TokenReductionPass(Pass):
    """What prune-tokens, merge-tokens and compress-tokens share: they change the model's output on purpose
    (approximate), the rewritten graph's shapes follow the number of tokens, so `elision compile` traces at a fixed
    sequence length / image size for them (static_shapes), and the batch stays symbolic through every rewrite here,
    so the spec's dynamic dim named "batch" is kept dynamic (dynamic_batch)."""

    approximate: ClassVar[bool] = True
    static_shapes: ClassVar[bool] = True
    dynamic_batch: ClassVar[bool] = True
