"""IR rewrite `merge-tokens`: ToMe token merging in every layer from `start` on, at a static token count.

merge-tokens{r=R; start=S; sep=102}

In each layer i >= S, between the attention residual and the MLP (where `executor.run_encoder` merges), the pass
splices in `algorithms.tome_merge` (the executor's own code, traced to plain aten ops): bipartite soft matching
on the layer's keys averaged over heads, r tokens size-weighted into their partners, [CLS] protected. The
tokens shrink by r per layer (fewer once only [CLS] would be left to pair), so every layer gets its own
`token_axes.shorten_tokens` rewrite. The size vector (how many patches each token stands for) and the
protected marks are threaded from one merge to the next, and each merge's proportional-attention bias
log(size) replaces the attention mask of every later layer. The result equals the executor with
`ReductionPlan(merge_r=R, merge_start=S)`; r=0 leaves the module untouched. Each merge records where its layer's
residual stream continues (the model map's `residual_stream` attribute), so a later skip-layers still finds the
MLP branch of a merging layer. The batch may stay dynamic (the
matching is traced with the batch symbolic), the number of tokens must be static.

Two kinds of encoders:
  * ViT-style (a patch embedding with [CLS] first, pre-norm layers, no padding): merges at the attention
    residual add, every token starts with size 1.
  * BERT-style text encoders (post-norm layers, inputs `input_ids` and `attention_mask`, the output mean-pooled
    with the attention mask, as `MeanPooledEncoder` / sentence-transformers): merges at the output of the
    attention block's LayerNorm, as `BertAdapter`. Padding starts with size 0 (the matching pairs it last and it
    never pulls a real token's value), [CLS] and each row's [SEP] (token id `sep`, -1: none) are protected, the
    attention of later layers uses log(size) (padding -inf) and the final pooling reads the token sizes in place
    of the attention mask (the executor's `masked_mean_pool(h, size)`). A graph that returns the token states instead
    (a BERT's last_hidden_state) also returns `kept_mask` (1 where a slot holds real tokens, 0 for padding) and
    `token_sizes` (how many tokens each slot stands for): pooling weighted by `token_sizes` is that exact mean (see
    `outputs`; a ViT returning token states gets them too, its mask all ones). A static graph cannot clamp r by where
    each row's [SEP] falls (the executor's clamp depends on the data), so r must fit every merging layer with two
    protected tokens ([CLS] and one [SEP] per row, taken on trust as `prune-tokens` does); a larger r is refused.
Approximate: runs only when approximate passes are allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.analysis.token_axes import (TokenRewriter, check_layer_option, check_symbolic_batch, model_map_for,
                                         shape_of, shorten_tokens, splice, trace_tap)
from elision.ir.core import Module, Node, Value
from elision.ir.types import TensorType
from elision.kernels import token_reduction as alg
from elision.passes.base import PassError, register_pass
from elision.passes.classic import eliminate_dead_code
from elision.passes.tokens.base import TokenReductionPass, input_named
from elision.passes.tokens.outputs import KEPT_MASK, TOKEN_SIZES, output_token_marks


def _merge_tap(r: int, names: list[str], sep: int, num_protected_a: int):
    """One layer's merge as the executor does it. The first merging layer starts from unit sizes and [CLS] (a ViT)
    or from the attention mask as sizes and [CLS] + [SEP] protected (text, as `BertAdapter.embed`); later layers
    get the previous merge's sizes and protected marks."""
    def tap(*xs):
        t = dict(zip(names, xs))
        hidden, k = t["hidden"], t["k"]
        b, n = hidden.shape[:2]
        if "size" in t:
            size, prot = t["size"], t["prot"]
        elif "attention_mask" in t:
            valid = t["attention_mask"].to(torch.bool)
            size = valid.to(hidden.dtype)
            prot = (torch.arange(n) == 0).expand(b, n)
            if "input_ids" in t and sep >= 0:
                prot = prot | ((t["input_ids"] == sep) & valid)
        else:
            size, prot = torch.ones(b, n, dtype=hidden.dtype), (torch.arange(n) == 0).expand(b, n)
        # the number of protected tokens among the even positions is taken on trust (the pass checked r against it)
        merged, size, source = alg.tome_merge(hidden, size, k.mean(1), r, protected=prot,
                                              num_protected_a=num_protected_a)
        prot = torch.zeros_like(size, dtype=torch.bool).scatter(1, source, prot)
        # the token marks a graph returning token states outputs after the last merge (see `outputs`): sizes count
        # whole tokens, so int64 holds them exactly; unused (and removed as dead code) after the other merges
        marks = (size > 0).to(torch.int64), size.to(torch.int64)
        return merged, size, prot, alg.proportional_attention_bias(size).to(k.dtype), *marks
    return tap


class _NoExternals(TokenRewriter):
    """A merged token stands for several source tokens: no per-token value from before a merge carries over."""

    def external(self, e: Value, user: Node, as_sdpa_mask: bool) -> Value:
        raise self._err(f"%{e.name} (a per-token value from before the merge, used at '{user.loc}') cannot follow "
                        "merged tokens")


def _text_rewriter(mask_name: str, sizes: set[str], state: list[Value], used: list[bool]):
    """Text: the attention mask (and an earlier merge's sizes) read after the merge - the mean pooling weights -
    become the current token sizes, so the pooling is weighted by how many tokens each slot stands for (padding
    0), as the executor's `masked_mean_pool(h, size)`. Sizes count whole tokens, so the mask's integer dtype holds
    them exactly. Any other per-token value from before the merge is refused."""

    class _TextRewriter(_NoExternals):
        def external(self, e: Value, user: Node, as_sdpa_mask: bool) -> Value:
            if e.name != mask_name and e.name not in sizes:
                return super().external(e, user, as_sdpa_mask)
            if as_sdpa_mask:
                raise self._err(f"%{e.name} (the attention mask) is used directly as the attention mask at "
                                f"'{user.loc}'; the merged layers attend with log(size) instead and this use was not "
                                "recognised")
            key = (e.name, "size")
            if key not in self.gathered:
                size = state[0]
                if e.type.dtype != size.type.dtype:
                    size = self._add("aten._to_copy.default", (size,), TensorType(e.type.dtype, shape_of(size)), user,
                                     {"dtype": e.type.torch_dtype})
                self.gathered[key] = size
            used[0] = True
            return self.gathered[key]

    return _TextRewriter


def _set_attn_mask(node: Node, mask: Value) -> None:
    if len(node.args) > 3:
        node.args = (*node.args[:3], mask, *node.args[4:])
    else:
        node.kwargs = {**node.kwargs, "attn_mask": mask}


def _text_merge_point(layer) -> Value:
    """The output of a post-norm layer's attention LayerNorm (what `BertAdapter.attn_residual` returns)."""
    if not (layer.post_norm and layer.residual_adds and layer.norms and layer.attention.kind == "sdpa"
            and layer.norms[0].input is not None and layer.norms[0].input.name == layer.residual_adds[0].result.name):
        raise PassError(f"merge-tokens: text encoder layer {layer.index} ('{layer.loc}') is not a post-norm BERT layer "
                        "with SDPA attention (attention residual add -> LayerNorm -> MLP); the IR pass merges text "
                        "tokens where the executor's BertAdapter does, after the attention LayerNorm")
    return layer.norms[0].output


def _text_r_fits(r: int, n: int, layers: int, num_protected: int) -> int | None:
    """The first merging layer (0-based among them) where r exceeds what can merge with `num_protected` protected
    tokens at even positions, or None when r fits everywhere (n tokens reach the first merging layer)."""
    for j in range(layers):
        if r > (n + 1) // 2 - num_protected:
            return j
        n -= r
    return None


@register_pass
@dataclass(frozen=True)
class MergeTokens(TokenReductionPass):
    """ToMe merging of r tokens in every layer >= start of a ViT-style or BERT-style encoder (see module docstring)."""

    name: ClassVar[str] = "merge-tokens"
    r: int = 0
    start: int = 0
    sep: int = 102  # [SEP] id of BERT uncased vocabularies (text encoders only); -1: protect only [CLS]
    fn_name: str = "forward"

    def run(self, module: Module) -> bool:
        if self.r < 0:
            raise PassError(f"merge-tokens: r={self.r} must be >= 0 (tokens merged per layer)")
        mm = model_map_for("merge-tokens", module, self.fn_name)
        layers = mm.layers
        fn = module.functions[self.fn_name]
        ids = input_named(module, fn, "input_ids")
        mask = input_named(module, fn, "attention_mask")
        text = bool(layers) and mm.patch_embed is None and mask is not None
        if not text and (not layers or mm.patch_embed is None or mm.cls_token is None or mm.cls_token.index != 0):
            raise PassError("merge-tokens: the IR pass handles ViT-style encoders (a patch embedding with a [CLS] "
                            "token prepended) and mean-pooled BERT-style text encoders (inputs input_ids and "
                            "attention_mask); none was recognised in this model")
        check_layer_option("merge-tokens", "start", self.start, len(layers), last_allowed=True)
        if self.r == 0:
            return False
        if text:
            if f"prune_tokens.{self.fn_name}" in module.attrs:
                raise PassError("merge-tokens: this text encoder was already pruned by prune-tokens; the IR pass does "
                                "not merge after pruning yet (the pruned rows' kept marks would have to become the "
                                "merge sizes and the gathered pooling mask the size-weighted one): merge without "
                                "pruning, or prune without merging")
            points = [_text_merge_point(la) for la in layers[self.start:]]
            num_protected = 1 + int(ids is not None and self.sep >= 0)
            n0 = shape_of(points[0])[1]
            if isinstance(n0, int):
                bad = _text_r_fits(self.r, n0, len(points), num_protected)
                if bad is not None:
                    fits = max((r for r in range(self.r) if _text_r_fits(r, n0, len(points), num_protected) is None),
                               default=0)
                    n_bad = n0 - bad * self.r
                    raise PassError(
                        f"merge-tokens: r={self.r} is too large for this text sequence: {n_bad} tokens reach layer "
                        f"{self.start + bad}, where at most {(n_bad + 1) // 2 - num_protected} can merge with [CLS] and "
                        "[SEP] protected (the executor would clamp r by where each row's [SEP] falls, which a static "
                        f"graph cannot follow); use r <= {fits} with start={self.start}")
        elif any(la.post_norm or la.parallel or not la.residual_adds or la.attention.kind != "sdpa"
                 for la in layers[self.start:]):
            raise PassError("merge-tokens: the merging layers must be pre-norm, with SDPA attention and a recognised "
                            "attention residual (as a ViT's)")
        state: list[Value] = []
        marks: dict[str, Value] = {}  # the last merge's kept mask and sizes (int64)
        sizes: set[str] = set()  # names of the merges' size outputs (the pooling weights once rewritten)
        pooled = [False]
        changed = False
        for i, layer in enumerate(layers[self.start:], self.start):
            # nodes keep their identity through the rewrites, values do not (their types shrink): look up by name
            values = {v.name: v for v in fn.values()}
            hidden = values[points[i - self.start].name] if text else layer.residual_adds[0].result
            k = values[layer.attention.k.name]
            check_symbolic_batch("merge-tokens", shape_of(hidden))
            check_symbolic_batch("merge-tokens", shape_of(k), token_axis=2)
            n = shape_of(hidden)[1]
            if text:
                r, num_protected_a = self.r, num_protected  # checked above: no clamp
            else:
                r, num_protected_a = min(self.r, (n + 1) // 2 - 1), 1  # as the executor: [CLS] the one protected
            if r <= 0:
                continue
            names = ["hidden", "k"]
            inputs = [hidden, k]
            if state:
                names += ["size", "prot"]
                inputs += state
            elif text:
                names.append("attention_mask")
                inputs.append(mask)
                if ids is not None:
                    names.append("input_ids")
                    inputs.append(ids)
            shapes = {name: (shape_of(v), v.type.torch_dtype) for name, v in zip(names, inputs)}
            tap = trace_tap(_merge_tap(r, names, self.sep, num_protected_a), shapes, "merge-tokens")
            later = [la.attention.node for la in layers[i + 1:]]

            def splice_at(anchor):  # called by shorten_tokens right away, in this iteration
                merged, size, prot, bias, kept, sizes_i64 = splice(fn, tap, inputs, anchor, f"{layer.loc}.merge_tokens",
                                                                   "merge_")
                for node in later:  # proportional attention from here on (a later merge replaces it again)
                    _set_attn_mask(node, bias)
                state[:] = [size, prot]
                marks.update({KEPT_MASK: kept, TOKEN_SIZES: sizes_i64})
                # the MLP of this layer reads the merged stream (a ViT's attention residual add, a BERT layer's
                # attention LayerNorm output): tell the model map, so skip-layers still finds the MLP branch
                module.attrs.setdefault(f"residual_stream.{self.fn_name}", {})[hidden.name] = merged.name
                return merged, None, None

            where = f"merge-tokens{{r={self.r},start={self.start}}}"
            rewriter = _text_rewriter(mask.name, set(sizes), state, pooled) if text else _NoExternals
            shorten_tokens(fn, hidden, n - r, splice_at, where, rewriter=rewriter)
            sizes.add(state[0].name)
            n_out, changed = n - r, True
        if changed:
            token_states = output_token_marks(module, fn, n_out, marks)
            if text and not pooled[0] and not token_states:
                raise PassError(f"merge-tokens{{r={self.r},start={self.start}}}: the model's output is neither pooled "
                                "with the attention mask after the merge (a mean-pooled sentence encoder such as "
                                "MeanPooledEncoder: the executor weights its pooling by token size) nor the token "
                                "states (a BERT's last_hidden_state, returned with kept_mask and token_sizes to pool "
                                "with); nothing was found to carry the merged token sizes")
        eliminate_dead_code(fn)
        return changed
