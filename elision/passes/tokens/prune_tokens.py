"""IR rewrite `prune-tokens`: drop low-scoring tokens after an encoder layer, at a static sequence length.

prune-tokens{score=cls-attn|last-token-attn|key-norm; after=L|auto; keep=R; positions=renumber|preserve; sep=102}

At the output of layer `after` the pass splices in, as plain aten ops (so every backend runs it and it lowers
to ONNX TopK/Sort/GatherElements):
  * a score tap that recomputes only the attention row it needs from that layer's own q and k
    (softmax(q[cls] . K^T / sqrt(d)) averaged over heads; `last-token-attn` uses each row's last real token;
    `key-norm` the key norms) - it works whatever attention kernel the layer uses, SDPA never exposes weights;
  * a static-k top-k, K = P + ceil(keep * (N - P)) with P protected tokens ([CLS] at position 0 and, for
    text, the [SEP] token `sep`), a sort of the kept indices (original order) and a gather of the hidden
    states. Padding is handled per row: a shorter row keeps ceil(keep * its real tokens); its surplus
    slots come back marked invalid.
Everything downstream is rewritten to length K (see `token_axes`): reshapes and expands that spelled N, and
values built at length N before the pruning point - the attention mask, a pooling mask - are gathered with
the same indices and combined with the kept-valid marks. The graph must have a static sequence length
(export it at a fixed length: the pruned graph's shapes depend on N); the batch may stay dynamic (a symbolic
batch dim is carried through the tap and the rewrite, so one graph serves every batch size). The result equals
the layer-by-layer executor (`executor.run_encoder`) with the same settings; keep=1 leaves the module untouched.

A graph that returns token states (a BERT's last_hidden_state, now K tokens long) also returns the kept-token mask
`kept_mask`: (batch, K) int64, 1 where a slot holds a real token, 0 for padding (see `outputs`; a later stage replaces
an earlier stage's mask). Pool with it, as with an attention mask. A graph that pools itself (sentence-transformers'
mean pooling) already uses the kept marks and gets no extra output.

Encoders add positions at their input, so no position-dependent values flow past the pruning point and
`positions` changes nothing there; a rotary model (positions applied inside each layer) is refused until
position ids are threaded through. Approximate: runs only when approximate passes are allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal, Union

import torch

from elision.analysis.token_axes import (check_layer_option, check_symbolic_batch, model_map_for, shape_of,
                                         shorten_tokens, splice, trace_tap)
from elision.ir.core import Function, Module, Value
from elision.kernels import token_reduction as alg
from elision.passes.base import PassError, register_pass
from elision.passes.classic import eliminate_dead_code
from elision.passes.tokens.base import TokenReductionPass, input_named
from elision.passes.tokens.outputs import KEPT_MASK, output_token_marks


def _tap_function(score: str, keep: float, num_protected: int, sep: int, shapes: dict, n0_default: int) -> Function:
    """The score tap + selection as an IR function traced from `algorithms` (the executor's own code)."""
    names = list(shapes)

    def tap(*xs):
        t = dict(zip(names, xs))
        # the traced examples are contiguous while the model's k is a transposed view: copy it to contiguous
        # memory (a clone always records, `contiguous()` of a contiguous example would not) so the views make_fx
        # recorded for the matmul are valid on the real value too
        h, q, k = t["hidden"], t["q"], t["k"].clone(memory_format=torch.contiguous_format)
        b, n = h.shape[:2]
        n0 = t["attention_mask"].shape[1] if "attention_mask" in t else n0_default
        valid = t["attention_mask"] != 0 if "attention_mask" in t else torch.ones(b, n0, dtype=torch.bool)
        protected = (torch.arange(n0) == 0).expand(b, n0)
        if "input_ids" in t and sep >= 0:
            protected = protected | ((t["input_ids"] == sep) & valid)
        # a later stage: follow the earlier stages' kept indices; their kept marks say which slots are real
        for name in names:
            if name.startswith("idx"):
                protected = alg.gather_tokens(protected, t[name])
        if "valid" in t:
            valid = t["valid"]
        if score == "cls-attn":
            scores = alg.attention_row_scores(q, k, 0, valid=valid)
        elif score == "last-token-attn":
            scores = alg.attention_row_scores(q, k, alg.last_valid_index(valid), valid=valid)
        else:
            scores = alg.key_norm_scores(k)
        idx, kept = alg.select_tokens(scores, keep, protected, valid, num_protected=num_protected)
        # the kept marks as an attention mask (int64, as tokenizers give it): the output of a token-shaped graph
        return alg.gather_tokens(h, idx), idx, kept, kept.to(torch.int64)

    return trace_tap(tap, shapes, "prune-tokens")


@register_pass
@dataclass(frozen=True)
class PruneTokens(TokenReductionPass):
    """Drop low-scoring tokens after a layer of a recognized encoder (see module docstring)."""

    name: ClassVar[str] = "prune-tokens"
    score: Literal["cls-attn", "last-token-attn", "key-norm"] = "cls-attn"
    after: Union[int, Literal["auto"]] = 0  # auto: searched by `elision tune` (needs calibration data)
    keep: float = 1.0
    positions: Literal["renumber", "preserve"] = "renumber"
    sep: int = 102  # [SEP] id of BERT uncased vocabularies (all-MiniLM-L6-v2); -1: protect only [CLS]
    fn_name: str = "forward"

    def run(self, module: Module) -> bool:
        try:
            alg.check_keep_ratio(self.keep)
        except alg.PruningError as e:
            raise PassError(f"prune-tokens: {e}") from None
        if self.after == "auto":
            raise PassError("prune-tokens{after=auto} needs calibration data (where to prune differs per model and is "
                            "measured, never assumed): run `elision tune MODEL --passes prune-tokens --min-fidelity "
                            "0.98` and use the pipeline it prints")
        mm = model_map_for("prune-tokens", module, self.fn_name)
        layers = mm.layers
        if not layers:
            raise PassError("prune-tokens: no stack of attention layers was recognised in this model "
                            f"({'; '.join(mm.unrecognized[:3]) or 'no layers'}); it needs a BERT/ViT-style encoder")
        check_layer_option("prune-tokens", "after", self.after, len(layers), last_allowed=False)
        if self.keep >= 1.0:
            return False
        fn = module.functions[self.fn_name]
        layer = layers[self.after]
        att = layer.attention
        if any(la.attention.rotary for la in layers[self.after:]):
            raise PassError("prune-tokens: rotary attention after the pruning point (a decoder) is not supported by "
                            "the IR pass yet; use it on encoders (BERT, ViT)")
        if att.causal:
            raise PassError(f"prune-tokens: the attention of layer {self.after} is causal; the IR pass handles "
                            "bidirectional encoders (BERT, ViT)")
        hidden = layer.output
        hs, qs, ks = shape_of(hidden), shape_of(att.q), shape_of(att.k)
        if hs is None or len(hs) != 3 or qs is None or ks is None:
            raise PassError("prune-tokens: the layer output must be a (batch, tokens, channels) tensor; export the "
                            "model at a fixed sequence length for token pruning")
        for s in (hs, qs, ks):
            check_symbolic_batch("prune-tokens", s, token_axis=1 if s is hs else 2)
        n = hs[1]
        ids = input_named(module, fn, "input_ids")
        mask = input_named(module, fn, "attention_mask")
        # an earlier prune-tokens left its kept indices and kept marks for later stages (progressive pruning)
        prior = module.attrs.get(f"prune_tokens.{self.fn_name}")
        values = {v.name: v for v in fn.values()}
        num_protected = 1 + int(ids is not None and self.sep >= 0)
        if prior is not None:
            if prior["after"] >= self.after or not {prior["valid"], *prior["indices"]} <= set(values):
                raise PassError(f"prune-tokens: this graph was already pruned after layer {prior['after']}; a further "
                                f"stage must come later (after > {prior['after']}), in pipeline order")
            if shape_of(values[prior["valid"]])[1] != n:
                raise PassError("prune-tokens: the tokens left by the earlier stage do not reach layer "
                                f"{self.after} unchanged; cannot add a stage here")
        if n <= num_protected:
            raise PassError(f"prune-tokens: the sequence has {n} tokens, all protected; nothing to prune")
        k = num_protected + alg.keep_count(n - num_protected, self.keep)
        if k == n:
            return False
        shapes = {"hidden": (hs, hidden.type.torch_dtype), "q": (qs, att.q.type.torch_dtype),
                  "k": (ks, att.k.type.torch_dtype)}
        inputs = [hidden, att.q, att.k]
        for name, v in (("attention_mask", mask), ("input_ids", ids)):
            if v is not None:
                shapes[name] = (shape_of(v), v.type.torch_dtype)
                inputs.append(v)
        if prior is not None:
            for i, name in enumerate(prior["indices"]):
                shapes[f"idx{i}"] = (shape_of(values[name]), torch.long)
                inputs.append(values[name])
            shapes["valid"] = (shape_of(values[prior["valid"]]), torch.bool)
            inputs.append(values[prior["valid"]])
        n0 = prior["n0"] if prior is not None else n
        tap = _tap_function(self.score, self.keep, num_protected, self.sep, shapes, n0)

        kept_mask: list[Value] = []

        def splice_at(anchor):
            pruned, idx, kept, mask_out = splice(fn, tap, inputs, anchor, f"{layer.loc}.prune_tokens", "prune_")
            kept_mask.append(mask_out)
            module.attrs[f"prune_tokens.{self.fn_name}"] = {
                "after": self.after, "n0": n0, "valid": kept.name,
                "indices": (list(prior["indices"]) if prior is not None else []) + [idx.name]}
            return pruned, idx, kept

        shorten_tokens(fn, hidden, k, splice_at, f"prune-tokens{{after={self.after}}}",
                       {v.name for v in (mask, ids) if v is not None})
        output_token_marks(module, fn, k, {KEPT_MASK: kept_mask[0]})
        eliminate_dead_code(fn)
        return True
