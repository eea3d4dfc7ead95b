"""IR rewrite `merge-tokens`: ToMe token merging in every layer from `start` on, at a static token count.

merge-tokens{r=R; start=S}

In each layer i >= S, between the attention residual and the MLP (where `executor.run_encoder` merges), the pass
splices in `algorithms.tome_merge` (the executor's own code, traced to plain aten ops): bipartite soft matching
on the layer's keys averaged over heads, r tokens size-weighted into their partners, [CLS] protected. The
tokens shrink by r per layer (fewer once only [CLS] would be left to pair), so every layer gets its own
`token_axes.shorten_tokens` rewrite. The size vector (how many patches each token stands for) and the
protected marks are threaded from one merge to the next, and each merge's proportional-attention bias
log(size) replaces the attention mask of every later layer. The result equals the executor with
`ReductionPlan(merge_r=R, merge_start=S)`; r=0 leaves the module untouched. The batch may stay dynamic (the
matching is traced with the batch symbolic), the number of tokens must be static.

ViT-style encoders only (a patch embedding with [CLS] first, pre-norm layers, no padding): a text encoder's
padding mask and size-weighted pooling would have to be carried through the merges as well. Approximate:
runs only when approximate passes are allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.ir.core import Module, Node, Value
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.pruning import algorithms as alg
from elision.passes.pruning.token_axes import (TokenRewriter, check_layer_option, check_symbolic_batch, model_map_for,
                                               shape_of, shorten_tokens, splice, trace_tap)


def _merge_tap(r: int):
    """One layer's merge as the executor does it; the first merging layer starts from unit sizes and [CLS]."""
    def tap(hidden, k, *state):
        b, n = hidden.shape[:2]
        size, prot = state or (torch.ones(b, n, dtype=hidden.dtype), (torch.arange(n) == 0).expand(b, n))
        # only [CLS] is protected and it stays first, so one protected token among the even positions
        merged, size, source = alg.tome_merge(hidden, size, k.mean(1), r, protected=prot, num_protected_a=1)
        prot = torch.zeros_like(size, dtype=torch.bool).scatter(1, source, prot)
        return merged, size, prot, alg.proportional_attention_bias(size).to(k.dtype)
    return tap


class _NoExternals(TokenRewriter):
    """A merged token stands for several source tokens: no per-token value from before a merge carries over."""

    def external(self, e: Value, user: Node, as_sdpa_mask: bool) -> Value:
        raise self._err(f"%{e.name} (a per-token value from before the merge, used at '{user.loc}') cannot follow "
                        "merged tokens")


def _set_attn_mask(node: Node, mask: Value) -> None:
    if len(node.args) > 3:
        node.args = (*node.args[:3], mask, *node.args[4:])
    else:
        node.kwargs = {**node.kwargs, "attn_mask": mask}


@register_pass
@dataclass(frozen=True)
class MergeTokens(Pass):
    """ToMe merging of r tokens in every layer >= start of a ViT-style encoder (see module docstring)."""

    name: ClassVar[str] = "merge-tokens"
    approximate: ClassVar[bool] = True
    static_shapes: ClassVar[bool] = True  # the merged graph's shapes depend on the number of tokens
    dynamic_batch: ClassVar[bool] = True  # ... but a dynamic batch dim stays dynamic (see `token_axes`)
    r: int = 0
    start: int = 0
    fn_name: str = "forward"

    def run(self, module: Module) -> bool:
        from elision.passes.classic import eliminate_dead_code
        if self.r < 0:
            raise PassError(f"merge-tokens: r={self.r} must be >= 0 (tokens merged per layer)")
        mm = model_map_for("merge-tokens", module, self.fn_name)
        layers = mm.layers
        if not layers or mm.patch_embed is None or mm.cls_token is None or mm.cls_token.index != 0:
            raise PassError("merge-tokens: the IR pass handles ViT-style encoders (a patch embedding with a [CLS] "
                            "token prepended) and none was recognised in this model")
        check_layer_option("merge-tokens", "start", self.start, len(layers), last_allowed=True)
        if any(la.post_norm or not la.residual_adds or la.attention.kind != "sdpa" for la in layers[self.start:]):
            raise PassError("merge-tokens: the merging layers must be pre-norm, with SDPA attention and a recognised "
                            "attention residual (as a ViT's)")
        fn = module.functions[self.fn_name]
        state: list[Value] = []
        changed = False
        for i, layer in enumerate(layers[self.start:], self.start):
            # nodes keep their identity through the rewrites, values do not (their types shrink): look up by name
            values = {v.name: v for v in fn.values()}
            hidden, k = layer.residual_adds[0].result, values[layer.attention.k.name]
            check_symbolic_batch("merge-tokens", shape_of(hidden))
            check_symbolic_batch("merge-tokens", shape_of(k), token_axis=2)
            n = shape_of(hidden)[1]
            r = min(self.r, (n + 1) // 2 - 1)  # as the executor: [CLS] is the one protected even-position token
            if r <= 0:
                continue
            shapes = {"hidden": (shape_of(hidden), hidden.type.torch_dtype), "k": (shape_of(k), k.type.torch_dtype)}
            shapes.update({name: (shape_of(v), v.type.torch_dtype) for name, v in zip(("size", "prot"), state)})
            tap = trace_tap(_merge_tap(r), shapes, "merge-tokens")
            later = [la.attention.node for la in layers[i + 1:]]

            def splice_at(anchor):  # called by shorten_tokens right away, in this iteration
                merged, size, prot, bias = splice(fn, tap, [hidden, k, *state], anchor, f"{layer.loc}.merge_tokens",
                                                  "merge_")
                for node in later:  # proportional attention from here on (a later merge replaces it again)
                    _set_attn_mask(node, bias)
                state[:] = [size, prot]
                # the MLP of this layer reads the merged stream: tell the model map (skip-layers uses it)
                module.attrs.setdefault(f"residual_stream.{self.fn_name}", {})[hidden.name] = merged.name
                return merged, None, None

            shorten_tokens(fn, hidden, n - r, splice_at, f"merge-tokens{{r={self.r},start={self.start}}}",
                           rewriter=_NoExternals)
            changed = True
        eliminate_dead_code(fn)
        return changed
