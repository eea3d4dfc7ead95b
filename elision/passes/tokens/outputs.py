"""The extra outputs of a token-reduced graph that returns token states, so users can pool its shorter output.

A pruned or merged text encoder that returns token states (a BERT's last_hidden_state, now K tokens long) also
returns, as (batch, K) int64 tensors:
  * `kept_mask` (prune-tokens and merge-tokens): 1 where a slot holds a real token (or, after merging, a merge of
    real tokens), 0 for padding. Pool with it as with an attention mask: without it padding and kept tokens cannot
    be told apart.
  * `token_sizes` (merge-tokens only): how many original tokens each slot stands for (0 for padding). A merged
    slot is the size-weighted average of its tokens, so mean pooling weighted by `token_sizes`
    (sum(h * size) / sum(size)) is exactly the mean over the original tokens, as the executor pools; weighting by
    `kept_mask` counts a merge of five tokens once, an approximation. After pruning every kept slot is one
    token, so `token_sizes` would equal `kept_mask` and prune-tokens does not add it.
`TOKEN_OUTPUTS_ATTR` records their output indices; the ONNX artifact names its outputs after them and
`elision.compile` puts them in the ModelOutput as `.kept_mask` / `.token_sizes`. A graph that pools itself
(sentence-transformers' mean pooling) is rewritten to pool with the kept marks or sizes and gets no extra output.
"""
from __future__ import annotations

from elision.analysis.token_axes import shape_of
from elision.ir.core import Function, Module, Value

TOKEN_OUTPUTS_ATTR = "token_outputs"  # module attr: {function: {output name: index of that output}}
KEPT_MASK = "kept_mask"
TOKEN_SIZES = "token_sizes"


def output_token_marks(module: Module, fn: Function, k: int, marks: dict[str, Value]) -> bool:
    """Return `marks` ({output name: (B, K) value}) from `fn` when it returns token states (B, K, C); True when it
    does. A later reduction stage (its graph already returns marks) replaces the earlier stage's marks of the same
    name and adds the others; a graph returning only pooled values gets none (False)."""
    registry = module.attrs.setdefault(TOKEN_OUTPUTS_ATTR, {})
    known = registry.get(fn.name)
    if known is None:
        if not any((s := shape_of(o)) is not None and len(s) == 3 and s[1] == k for o in fn.outputs):
            if not registry:
                del module.attrs[TOKEN_OUTPUTS_ATTR]  # no empty attribute in the printed IR
            return False
        known = registry[fn.name] = {}
    for name, value in marks.items():
        if name in known:
            fn.outputs[known[name]] = value
        else:
            fn.outputs = [*fn.outputs, value]
            known[name] = len(fn.outputs) - 1
    return True


def token_outputs(module: Module, fn_name: str = "forward") -> dict[str, int]:
    """{output name: index} of the token marks `fn_name` returns beside its own outputs, in output order."""
    known = module.attrs.get(TOKEN_OUTPUTS_ATTR, {}).get(fn_name, {})
    return dict(sorted(known.items(), key=lambda item: item[1]))
