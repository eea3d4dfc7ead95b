"""IR rewrite `prune-tokens`: drop low-scoring tokens after an encoder layer, at a static sequence length.

prune-tokens{score=cls-attn|last-token-attn|key-norm; after=L; keep=R; positions=renumber|preserve; sep=102}

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
(export it at a fixed length: the pruned graph's shapes depend on N). The result equals the layer-by-layer
executor (`executor.run_encoder`) with the same settings; keep=1 leaves the module untouched.

Encoders add positions at their input, so no position-dependent values flow past the pruning point and
`positions` changes nothing there; a rotary model (positions applied inside each layer) is refused until
position ids are threaded through. Approximate: runs only when approximate passes are allowed.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

import torch

from elision.ir.core import Function, Module, Node, Value, map_values
from elision.ir.types import TensorType
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.pruning import algorithms as alg
from elision.passes.pruning.token_axes import base_op, shape_of, token_axes

_SHAPE_ARG_OPS = {"view", "reshape", "_unsafe_view", "expand"}
# ops the rewrite knows how to re-emit at the shorter length (their shape arguments are handled or absent)
_REWRITABLE = _SHAPE_ARG_OPS | {
    "add", "sub", "mul", "div", "where", "masked_fill", "__and__", "__or__", "bitwise_and", "logical_and",
    "logical_not", "eq", "ne", "ge", "gt", "le", "lt", "clone", "_to_copy", "to", "gelu", "relu", "silu", "tanh",
    "sigmoid", "neg", "exp", "log", "sqrt", "rsqrt", "pow", "clamp", "clamp_min", "layer_norm", "softmax",
    "_softmax", "dropout", "alias", "detach", "contiguous", "erf", "linear", "transpose", "t", "permute",
    "unsqueeze", "squeeze", "matmul", "bmm", "scaled_dot_product_attention", "sum", "mean", "amax", "select",
    "slice", "_assert_tensor_metadata", "rms_norm", "flatten",
}


def _tap_function(score: str, keep: float, num_protected: int, sep: int, shapes: dict, n0_default: int) -> Function:
    """The score tap + selection as an IR function traced from `algorithms` (the executor's own code)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from elision.compiler.importer import import_graph

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
        return alg.gather_tokens(h, idx), idx, kept

    examples = [torch.zeros(s, dtype=d) for s, d in shapes.values()]
    gm = make_fx(tap, tracing_mode="fake")(*examples)
    if any(n.op == "get_attr" for n in gm.graph.nodes):
        raise PassError("prune-tokens: the score tap traced to graph constants; cannot splice it")
    return import_graph(gm.graph, fn_name="prune_tap", param_placeholders={}, input_names=names)


def _splice(fn: Function, tap: Function, inputs: list[Value], after: Node, loc: str) -> list[Value]:
    """Copy `tap`'s nodes into `fn` after `after`, its inputs bound to `inputs`; returns its outputs."""
    env = dict(zip(tap.inputs, inputs))
    anchor = after
    for n in tap.nodes:
        v = fn.new_value(n.result.type, "prune_" + n.result.name)
        node = Node(n.op, map_values(n.args, env.__getitem__), map_values(dict(n.kwargs), env.__getitem__), v, loc)
        fn.insert_after(anchor, [node])
        env[n.result] = v
        anchor = node
    return [env[o] for o in tap.outputs]


class _Rewriter:
    """Re-emits the nodes after the pruning point at token length K (in place, in program order)."""

    def __init__(self, fn: Function, axes: dict[str, list[int]], n: int, k: int, idx: Value, kept: Value,
                 mask_inputs: set[str], where: str):
        self.fn, self.axes, self.n, self.k, self.idx, self.kept = fn, axes, n, k, idx, kept
        self.mask_inputs, self.where = mask_inputs, where
        self.remap: dict[Value, Value] = {}
        self.gathered: dict[tuple[str, str], Value] = {}
        self.producers = fn.producers()

    def _err(self, what: str) -> PassError:
        return PassError(f"prune-tokens{self.where}: {what}")

    def _shrunk(self, ty: TensorType, axes: list[int]) -> TensorType:
        shape = list(ty.shape)
        for a in axes:
            if shape[a] != self.n:
                raise self._err(f"token axis {a} of a {ty} value is not the sequence length {self.n}")
            shape[a] = self.k
        return TensorType(ty.dtype, tuple(shape))

    def _add(self, op: str, args: tuple, ty: TensorType, before: Node, kwargs: dict | None = None) -> Value:
        v = self.fn.new_value(ty, "pruned")
        self.fn.insert_before(before, [Node(op, args, kwargs or {}, v, "prune-tokens")])
        return v

    def _is_mask(self, v: Value) -> bool:
        """Derived from a non-float model input (the attention mask), i.e. a keep/drop weight, not a feature."""
        seen, stack = set(), [v]
        while stack:
            cur = stack.pop()
            if cur.name in self.mask_inputs:
                return True
            if cur.name in seen:
                continue
            seen.add(cur.name)
            p = self.producers.get(cur)
            if p is not None:
                stack.extend(p.inputs)
        return False

    def _kept_as(self, shape: tuple, axis: int, dtype: str, before: Node) -> Value:
        view = [shape[0]] + [1] * (len(shape) - 1)
        view[axis] = self.k
        kv = self._add("aten.view.default", (self.kept, view), TensorType("bool", tuple(view)), before)
        if dtype == "bool":
            return kv
        return self._add("aten._to_copy.default", (kv,), TensorType(dtype, tuple(view)), before,
                         {"dtype": TensorType(dtype, ()).torch_dtype})

    def external(self, e: Value, user: Node, as_sdpa_mask: bool) -> Value:
        """A full-length value used after the pruning point, gathered along its token axes (cached)."""
        mode = "sdpa" if as_sdpa_mask else "plain"
        key = (e.name, mode)
        if key in self.gathered:
            return self.gathered[key]
        axes, ty = self.axes[e.name], e.type
        if 0 in axes:
            raise self._err(f"%{e.name} has the token axis first (no batch axis); cannot gather it")
        b = shape_of(self.idx)[0]
        before = user
        cur, shape = e, list(ty.shape)
        if shape[0] != b:  # broadcast over the batch (a shared mask or position table): materialize rows
            shape[0] = b
            cur = self._add("aten.expand.default", (cur, list(shape)), TensorType(ty.dtype, tuple(shape)), before)
        for a in axes:
            view = [b] + [1] * (len(shape) - 1)
            view[a] = self.k
            iv = self._add("aten.view.default", (self.idx, view), TensorType("i64", tuple(view)), before)
            shape[a] = self.k
            ie = self._add("aten.expand.default", (iv, list(shape)), TensorType("i64", tuple(shape)), before)
            cur = self._add("aten.gather.default", (cur, a, ie), TensorType(ty.dtype, tuple(shape)), before)
        if self._is_mask(e):
            # surplus slots of shorter rows (and padding) must stay hidden downstream: keys for attention,
            # pooling weights for a sentence embedding
            last = axes[-1]
            out_ty = TensorType(ty.dtype, tuple(shape))
            if ty.dtype == "bool":
                kv = self._kept_as(shape, last, "bool", before)
                cur = self._add("aten.__and__.Tensor", (cur, kv), out_ty, before)
            elif as_sdpa_mask and ty.torch_dtype.is_floating_point:
                kv = self._kept_as(shape, last, "bool", before)
                notk = self._add("aten.logical_not.default", (kv,), kv.type, before)
                cur = self._add("aten.masked_fill.Scalar", (cur, notk, float("-inf")), out_ty, before)
            else:
                cur = self._add("aten.mul.Tensor", (cur, self._kept_as(shape, last, ty.dtype, before)), out_ty, before)
        self.gathered[key] = cur
        return cur

    def rewrite(self, node: Node) -> None:
        op = base_op(node.op)
        out_axes = self.axes.get(node.result.name, [])
        sdpa_mask = node.args[3] if op == "scaled_dot_product_attention" and len(node.args) > 3 else \
            node.kwargs.get("attn_mask") if op == "scaled_dot_product_attention" else None
        changed = False

        def swap(v: Value) -> Value:
            nonlocal changed
            if v in self.remap:
                changed = True
                return self.remap[v]
            if self.axes.get(v.name):
                changed = True
                return self.external(v, node, as_sdpa_mask=v is sdpa_mask)
            return v

        if op == "param":
            return
        args, kwargs = map_values(node.args, swap), map_values(dict(node.kwargs), swap)
        if not changed:
            # nothing it reads changed: a full-length value made here from constants or full-length inputs (an
            # earlier stage's gathered mask) is an external like one made before the pruning point; its users
            # gather it
            return
        if op not in _REWRITABLE:
            raise self._err(f"cannot rewrite {node.op} (%{node.result.name}, at '{node.loc}') to the pruned "
                            "sequence length; this op is not supported after the pruning point")
        x_axes = self.axes.get(node.args[0].name, []) if node.args and isinstance(node.args[0], Value) else []
        if op in _SHAPE_ARG_OPS:
            shape = list(args[1])
            for a in out_axes:
                if shape[a] != -1:
                    shape[a] = self.k
            args = (args[0], shape, *args[2:])
        elif op == "select" and args[1] % len(shape_of(node.args[0])) in x_axes and args[2] != 0:
            raise self._err(f"%{node.result.name} selects token {args[2]}; only token 0 ([CLS], always kept) "
                            "keeps its position after pruning")
        elif op == "slice" and args[1] % len(shape_of(node.args[0])) in x_axes:
            start = args[2] if len(args) > 2 and args[2] is not None else 0
            end = args[3] if len(args) > 3 and args[3] is not None else self.n
            if start != 0 or end < self.n:
                raise self._err(f"%{node.result.name} slices tokens {start}:{end}; only whole-sequence slices "
                                "survive pruning")
            args = (args[0], args[1], 0, self.k, *args[4:])
        new = Value(node.result.name, self._shrunk(node.result.type, out_axes)) if isinstance(
            node.result.type, TensorType) else node.result
        node.args, node.kwargs = args, kwargs
        if new != node.result:
            self.remap[node.result] = new
            node.result = new


def _input_named(module: Module, fn: Function, name: str) -> Value | None:
    names = module.attrs.get("inputs") or []
    for i, n in enumerate(names):
        if n == name and i < len(fn.inputs):
            return fn.inputs[i]
    return next((v for v in fn.inputs if v.name == name), None)


@register_pass
@dataclass(frozen=True)
class PruneTokens(Pass):
    """Drop low-scoring tokens after a layer of a recognized encoder (see module docstring)."""

    name: ClassVar[str] = "prune-tokens"
    approximate: ClassVar[bool] = True
    static_shapes: ClassVar[bool] = True  # `elision compile` traces at a fixed sequence length for this pass
    score: Literal["cls-attn", "last-token-attn", "key-norm"] = "cls-attn"
    after: int = 0
    keep: float = 1.0
    positions: Literal["renumber", "preserve"] = "renumber"
    sep: int = 102  # [SEP] id of BERT uncased vocabularies (all-MiniLM-L6-v2); -1: protect only [CLS]
    fn_name: str = "forward"

    def run(self, module: Module) -> bool:
        from elision.passes.classic import eliminate_dead_code
        from elision.passes.model_map import build_model_map

        try:
            alg.check_keep_ratio(self.keep)
        except alg.PruningError as e:
            raise PassError(f"prune-tokens: {e}") from None
        if self.fn_name not in module.functions:
            raise PassError(f"prune-tokens: the module has no function {self.fn_name!r}")
        mm = build_model_map(module, self.fn_name)
        layers = mm.layers
        if not layers:
            raise PassError("prune-tokens: no stack of attention layers was recognised in this model "
                            f"({'; '.join(mm.unrecognized[:3]) or 'no layers'}); it needs a BERT/ViT-style encoder")
        if not 0 <= self.after < len(layers) - 1:
            raise PassError(f"prune-tokens: after={self.after} is out of range: the model has {len(layers)} layers, "
                            f"use 0..{len(layers) - 2} (pruning after the last layer saves nothing)")
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
        if hs is None or len(hs) != 3 or qs is None or ks is None or not all(isinstance(d, int) for d in hs):
            raise PassError("prune-tokens: the layer output must be a (batch, tokens, channels) tensor of static "
                            "shape; export the model at a fixed sequence length for token pruning")
        n = hs[1]
        ids = _input_named(module, fn, "input_ids")
        mask = _input_named(module, fn, "attention_mask")
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
        anchor = fn.producer(hidden)
        if anchor is None:
            raise PassError("prune-tokens: the layer output is a function input; nothing to rewrite")
        axes = token_axes(fn, hidden, 1)
        downstream = fn.nodes[fn.index(anchor) + 1:]
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
        pruned, idx, kept = _splice(fn, tap, inputs, anchor, f"{layer.loc}.prune_tokens")
        module.attrs[f"prune_tokens.{self.fn_name}"] = {
            "after": self.after, "n0": n0, "valid": kept.name,
            "indices": (list(prior["indices"]) if prior is not None else []) + [idx.name]}
        rw = _Rewriter(fn, axes, n, k, idx, kept, {v.name for v in (mask, ids) if v is not None},
                       f"{{after={self.after}}}")
        rw.remap[hidden] = pruned
        for node in downstream:
            rw.rewrite(node)
        fn.outputs = [rw.remap.get(o, o) for o in fn.outputs]
        eliminate_dead_code(fn)
        return True
