"""Model map: find the transformer structure (embedding, layer stack, attention, norms, MLP, heads) in IR.

Roles are identified from dataflow — an attention is a ``scaled_dot_product_attention`` node or a
``matmul -> softmax -> matmul`` chain; a residual add is an ``aten.add`` whose other operand is the value that
feeds the layer's norm/projections; an RMSNorm is the ``pow/mean/add eps/rsqrt/mul`` chain — while the node
``loc`` (module path) only groups nodes into layers and names things. Whatever could not be matched is listed in
``ModelMap.unrecognized`` with a human-readable reason instead of being guessed.

Masks are classified (causal / bidirectional / custom) by *evaluating* the mask subgraph on small synthetic
inputs: the mask never depends on activation values, only on shapes (and on a padding-mask input, which is fed
all-ones, i.e. no padding), so this is exact for the shapes tried and robust to however the model spells it.

Use :func:`build_model_map` (cached through the analysis manager; a pass that changes the graph invalidates it).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Literal

import torch

from elision.ir.core import Function, Module, Node, Value, map_values
from elision.ir.ops import resolve_op
from elision.ir.symbolic import evaluate
from elision.ir.types import ScalarType, TensorType
from elision.analysis.cache import analyses

ModelKind = Literal["decoder", "encoder", "vision", "vision-language", "unknown"]

# Ops that only move, copy or re-type data: looked through when following the residual stream or a projection.
TRANSPARENT_OPS = {
    "aten.clone.default", "aten.alias.default", "aten.detach.default", "aten.contiguous.default",
    "aten._to_copy.default", "aten.to.dtype", "aten.dropout.default", "aten.lift_fresh_copy.default",
}
LAYOUT_OPS = TRANSPARENT_OPS | {
    "aten.view.default", "aten.reshape.default", "aten._unsafe_view.default", "aten.transpose.int",
    "aten.permute.default", "aten.unsqueeze.default", "aten.squeeze.dim", "aten.expand.default",
    "aten.slice.Tensor", "aten.t.default", "aten.flatten.using_ints",
}
SOFTMAX_OPS = {"aten.softmax.int", "aten._softmax.default", "aten._safe_softmax.default"}
MATMUL_OPS = {"aten.matmul.default", "aten.bmm.default"}
SDPA_OPS = {"aten.scaled_dot_product_attention.default"}
ADD_OPS = {"aten.add.Tensor"}


# --------------------------------------------------------------------------------------------- records
@dataclass
class Linear:
    """``y = x @ W^T + b`` however it was spelled (aten.linear, addmm on a flattened input, mm/matmul)."""

    node: Node                 # the node doing the matmul
    weight: str                # parameter name
    bias: str | None
    input: Value               # activation as it enters (before any flatten)
    output: Value              # result (after the un-flatten view, if any)
    in_features: int
    out_features: int
    nodes: list[Node] = field(default_factory=list)  # every node of the linear (flatten, matmul, unflatten)

    @property
    def loc(self) -> str:
        return self.node.loc


@dataclass
class Norm:
    kind: Literal["layernorm", "rmsnorm"]
    nodes: list[Node]
    input: Value
    output: Value
    weight: str | None
    bias: str | None
    eps: float

    @property
    def loc(self) -> str:
        return next((n.loc for n in reversed(self.nodes) if n.loc), "")


@dataclass
class Embedding:
    node: Node
    param: str
    input: Value               # the index tensor (token ids)
    output: Value
    num_embeddings: int
    dim: int


@dataclass
class Attention:
    kind: Literal["sdpa", "explicit", "fused"]
    nodes: list[Node]          # [sdpa] or [matmul, ..., softmax, ..., matmul] or [elision.attention]
    output: Value              # [B, Hq, Lq, D] attention result
    q: Value
    k: Value
    v: Value
    q_proj: Linear | None
    k_proj: Linear | None
    v_proj: Linear | None
    o_proj: Linear | None
    num_heads: int | None
    num_kv_heads: int | None
    head_dim: int | None
    causal: bool | None        # None: the mask could not be classified
    mask: Value | None         # the mask tensor as the attention consumes it
    mask_nodes: list[Node]     # nodes computing the mask (its subgraph) and applying it (explicit form)
    rotary: bool
    mask_kind: str = "none"    # none | causal | bidirectional | custom | unknown
    mask_form: str = "none"    # sdpa-bool (True=keep) | additive | masked_fill (True=drop) | none
    mask_fill: float | None = None  # masked_fill value (explicit form)
    mask_depends_on_input: bool = False  # computed from a model input (padding mask)
    scale: float | None = None  # softmax scale (None: 1/sqrt(head_dim))
    mask_scale: float = 1.0     # explicit form: factor applied to the mask too (scaling after the mask add)
    packed_qkv: bool = False    # one projection produces q, k and v (GPT-2 c_attn)
    k_unrepeated: Value | None = None  # k/v before GQA head repetition (expand or repeat_interleave)
    v_unrepeated: Value | None = None
    loc: str = ""

    @property
    def node(self) -> Node:
        return self.nodes[-1]


@dataclass
class MLP:
    nodes: list[Node]
    input: Value
    output: Value
    gated: bool
    linears: list[Linear] = field(default_factory=list)
    activation: str = ""


@dataclass
class Layer:
    index: int
    loc: str                   # e.g. "model.layers.3"
    input: Value               # residual stream entering the layer
    output: Value              # residual stream leaving the layer
    attention: Attention
    mlp: MLP | None
    norms: list[Norm]
    residual_adds: list[Node]  # [attention-branch add, mlp-branch add]
    attn_branch: tuple[Value, Value]      # (branch start, branch end = the add operand that is not the residual)
    mlp_branch: tuple[Value, Value] | None
    post_norm: bool = False    # BERT-style: the norm follows the residual add
    stack: str = ""            # loc of the stack ("model.layers")


@dataclass
class PatchEmbed:
    node: Node
    weight: str
    bias: str | None
    input: Value               # pixel values
    output: Value              # tokens [B, N, C]
    patch_size: tuple[int, ...]
    num_patches: int | None
    dim: int


@dataclass
class ClsToken:
    param: str
    node: Node                 # the cat that prepends it
    index: int                 # position of the token in the sequence (0: prepended)
    how: str


@dataclass
class ModelMap:
    kind: ModelKind
    embedding: Embedding | None
    layers: list[Layer]
    final_norm: Norm | None
    lm_head: Linear | None
    patch_embed: PatchEmbed | None
    cls_token: ClsToken | None
    position_ids: Value | None
    position_nodes: list[Node]
    attention_mask: list[Node]
    unrecognized: list[str]
    stacks: dict[str, list[Layer]] = field(default_factory=dict)   # every layer stack (VLMs have two)
    position_embedding: Embedding | None = None
    image_merge: Node | None = None   # VLM: where image features enter the token sequence
    extra_embeddings: list[Embedding] = field(default_factory=list)  # token-type / segment embeddings
    projector: list[Linear] = field(default_factory=list)  # VLM: linears from the vision stack to the merge
    attentions: list[Attention] = field(default_factory=list)  # every recognized attention, in graph order
    norms: list[Norm] = field(default_factory=list)            # every recognized norm, in graph order
    fn_name: str = "forward"
    op_histogram: dict[str, int] = field(default_factory=dict)

    # ---- text ------------------------------------------------------------------------------------
    def describe(self) -> list[str]:
        lines = [f"model kind: {self.kind}"]
        if self.embedding:
            e = self.embedding
            lines.append(f"token embedding: {e.param} ({e.num_embeddings} x {e.dim}) indexed by %{e.input.name}")
        for e in self.extra_embeddings:
            lines.append(f"extra embedding summed into the tokens: {e.param}")
        if self.position_embedding:
            lines.append(f"position embedding: {self.position_embedding.param}")
        if self.patch_embed:
            p = self.patch_embed
            lines.append(f"patch embedding: {p.weight} patch {'x'.join(map(str, p.patch_size))} -> "
                         f"{p.num_patches if p.num_patches is not None else '?'} patches of dim {p.dim}")
        if self.cls_token:
            lines.append(f"[CLS] token: {self.cls_token.param} ({self.cls_token.how})")
        if self.image_merge is not None:
            lines.append(f"image features merged into the token sequence at %{self.image_merge.result.name} "
                         f"({self.image_merge.op})")
        if self.projector:
            lines.append(f"image projector: {len(self.projector)} linear(s) "
                         f"({', '.join(p.weight for p in self.projector)})")
        if self.position_ids is not None:
            lines.append(f"position ids: %{self.position_ids.name} ({len(self.position_nodes)} nodes)")
        if self.attention_mask:
            lines.append(f"attention mask subgraph: {len(self.attention_mask)} nodes")
        for stack, layers in self.stacks.items():
            lines.append(f"layer stack {stack or '(no loc)'}: {len(layers)} layers")
            for ly in layers:
                a = ly.attention
                mlp = "none" if ly.mlp is None else ("gated" if ly.mlp.gated else "plain") + (
                    f" ({ly.mlp.activation})" if ly.mlp.activation else "")
                norms = "+".join(n.kind for n in ly.norms) or "none"
                projs = "".join(c for c, p in zip("qkvo", (a.q_proj, a.k_proj, a.v_proj, a.o_proj)) if p is not None)
                lines.append(
                    f"  [{ly.index}] {ly.loc}: attention {a.kind} heads={a.num_heads} kv_heads={a.num_kv_heads} "
                    f"head_dim={a.head_dim} mask={a.mask_kind}{' (from input)' if a.mask_depends_on_input else ''}"
                    f"{' rotary' if a.rotary else ''}{' packed-qkv' if a.packed_qkv else ''} proj={projs or '-'}; "
                    f"mlp {mlp}; norms {norms}{' (post-norm)' if ly.post_norm else ''}")
        if self.final_norm:
            lines.append(f"final norm: {self.final_norm.kind} ({self.final_norm.weight})")
        if self.lm_head:
            lines.append(f"LM head: {self.lm_head.weight} ({self.lm_head.in_features} -> {self.lm_head.out_features})")
        if self.unrecognized:
            lines.append("not recognized:")
            lines += [f"  - {u}" for u in self.unrecognized]
        return lines

    def applicable_rewrites(self) -> list[tuple[str, bool, str]]:
        """(rewrite, applies, one-line reason) for each rewrite elision knows."""
        out: list[tuple[str, bool, str]] = []
        causal = bool(self.layers) and all(ly.attention.causal for ly in self.layers)
        if self.lm_head is not None and causal:
            out.append(("speculative-decoding", True, f"causal decoder with an LM head ({len(self.layers)} layers)"))
        else:
            why = "no LM head" if self.lm_head is None else "attention is not causal"
            out.append(("speculative-decoding", False, why))
        bidir = [ly for ly in self.layers if ly.attention.causal is False]
        vision = [ly for st in self.stacks.values() for ly in st if ly.attention.causal is False]
        if self.kind in ("encoder", "vision", "vision-language") and (bidir or vision):
            what = {"encoder": "bidirectional encoder", "vision": "ViT tokens",
                    "vision-language": "image tokens in a vision-language model"}[self.kind]
            out.append(("token-pruning", True, f"{what}: tokens can be dropped between layers"))
        else:
            out.append(("token-pruning", False, "needs an encoder, ViT or VLM token sequence"
                        + ("" if self.kind == "unknown" else f" (this is a {self.kind})")))
        n = sum(len(s) for s in self.stacks.values())
        if n >= 2:
            out.append(("layer-skipping", True, f"{n} residual layers whose branches can be skipped"))
        else:
            out.append(("layer-skipping", False, "needs a stack of at least 2 recognized residual layers"))
        cross = [ly for st in self.stacks.values() for ly in st
                 if ly.attention.q_proj is not None and ly.attention.k_proj is not None
                 and ly.attention.q_proj.input != ly.attention.k_proj.input]
        if cross:
            out.append(("sparse-volume", True, f"{len(cross)} query/latent cross-attention layer(s)"))
        else:
            out.append(("sparse-volume", False, "no query/latent cross-attention found"))
        return out

    def as_dict(self) -> dict:
        def lin(x: Linear | None):
            return None if x is None else {"weight": x.weight, "bias": x.bias, "in": x.in_features,
                                           "out": x.out_features, "node": x.node.result.name, "loc": x.loc}

        def norm(n: Norm | None):
            return None if n is None else {"kind": n.kind, "weight": n.weight, "bias": n.bias, "eps": n.eps,
                                           "input": n.input.name, "output": n.output.name}

        def layer(ly: Layer):
            a = ly.attention
            return {
                "index": ly.index, "loc": ly.loc, "input": ly.input.name, "output": ly.output.name,
                "post_norm": ly.post_norm,
                "attention": {"kind": a.kind, "num_heads": a.num_heads, "num_kv_heads": a.num_kv_heads,
                              "head_dim": a.head_dim, "causal": a.causal, "mask_kind": a.mask_kind,
                              "mask_from_input": a.mask_depends_on_input, "rotary": a.rotary,
                              "packed_qkv": a.packed_qkv, "q_proj": lin(a.q_proj), "k_proj": lin(a.k_proj),
                              "v_proj": lin(a.v_proj), "o_proj": lin(a.o_proj), "scale": a.scale},
                "mlp": None if ly.mlp is None else {"gated": ly.mlp.gated, "activation": ly.mlp.activation,
                                                     "linears": [lin(x) for x in ly.mlp.linears]},
                "norms": [norm(n) for n in ly.norms],
                "residual_adds": [n.result.name for n in ly.residual_adds],
            }

        return {
            "kind": self.kind,
            "embedding": None if self.embedding is None else {
                "param": self.embedding.param, "input": self.embedding.input.name,
                "num_embeddings": self.embedding.num_embeddings, "dim": self.embedding.dim},
            "position_embedding": None if self.position_embedding is None else self.position_embedding.param,
            "patch_embed": None if self.patch_embed is None else {
                "weight": self.patch_embed.weight, "patch_size": list(self.patch_embed.patch_size),
                "num_patches": self.patch_embed.num_patches, "dim": self.patch_embed.dim},
            "cls_token": None if self.cls_token is None else {"param": self.cls_token.param, "how": self.cls_token.how},
            "position_ids": None if self.position_ids is None else self.position_ids.name,
            "extra_embeddings": [e.param for e in self.extra_embeddings],
            "projector": [p.weight for p in self.projector],
            "attention_mask_nodes": len(self.attention_mask),
            "stacks": {k: [layer(ly) for ly in v] for k, v in self.stacks.items()},
            "num_layers": len(self.layers),
            "final_norm": norm(self.final_norm),
            "lm_head": lin(self.lm_head),
            "unrecognized": list(self.unrecognized),
            "applicable_rewrites": [{"rewrite": r, "applies": ok, "reason": why}
                                    for r, ok, why in self.applicable_rewrites()],
        }


# --------------------------------------------------------------------------------------------- graph helpers
class _Graph:
    """Producer/user lookups over one function, plus the small dataflow queries the matchers need."""

    def __init__(self, module: Module, fn: Function):
        self.module, self.fn = module, fn
        self.prod: dict[Value, Node] = fn.producers()
        # assertions (``_assert_tensor_metadata``) are not data uses: they would break single-user chains
        self.uses: dict[Value, list[Node]] = {}
        for n in fn.nodes:
            if n.op.startswith(("aten._assert", "aten.sym_constrain_range")):
                continue
            for i in n.inputs:
                self.uses.setdefault(i, []).append(n)
        self.order = {n.result: i for i, n in enumerate(fn.nodes)}
        self.inputs = set(fn.inputs)
        self._anc: dict[Value, frozenset] = {}

    def op(self, v: Value) -> str:
        p = self.prod.get(v)
        return p.op if p is not None else "input"

    def param_name(self, v: Value) -> str | None:
        """The parameter a value reads, looking through transposes and casts of the parameter."""
        for _ in range(4):
            p = self.prod.get(v)
            if p is None:
                return None
            if p.op == "param":
                return p.args[0]
            if p.op in ("aten.t.default", "aten.permute.default", "aten.transpose.int") or p.op in TRANSPARENT_OPS:
                v = p.args[0]
                continue
            return None
        return None

    def through(self, v: Value, ops: set[str] = TRANSPARENT_OPS) -> Value:
        """Walk back from ``v`` through ops in ``ops`` (first tensor argument) to the first other value."""
        while True:
            p = self.prod.get(v)
            if p is None or p.op not in ops or not p.args or not isinstance(p.args[0], Value):
                return v
            v = p.args[0]

    def forward_through(self, v: Value, ops: set[str] = TRANSPARENT_OPS) -> Value:
        """Follow single-user chains of ``ops`` forward from ``v``."""
        while True:
            us = self.uses.get(v, [])
            if len(us) != 1 or us[0].op not in ops or us[0].args[0] != v:
                return v
            v = us[0].result

    def ancestors(self, v: Value) -> frozenset:
        if v in self._anc:
            return self._anc[v]
        out: set[Value] = set()
        stack = [v]
        while stack:
            x = stack.pop()
            p = self.prod.get(x)
            if p is None:
                continue
            for i in p.inputs:
                if i not in out:
                    out.add(i)
                    stack.append(i)
        res = frozenset(out)
        self._anc[v] = res
        return res

    def nodes_between(self, start: Iterable[Value], end: Value) -> list[Node]:
        """Nodes on a path from any ``start`` value to ``end`` (excluding start producers, including end's)."""
        start = set(start)
        up = self.ancestors(end) | {end}
        keep = []
        reach = set(start)
        for n in self.fn.nodes:
            if n.result in up and any(i in reach for i in n.inputs):
                reach.add(n.result)
                keep.append(n)
        return keep

    def const_param_only(self, v: Value) -> bool:
        """True when ``v`` depends on no function input (params and constants only)."""
        return not (self.ancestors(v) | {v}) & self.inputs


def _tensor_shape(v: Value) -> tuple | None:
    return v.type.shape if isinstance(v.type, TensorType) else None


def _opname(n: Node) -> str:
    """``aten.linear.default`` -> ``linear``; ``getitem`` -> ``getitem``."""
    parts = n.op.split(".")
    return parts[1] if len(parts) == 3 else parts[-1]


def _is_scalar_const(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


# --------------------------------------------------------------------------------------------- matchers
def _match_linear(g: _Graph, n: Node) -> Linear | None:
    op = n.op
    if op == "aten.linear.default":
        w = g.param_name(n.args[1]) if len(n.args) > 1 and isinstance(n.args[1], Value) else None
        if w is None:
            return None
        b_arg = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
        b = g.param_name(b_arg) if isinstance(b_arg, Value) else None
        wt = g.module.params[w]
        if wt.dim() != 2:
            return None
        return Linear(n, w, b, n.args[0], n.result, int(wt.shape[1]), int(wt.shape[0]), [n])
    if op in ("aten.addmm.default", "aten.mm.default", "aten.matmul.default"):
        if op == "aten.addmm.default":
            bias_v, x, wv = n.args[0], n.args[1], n.args[2]
        else:
            bias_v, x, wv = None, n.args[0], n.args[1]
        if not isinstance(wv, Value) or not isinstance(x, Value):
            return None
        w = g.param_name(wv)
        if w is None or g.module.params[w].dim() != 2:
            return None
        # mm(x, W) with W [in, out] (Conv1D) or mm(x, t(W)) with W [out, in]
        wshape = _tensor_shape(wv)
        if wshape is None or len(wshape) != 2:
            return None
        in_f, out_f = int(wshape[0]), int(wshape[1])
        b = g.param_name(bias_v) if isinstance(bias_v, Value) else None
        nodes = [n]
        inp, out = x, n.result
        px = g.prod.get(x)
        if px is not None and px.op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
            inp = px.args[0]
            nodes.insert(0, px)
        us = g.uses.get(n.result, [])
        if len(us) == 1 and us[0].op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default"):
            out = us[0].result
            nodes.append(us[0])
        return Linear(n, w, b, inp, out, in_f, out_f, nodes)
    return None


def _scalar_arg(n: Node, i: int):
    return n.args[i] if len(n.args) > i else None


def _match_rmsnorm(g: _Graph, rsqrt: Node) -> Norm | None:
    """rsqrt(mean(x^2) + eps) * x [* weight], with the HF casts around it."""
    add = g.prod.get(rsqrt.args[0]) if isinstance(rsqrt.args[0], Value) else None
    eps = 0.0
    if add is not None and add.op == "aten.add.Tensor" and _is_scalar_const(_scalar_arg(add, 1)):
        eps = float(add.args[1])
        mean = g.prod.get(add.args[0])
    else:
        mean = add
    if mean is None or mean.op != "aten.mean.dim":
        return None
    dims = mean.args[1] if len(mean.args) > 1 else None
    keep = mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim", False)
    if not keep or not isinstance(dims, (list, tuple)) or len(dims) != 1:
        return None
    sq = g.prod.get(mean.args[0])
    if sq is None:
        return None
    if sq.op == "aten.pow.Tensor_Scalar" and sq.args[1] == 2:
        xf = sq.args[0]
    elif sq.op == "aten.mul.Tensor" and sq.args[0] == sq.args[1]:
        xf = sq.args[0]
    else:
        return None
    rank = len(_tensor_shape(xf) or ())
    if dims[0] not in (-1, rank - 1):
        return None
    # x * rsqrt
    muls = [u for u in g.uses.get(rsqrt.result, []) if u.op == "aten.mul.Tensor" and xf in u.args[:2]]
    if len(muls) != 1:
        return None
    nodes = [n for n in (sq, mean, add, rsqrt, muls[0]) if n is not None]
    x = g.through(xf, {"aten._to_copy.default", "aten.to.dtype"})
    for c in g.fn.nodes:  # the cast to fp32 (when present) belongs to the norm
        if c.result == xf and c is not g.prod.get(x) and c.op in ("aten._to_copy.default", "aten.to.dtype"):
            nodes.insert(0, c)
    out = muls[0].result
    # optional cast back to the input dtype, then the weight multiply
    nxt = g.forward_through(out, {"aten._to_copy.default", "aten.to.dtype"})
    chain = out
    while chain != nxt:
        u = g.uses[chain][0]
        nodes.append(u)
        chain = u.result
    weight = None
    us = g.uses.get(nxt, [])
    if len(us) == 1 and us[0].op == "aten.mul.Tensor":
        other = us[0].args[1] if us[0].args[0] == nxt else us[0].args[0]
        if isinstance(other, Value):
            pname = g.param_name(other)
            shape = _tensor_shape(other)
            if pname is not None and shape is not None and len(shape) == 1:
                weight = pname
                nodes.append(us[0])
                nxt = us[0].result
    return Norm("rmsnorm", nodes, x, nxt, weight, None, eps)


def _match_layernorm(g: _Graph, n: Node) -> Norm | None:
    if n.op == "aten.layer_norm.default":
        args = list(n.args) + [None] * (5 - len(n.args))
        w = g.param_name(args[2]) if isinstance(args[2], Value) else None
        b = g.param_name(args[3]) if isinstance(args[3], Value) else None
        eps = float(args[4]) if args[4] is not None else float(n.kwargs.get("eps", 1e-5))
        return Norm("layernorm", [n], n.args[0], n.result, w, b, eps)
    if n.op == "aten.native_layer_norm.default":
        gets = [u for u in g.uses.get(n.result, []) if u.op == "getitem" and u.args[1] == 0]
        if len(gets) != 1:
            return None
        w = g.param_name(n.args[2]) if isinstance(n.args[2], Value) else None
        b = g.param_name(n.args[3]) if isinstance(n.args[3], Value) else None
        return Norm("layernorm", [n, gets[0]], n.args[0], gets[0].result, w, b, float(n.args[4]))
    return None


def _strip_rotary(g: _Graph, v: Value) -> tuple[Value, bool, list[Node]]:
    """If ``v = x*cos + rotate_half(x)*sin`` return (x, True, rotary nodes); else (v, False, [])."""
    p = g.prod.get(v)
    if p is None or p.op != "aten.add.Tensor" or not all(isinstance(a, Value) for a in p.args[:2]):
        return v, False, []
    m1, m2 = g.prod.get(p.args[0]), g.prod.get(p.args[1])
    if m1 is None or m2 is None or m1.op != "aten.mul.Tensor" or m2.op != "aten.mul.Tensor":
        return v, False, []
    for a, b in ((m1, m2), (m2, m1)):
        # a = x * cos ; b = cat(-x2, x1) * sin
        for xi in (0, 1):
            x = a.args[xi]
            for ri in (0, 1):
                r = b.args[ri]
                rp = g.prod.get(r) if isinstance(r, Value) else None
                if rp is None or rp.op != "aten.cat.default":
                    continue
                ins = [i for i in rp.inputs]
                if all(x in g.ancestors(i) for i in ins):
                    nodes = [a, b, p, rp] + [g.prod[i] for i in ins if i in g.prod]
                    return x, True, nodes
    return v, False, []


_REPEAT_OPS = {"aten.repeat_interleave.self_int"}


def _strip_gqa_repeat(g: _Graph, v: Value) -> Value | None:
    """k/v before ``repeat_kv`` (unsqueeze(2)+expand+clone+view) or ``repeat_interleave(dim=1)``."""
    p = g.prod.get(v)
    if p is None:
        return None
    if p.op in _REPEAT_OPS and len(p.args) >= 3 and p.args[2] == 1:
        return p.args[0]
    if p.op in ("aten._unsafe_view.default", "aten.view.default", "aten.reshape.default"):
        c = g.prod.get(p.args[0])
        if c is not None and c.op in ("aten.clone.default", "aten.contiguous.default"):
            c = g.prod.get(c.args[0])
        if c is None or c.op != "aten.expand.default":
            return None
        src = g.through(c.args[0], {"aten.slice.Tensor"})
        u = g.prod.get(src)
        if u is None or u.op != "aten.unsqueeze.default" or u.args[1] != 2:
            return None
        base = g.through(u.args[0], {"aten.slice.Tensor"})
        return base
    return None


def _find_projection(g: _Graph, v: Value, linears: dict[Value, Linear],
                     norms: dict[Value, "Norm"] | None = None) -> tuple[Linear | None, bool, list[Node]]:
    """Walk back from q/k/v (as attention reads them) through layout ops, rotary, per-head norms (q/k norm) and
    split to the projection."""
    rotary = False
    rot_nodes: list[Node] = []
    for _ in range(32):
        if v in linears:
            return linears[v], rotary, rot_nodes
        if norms and v in norms:
            v = norms[v].input
            continue
        x, is_rot, nodes = _strip_rotary(g, v)
        if is_rot:
            rotary, v = True, x
            rot_nodes += nodes
            continue
        p = g.prod.get(v)
        if p is None:
            return None, rotary, rot_nodes
        if p.op in LAYOUT_OPS or p.op in _REPEAT_OPS:
            v = p.args[0]
            continue
        if p.op == "aten.cat.default":  # cat with an empty (cache) tensor is the identity
            parts = [x for x in p.args[0] if isinstance(x, Value)]
            live = [x for x in parts if 0 not in (_tensor_shape(x) or (1,))]
            if len(live) == 1 and len(parts) == len(p.args[0]):
                v = live[0]
                continue
        if p.op == "getitem":  # split of a packed projection
            sp = g.prod.get(p.args[0])
            if sp is not None and sp.op in ("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default",
                                            "aten.unbind.int"):
                v = sp.args[0]
                continue
        if p.op == "aten.mul.Tensor" and _is_scalar_const(p.args[1]):  # pre-scaled q
            v = p.args[0]
            continue
        return None, rotary, rot_nodes
    return None, rotary, rot_nodes


def _expand_to_4d(v: Value) -> tuple | None:
    s = _tensor_shape(v)
    return s if s is not None and len(s) == 4 else None


def _match_explicit_attention(g: _Graph, sm: Node) -> dict | None:
    """softmax(mask(scale * q @ k^T)) @ v."""
    dim = sm.args[1] if len(sm.args) > 1 else sm.kwargs.get("dim")
    if dim not in (-1, 3):
        return None
    nodes = [sm]
    # forward: optional casts / dropout, then matmul(p, v)
    out = g.forward_through(sm.result)
    chain = sm.result
    while chain != out:
        u = g.uses[chain][0]
        nodes.append(u)
        chain = u.result
    pv = [u for u in g.uses.get(out, []) if u.op in MATMUL_OPS and u.args[0] == out]
    if len(pv) != 1:
        return None
    v = pv[0].args[1]
    # backward: casts, mask application, scaling, down to matmul(q, k^T)
    x = sm.args[0]
    mask, form, fill, scale = None, "none", None, 1.0
    mask_scale = 1.0  # scaling applied after the mask (it scales the mask too)
    mask_apply: list[Node] = []
    for _ in range(12):
        p = g.prod.get(x)
        if p is None:
            return None
        if p.op in MATMUL_OPS:
            break
        if p.op in ("aten._to_copy.default", "aten.to.dtype", "aten.clone.default"):
            nodes.insert(0, p)
            x = p.args[0]
            continue
        if p.op == "aten.add.Tensor" and all(isinstance(a, Value) for a in p.args[:2]):
            # scores + additive mask: the mask side does not depend on q/k
            a, b = p.args[0], p.args[1]
            sa = any(g.op(w) in MATMUL_OPS for w in g.ancestors(a) | {a})
            score, m = (a, b) if sa else (b, a)
            if mask is not None:
                return None
            mask, form = m, "additive"
            mask_apply.append(p)
            nodes.insert(0, p)
            x = score
            continue
        if p.op in ("aten.masked_fill.Scalar", "aten.masked_fill.Tensor"):
            if mask is not None or not _is_scalar_const(p.args[2]):
                return None
            mask, form, fill = p.args[1], "masked_fill", float(p.args[2])
            mask_apply.append(p)
            nodes.insert(0, p)
            x = p.args[0]
            continue
        if p.op == "aten.where.self" and isinstance(p.args[0], Value):
            # where(keep, scores, -inf)
            if mask is not None or not isinstance(p.args[1], Value):
                return None
            fillv = p.args[2]
            fp = g.prod.get(fillv) if isinstance(fillv, Value) else None
            if fp is not None and fp.op in ("aten.full.default", "aten.scalar_tensor.default"):
                fill = float(fp.args[1] if fp.op == "aten.full.default" else fp.args[0])
            elif _is_scalar_const(fillv):
                fill = float(fillv)
            else:
                return None
            mask, form = p.args[0], "where-keep"
            mask_apply.append(p)
            nodes.insert(0, p)
            x = p.args[1]
            continue
        if p.op in ("aten.div.Tensor", "aten.mul.Tensor") and _is_scalar_const(p.args[1]):
            c = float(p.args[1])
            c = (1.0 / c) if p.op == "aten.div.Tensor" else c
            scale *= c
            if mask is None:
                mask_scale *= c
            nodes.insert(0, p)
            x = p.args[0]
            continue
        return None
    qk = g.prod.get(x)
    if qk is None or qk.op not in MATMUL_OPS:
        return None
    nodes.insert(0, qk)
    nodes.append(pv[0])
    q, kt = qk.args[0], qk.args[1]
    ktp = g.prod.get(kt)
    if ktp is None or ktp.op != "aten.transpose.int" or sorted(a % 4 for a in ktp.args[1:3]) != [2, 3]:
        if ktp is not None and ktp.op == "aten.permute.default" and list(ktp.args[1])[-2:] in ([3, 2], [-1, -2]):
            pass
        else:
            return None
    k = ktp.args[0]
    # scale folded into q (q * c) before the matmul
    qp = g.prod.get(q)
    if qp is not None and qp.op == "aten.mul.Tensor" and _is_scalar_const(qp.args[1]):
        scale *= float(qp.args[1])
        q = qp.args[0]
        nodes.insert(0, qp)
    if _expand_to_4d(q) is None or _expand_to_4d(k) is None or _expand_to_4d(v) is None:
        return None
    return dict(nodes=nodes, q=q, k=k, v=v, output=pv[0].result, mask=mask, form=form, fill=fill, scale=scale,
                mask_apply=mask_apply, mask_scale=mask_scale if mask is not None else 1.0)


# --------------------------------------------------------------------------------------------- mask evaluation
def _example_value(v: Value, bindings: dict[str, int], gen: torch.Generator):
    t = v.type
    if isinstance(t, TensorType):
        shape = [evaluate(d, bindings) for d in t.shape]
        if t.dtype in ("i64", "i32", "i16", "i8", "u8"):
            return torch.ones(shape, dtype=t.torch_dtype)  # token 1 / "attend" for padding masks
        if t.dtype == "bool":
            return torch.ones(shape, dtype=torch.bool)
        return torch.randn(shape, generator=gen).to(t.torch_dtype)
    if isinstance(t, ScalarType) and t.kind == "int" and t.expr is not None:
        return evaluate(int(t.expr) if t.expr.lstrip("-").isdigit() else t.expr, bindings)
    raise ValueError(f"cannot make an example for %{v.name} : {t}")


def _evaluate_values(g: _Graph, targets: list[Value], sizes: dict[str, int]) -> dict[Value, object]:
    """Run the nodes that ``targets`` depend on, with synthetic inputs whose symbolic dims are ``sizes``."""
    need: set[Value] = set(targets)
    for t in targets:
        need |= g.ancestors(t)
    gen = torch.Generator().manual_seed(0)
    env: dict[Value, object] = {}
    syms: set[str] = set()
    for v in g.fn.inputs:
        if isinstance(v.type, TensorType):
            syms |= v.type.symbols()
    bindings = {s: sizes.get(s, 7) for s in syms}
    for v in g.fn.inputs:
        if v in need:
            env[v] = _example_value(v, bindings, gen)
    for n in g.fn.nodes:
        if n.result not in need:
            continue
        if n.op == "param":
            env[n.result] = g.module.params[n.args[0]]
            continue
        env[n.result] = resolve_op(n.op)(*map_values(n.args, env.__getitem__), **map_values(n.kwargs, env.__getitem__))
    return {t: env[t] for t in targets}


class _ArbitraryBias(Exception):
    """The mask is a general additive bias, not a keep/drop pattern."""


def _classify_mask(allowed: torch.Tensor) -> str:
    lq, lk = allowed.shape[-2], allowed.shape[-1]
    a = allowed.reshape(-1, lq, lk)
    if bool(a.all()):
        return "bidirectional"
    causal = torch.ones(lq, lk, dtype=torch.bool).tril(diagonal=lk - lq)
    if bool((a == causal).all()):
        return "causal"
    return "custom"


def _allowed_from_mask(value: torch.Tensor, form: str, fill: float | None) -> torch.Tensor:
    if form in ("sdpa-bool", "where-keep"):
        return value.bool() if value.dtype == torch.bool else value != 0
    if form == "masked_fill":
        drop = value.bool()
        return ~drop if fill is not None and fill < -1e3 else torch.ones_like(drop)
    # additive float
    return value.float() > -1e3


# --------------------------------------------------------------------------------------------- builder
def _layer_of(loc: str) -> tuple[str, int] | None:
    # first numbered component, not the last: "layers.0.mlp.experts.3" belongs to layer 0
    parts = loc.split(".")
    for i, p in enumerate(parts):
        if p.isdigit() and i > 0:
            return ".".join(parts[:i]), int(p)
    return None


class _Builder:
    def __init__(self, module: Module, fn_name: str):
        if fn_name not in module.functions:
            raise KeyError(f"module has no function @{fn_name}; functions: {', '.join(module.functions)}")
        self.module = module
        self.fn = module.functions[fn_name]
        self.fn_name = fn_name
        self.g = _Graph(module, self.fn)
        self.notes: list[str] = []
        self.claimed: set[int] = set()  # ids of nodes explained by a recognized structure
        self.extra_embeddings: list[Embedding] = []
        # passes that splice a token-reducing op into the residual stream inside a layer (merge-tokens, between
        # attention and MLP) record where the stream continues: attention residual add (pre-norm) or attention
        # LayerNorm output (post-norm) -> value the MLP reads
        values = {v.name: v for v in self.fn.values()}
        self.stream_continues = {a: values[b] for a, b in module.attrs.get(f"residual_stream.{fn_name}", {}).items()
                                 if b in values}

    def claim(self, nodes: Iterable[Node]) -> None:
        self.claimed.update(id(n) for n in nodes)

    def build(self) -> ModelMap:
        g = self.g
        self.linears: dict[Value, Linear] = {}
        for n in self.fn.nodes:
            lin = _match_linear(g, n)
            if lin is not None:
                self.linears[lin.output] = lin
        self.lin_by_node = {id(l.node): l for l in self.linears.values()}
        self.norms = self._find_norms()
        self.norm_by_out = {n.output: n for n in self.norms}
        attentions = self._find_attentions()
        self._classify_masks(attentions)
        layers = self._build_layers(attentions)
        stacks: dict[str, list[Layer]] = {}
        for ly in layers:
            stacks.setdefault(ly.stack, []).append(ly)
        embedding, pos_emb = self._find_embeddings()
        patch, cls_tok = self._find_patch_embed()
        merge = self._find_image_merge()
        projector = self._find_projector(merge, stacks)
        self.stacks_found = list(stacks.values())
        main = self._main_stack(stacks, embedding)
        final_norm, lm_head = self._find_head(main)
        position_ids, position_nodes = self._find_position_ids(attentions, pos_emb)
        mask_nodes: list[Node] = []
        seen: set[int] = set()
        for a in attentions:
            for n in a.mask_nodes:
                if id(n) not in seen:
                    seen.add(id(n))
                    mask_nodes.append(n)
        kind = self._kind(main, embedding, patch, lm_head, stacks)
        self._coverage_notes()
        hist: dict[str, int] = {}
        for n in self.fn.nodes:
            hist[n.op] = hist.get(n.op, 0) + 1
        return ModelMap(kind=kind, embedding=embedding, layers=main, final_norm=final_norm, lm_head=lm_head,
                        patch_embed=patch, cls_token=cls_tok, position_ids=position_ids,
                        position_nodes=position_nodes, attention_mask=mask_nodes, unrecognized=self.notes,
                        stacks=stacks, position_embedding=pos_emb, image_merge=merge, fn_name=self.fn_name,
                        extra_embeddings=self.extra_embeddings, projector=projector,
                        attentions=attentions, norms=self.norms,
                        op_histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])))

    # ---- norms ---------------------------------------------------------------------------------
    def _find_norms(self) -> list[Norm]:
        out = []
        for n in self.fn.nodes:
            norm = None
            if n.op in ("aten.layer_norm.default", "aten.native_layer_norm.default"):
                norm = _match_layernorm(self.g, n)
            elif n.op == "aten.rsqrt.default":
                norm = _match_rmsnorm(self.g, n)
            elif n.op in ("elision.rms_norm.default", "elision.layer_norm.default"):
                rms = n.op.startswith("elision.rms")
                w = self.g.param_name(n.args[1]) if isinstance(n.args[1], Value) else None
                b = None if rms or not isinstance(n.args[2], Value) else self.g.param_name(n.args[2])
                norm = Norm("rmsnorm" if rms else "layernorm", [n], n.args[0], n.result, w, b, float(n.args[-1]))
            elif n.op in ("elision.add_rms_norm.default", "elision.add_layer_norm.default"):
                rms = n.op.startswith("elision.add_rms")
                gets = {u.args[1]: u for u in self.g.uses.get(n.result, []) if u.op == "getitem"}
                if 0 in gets:
                    w = self.g.param_name(n.args[2]) if isinstance(n.args[2], Value) else None
                    b = None if rms or not isinstance(n.args[3], Value) else self.g.param_name(n.args[3])
                    summed = gets[1].result if 1 in gets else n.args[0]
                    norm = Norm("rmsnorm" if rms else "layernorm", [n] + list(gets.values()), summed,
                                gets[0].result, w, b, float(n.args[-1]))
            elif n.op == "aten.rms_norm.default":
                w = self.g.param_name(n.args[2]) if len(n.args) > 2 and isinstance(n.args[2], Value) else None
                eps = n.args[3] if len(n.args) > 3 and n.args[3] is not None else 0.0
                norm = Norm("rmsnorm", [n], n.args[0], n.result, w, None, float(eps))
            if norm is not None:
                out.append(norm)
                self.claim(norm.nodes)
        return out

    # ---- attention -----------------------------------------------------------------------------
    def _find_attentions(self) -> list[Attention]:
        g = self.g
        found: list[Attention] = []
        for n in self.fn.nodes:
            if n.op in SDPA_OPS:
                args = list(n.args) + [None] * (4 - len(n.args))
                mask = args[3] if isinstance(args[3], Value) else n.kwargs.get("attn_mask")
                is_causal = bool(n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False))
                scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
                mask = mask if isinstance(mask, Value) else None
                form = "none" if mask is None else ("sdpa-bool" if mask.type.dtype == "bool" else "additive")
                found.append(self._attention("sdpa", [n], n.result, n.args[0], n.args[1], n.args[2], mask, form,
                                             None, scale, is_causal, []))
            elif n.op == "elision.attention.default":
                args = list(n.args) + [None] * (6 - len(n.args))
                bias = args[3] if isinstance(args[3], Value) else None
                att = self._attention("fused", [n], n.result, args[0], args[1], args[2], bias,
                                      "none" if bias is None else "additive", None, args[4], bool(args[5]), [])
                att.k_unrepeated, att.v_unrepeated = args[1], args[2]
                found.append(att)
            elif n.op in SOFTMAX_OPS:
                m = _match_explicit_attention(g, n)
                if m is None:
                    where = f" at {n.loc}" if n.loc else ""
                    self.notes.append(f"softmax %{n.result.name}{where} is not part of a recognized "
                                      f"softmax(QK^T)V attention")
                    continue
                att = self._attention("explicit", m["nodes"], m["output"], m["q"], m["k"], m["v"], m["mask"],
                                      m["form"], m["fill"], m["scale"], False, m["mask_apply"])
                att.mask_scale = m["mask_scale"]
                found.append(att)
        return found

    def _attention(self, kind, nodes, output, q, k, v, mask, form, fill, scale, is_causal, mask_apply) -> Attention:
        g = self.g
        loc = next((n.loc for n in nodes if n.loc), "")
        qp, rq, rn1 = _find_projection(g, q, self.linears, self.norm_by_out)
        kp, rk, rn2 = _find_projection(g, k, self.linears, self.norm_by_out)
        vp, _, _ = _find_projection(g, v, self.linears, self.norm_by_out)
        # o_proj: the first linear fed (through layout ops) by the attention output
        op_ = None
        x = output
        for _ in range(8):
            us = self.g.uses.get(x, [])
            lins = [self.lin_by_node.get(id(u)) for u in us]
            lins = [l for l in lins if l is not None]
            if len(lins) == 1:
                op_ = lins[0]
                break
            nxt = [u for u in us if u.op in LAYOUT_OPS]
            # a linear fed through a flatten view (addmm form)
            hit = [self.lin_by_node.get(id(w)) for u in nxt for w in self.g.uses.get(u.result, [])]
            hit = [h for h in hit if h is not None and h.input == x]
            if hit:
                op_ = hit[0]
                break
            if len(nxt) != 1:
                break
            x = nxt[0].result
        qs = _tensor_shape(q)
        heads = qs[1] if qs and isinstance(qs[1], int) else None
        head_dim = qs[3] if qs and isinstance(qs[3], int) else None
        packed = qp is not None and qp is kp
        # kv heads: the head dim of k as the attention reads it, before any GQA repetition
        k_un, v_un = _strip_gqa_repeat(g, k), _strip_gqa_repeat(g, v)
        if k_un is None or v_un is None or _tensor_shape(k_un) != _tensor_shape(v_un):
            k_un = v_un = None
        src = _tensor_shape(k_un if k_un is not None else k)
        kv_heads = src[1] if src is not None and len(src) == 4 and isinstance(src[1], int) else None
        if kv_heads is None and head_dim and kp is not None:
            kv_heads = (kp.out_features // head_dim - (heads or 0)) // 2 if packed else kp.out_features // head_dim
        mask_nodes: list[Node] = []
        if mask is not None:
            anc = g.ancestors(mask) | {mask}
            mask_nodes = [n for n in self.fn.nodes if n.result in anc and n.op != "param"]
        mask_nodes += [n for n in mask_apply if n not in mask_nodes]
        att = Attention(kind=kind, nodes=nodes, output=output, q=q, k=k, v=v, q_proj=qp, k_proj=kp, v_proj=vp,
                        o_proj=op_, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                        causal=True if is_causal else None, mask=mask, mask_nodes=mask_nodes, rotary=rq or rk,
                        mask_kind="causal" if is_causal else "none", mask_form=form, mask_fill=fill,
                        scale=scale, packed_qkv=packed, k_unrepeated=k_un, v_unrepeated=v_un, loc=loc)
        self.claim(nodes)
        self.claim(rn1 + rn2)
        self.claim(mask_nodes)
        for p in (qp, kp, vp, op_):
            if p is not None:
                self.claim(p.nodes)
        missing = [name for name, p in (("q", qp), ("k", kp), ("v", vp), ("o", op_)) if p is None]
        if missing:
            self.notes.append(f"attention at {loc or '%' + output.name}: no {'/'.join(missing)} projection found "
                              f"(not a linear reached through layout ops)")
        if heads is None or head_dim is None:
            self.notes.append(f"attention at {loc or '%' + output.name}: q is not a [B, H, L, D] tensor with static "
                              f"H and D ({q.type}); head counts unknown")
        return att

    def _classify_masks(self, attentions: list[Attention]) -> None:
        g = self.g
        cache: dict[tuple, tuple[str, bool]] = {}
        for a in attentions:
            if a.mask is None:
                if a.mask_kind != "causal":
                    a.mask_kind, a.causal = "bidirectional", False
                continue
            key = (a.mask, a.mask_form, a.mask_fill)
            if key not in cache:
                from_input = bool((g.ancestors(a.mask) | {a.mask}) & g.inputs)
                kinds = set()
                try:
                    for size in (5, 8):
                        # shapes: inputs' symbolic dims all set to `size`; fixed dims keep their size
                        val = _evaluate_values(g, [a.mask], {s: size for s in self._symbols()})[a.mask]
                        if not isinstance(val, torch.Tensor):
                            raise ValueError("mask is not a tensor")
                        if self._float_input_feeds(a.mask):
                            raise _ArbitraryBias("it is computed from a floating-point model input")
                        if a.mask_form == "additive" and val.is_floating_point() and bool(
                                ((val != 0) & (val > -1e3)).any()):
                            raise _ArbitraryBias("it holds values other than 0 and -inf")
                        allowed = _allowed_from_mask(val, a.mask_form, a.mask_fill)
                        kinds.add(_classify_mask(allowed))
                    kind = kinds.pop() if len(kinds) == 1 else "custom"
                except _ArbitraryBias as e:
                    kind = "custom"
                    self.notes.append(f"attention at {a.loc}: %{a.mask.name} is an arbitrary additive score bias "
                                      f"({e}); causal flag left unset")
                except Exception as e:  # noqa: BLE001 - reported, not hidden
                    kind = "unknown"
                    self.notes.append(f"attention mask %{a.mask.name} (used at {a.loc}) could not be evaluated to "
                                      f"classify it: {type(e).__name__}: {str(e)[:120]}")
                cache[key] = (kind, from_input)
            kind, from_input = cache[key]
            if a.mask_kind == "causal":  # is_causal=True plus a mask
                kind = "causal" if kind in ("causal", "bidirectional") else kind
            a.mask_kind = kind
            a.mask_depends_on_input = from_input and self._depends_on_user_input_values(a.mask)
            a.causal = {"causal": True, "bidirectional": False}.get(kind)
            if kind == "custom" and not any(a.mask.name in u and "bias" in u for u in self.notes):
                self.notes.append(f"attention at {a.loc}: mask %{a.mask.name} is neither causal nor full "
                                  f"(sliding window / prefix / block mask?); causal flag left unset")

    def _float_input_feeds(self, v: Value) -> bool:
        """A floating-point model input's *values* (not only its shape) reach ``v``."""
        g = self.g
        floats = {i for i in g.inputs if isinstance(i.type, TensorType) and i.type.dtype in ("f32", "f16", "bf16", "f64")}
        if v in floats:
            return True
        anc = g.ancestors(v) | {v}
        return any(n.result in anc and n.op != "aten.sym_size.int" and floats & set(n.inputs) for n in self.fn.nodes)

    def _symbols(self) -> set[str]:
        syms: set[str] = set()
        for v in self.fn.inputs:
            if isinstance(v.type, TensorType):
                syms |= v.type.symbols()
        return syms

    def _depends_on_user_input_values(self, v: Value) -> bool:
        """True when ``v`` reads an input's *values* (not just its shape through sym_size)."""
        g = self.g
        if v in g.inputs:
            return True
        anc = g.ancestors(v) | {v}
        for n in self.fn.nodes:
            if n.result in anc and n.op not in ("aten.sym_size.int",) and any(i in g.inputs for i in n.inputs):
                return True
        return False

    # ---- layers --------------------------------------------------------------------------------
    def _residual_add(self, start: Value, residual_candidates: set[Value]) -> tuple[Node, Value, Value] | None:
        """First aten.add reached forward from ``start`` whose other operand is a residual candidate."""
        g = self.g
        frontier = [start]
        seen = set()
        for _ in range(6):
            nxt = []
            for v in frontier:
                for u in g.uses.get(v, []):
                    if id(u) in seen:
                        continue
                    seen.add(id(u))
                    if u.op in ADD_OPS and len(u.args) >= 2 and all(isinstance(a, Value) for a in u.args[:2]):
                        other = u.args[1] if u.args[0] == v else u.args[0]
                        if other in residual_candidates or g.through(other) in residual_candidates:
                            return u, other, v
                    if u.op in LAYOUT_OPS or u.op in ("aten.mul.Tensor",):
                        nxt.append(u.result)
            frontier = nxt
        return None

    def _residual_candidates(self, x: Value) -> set[Value]:
        """Values that can be the residual input of a branch whose first compute reads ``x``."""
        g = self.g
        cands = {x, g.through(x)}
        norm = self.norm_by_out.get(x) or self.norm_by_out.get(g.through(x))
        if norm is not None:
            cands |= {norm.input, g.through(norm.input)}
        return cands

    def _build_layers(self, attentions: list[Attention]) -> list[Layer]:
        g = self.g
        layers: list[Layer] = []
        counters: dict[str, int] = {}
        for a in attentions:
            where = a.loc or f"%{a.output.name}"
            if a.o_proj is None or a.q_proj is None:
                self.notes.append(f"attention at {where}: not placed in a layer (projections missing)")
                continue
            lay = _layer_of(a.loc)
            attn_in = a.q_proj.input
            res = self._residual_add(a.o_proj.output, self._residual_candidates(attn_in))
            if res is None:
                self.notes.append(f"attention at {where}: no residual add around it "
                                  f"(parallel or non-residual block?); layer not mapped")
                continue
            add1, residual_in, attn_end = res
            if lay is not None:
                stack, index = lay
                layer_loc = f"{stack}.{index}"
            else:  # an unnumbered block: the module doing the residual add is the layer
                layer_loc = add1.loc
                stack = layer_loc.rsplit(".", 1)[0] if "." in layer_loc else ""
                index = counters.get(stack, 0)
                counters[stack] = index + 1
            norms: list[Norm] = []
            n_in = self.norm_by_out.get(attn_in) or self.norm_by_out.get(g.through(attn_in))
            # pre-norm: the residual is the norm's input; when the residual *is* the norm output, that norm
            # closes the previous block (post-norm models, or the embedding norm)
            if n_in is not None and g.through(residual_in) != g.through(attn_in):
                norms.append(n_in)
            else:
                n_in = None
            stream = self.stream_continues.get(add1.result.name, add1.result)
            post = False
            users = g.uses.get(stream, [])
            post_norm = next((nm for nm in self.norms if nm.input == stream or g.through(nm.input) == stream), None)
            if n_in is None and post_norm is not None and len(users) == 1:
                norms.append(post_norm)
                stream, post = post_norm.output, True
                stream = self.stream_continues.get(stream.name, stream)  # a post-norm layer merged after its norm
            mlp, add2, mlp_branch, out = self._find_mlp(stream, post, norms)
            self.claim([add1] + ([add2] if add2 is not None else []))
            layer = Layer(index=index, loc=layer_loc, input=residual_in,
                          output=out if out is not None else stream, attention=a, mlp=mlp, norms=norms,
                          residual_adds=[add1] + ([add2] if add2 is not None else []),
                          attn_branch=(residual_in, attn_end), mlp_branch=mlp_branch, post_norm=post, stack=stack)
            if mlp is None:
                self.notes.append(f"layer {layer.loc or index}: no MLP branch found after the attention")
            # norms located inside the layer (q/k norms) complete the list
            for nm in self.norms:
                if layer.loc and nm.loc.startswith(layer.loc + ".") and nm not in norms:
                    norms.append(nm)
            layers.append(layer)
        return layers

    def _find_mlp(self, stream: Value, post: bool, norms: list[Norm]):
        g = self.g
        # the mlp add: add(stream, f(stream)) where f contains a linear
        candidates = []
        for u in self.fn.nodes:
            if u.op in ADD_OPS and len(u.args) >= 2 and all(isinstance(a, Value) for a in u.args[:2]):
                for i in (0, 1):
                    r, b = u.args[i], u.args[1 - i]
                    if (r == stream or g.through(r) == stream) and stream in g.ancestors(b):
                        candidates.append((u, r, b))
        if not candidates:
            return None, None, None, None
        add2, r, branch_end = min(candidates, key=lambda c: g.order[c[0].result])
        body = g.nodes_between([stream], branch_end)
        lins = [self.lin_by_node[id(n)] for n in body if id(n) in self.lin_by_node]
        if not lins:
            return None, None, None, None
        mlp_in = lins[0].input
        nm = self.norm_by_out.get(mlp_in) or self.norm_by_out.get(g.through(mlp_in))
        if nm is not None and nm not in norms:
            norms.append(nm)
        first_inputs = [l for l in lins if g.through(l.input) == g.through(mlp_in)]
        gated = len(first_inputs) >= 2
        acts = [_opname(n) for n in body if _opname(n) in
                ("gelu", "silu", "relu", "tanh", "sigmoid", "hardswish", "mish")]
        act = "gelu-tanh" if "tanh" in acts and "gelu" not in acts else ("quick-gelu" if acts == ["sigmoid"] else
                                                                       (acts[0] if acts else ""))
        mlp_nodes = [n for n in body if not (nm is not None and n in nm.nodes)]
        mlp = MLP(mlp_nodes, mlp_in, branch_end, gated, lins, act)
        self.claim(mlp_nodes)
        out = add2.result
        if post:
            pn = next((x for x in self.norms if x.input == out or g.through(x.input) == out), None)
            if pn is not None:
                norms.append(pn)
                out = pn.output
        return mlp, add2, (r, branch_end), out

    # ---- embeddings, heads ---------------------------------------------------------------------
    def _find_embeddings(self) -> tuple[Embedding | None, Embedding | None]:
        g = self.g
        token = pos = None
        for n in self.fn.nodes:
            if n.op != "aten.embedding.default":
                continue
            w = g.param_name(n.args[0])
            idx = n.args[1]
            if w is None:
                continue
            wt = self.module.params[w]
            e = Embedding(n, w, idx, n.result, int(wt.shape[0]), int(wt.shape[1]))
            src = g.through(idx, LAYOUT_OPS)
            if src in g.inputs and token is None:
                token = e
                self.claim([n])
            elif pos is None and self._is_positions(idx):
                pos = e
                self.claim([n])
            elif token is not None and self._added_to(e.output, token.output):
                # segment / token-type embeddings summed into the token embedding
                self.extra_embeddings.append(e)
                self.claim([n])
        return token, pos

    def _added_to(self, v: Value, base: Value) -> bool:
        """``v`` is summed with ``base`` (possibly after other summands)."""
        g = self.g
        for u in g.uses.get(v, []):
            if u.op in ADD_OPS and base in g.ancestors(u.result):
                return True
        return False

    def _is_positions(self, idx: Value) -> bool:
        """Indices built from an arange, or read from a ``*position_ids`` buffer (name as supporting evidence)."""
        g = self.g
        anc = g.ancestors(idx) | {idx}
        if any(g.op(a) == "aten.arange.default" for a in anc):
            return True
        roots = [g.prod[a].args[0] for a in anc if g.op(a) == "param"]
        return bool(roots) and all("position" in r for r in roots)

    def _find_patch_embed(self) -> tuple[PatchEmbed | None, ClsToken | None]:
        g = self.g
        for n in self.fn.nodes:
            if n.op not in ("aten.conv2d.default", "aten.convolution.default", "aten.conv3d.default"):
                continue
            if g.through(n.args[0], LAYOUT_OPS) not in g.inputs:
                continue
            w = g.param_name(n.args[1])
            if w is None:
                continue
            wt = self.module.params[w]
            kernel = tuple(int(s) for s in wt.shape[2:])
            stride = n.args[3] if len(n.args) > 3 else n.kwargs.get("stride", [1])
            stride = tuple(stride) if isinstance(stride, (list, tuple)) else (stride,)
            if len(stride) == 1:
                stride = stride * len(kernel)
            if stride != kernel:
                self.notes.append(f"convolution at {n.loc}: stride {stride} != kernel {kernel}, not a patch embedding")
                continue
            b = g.param_name(n.args[2]) if len(n.args) > 2 and isinstance(n.args[2], Value) else None
            # tokens: flatten(2) + transpose(1, 2)
            out = n.result
            nodes = [n]
            for _ in range(3):
                us = g.uses.get(out, [])
                if len(us) == 1 and us[0].op in ("aten.view.default", "aten.reshape.default", "aten.flatten.using_ints",
                                                  "aten.transpose.int", "aten.permute.default"):
                    out = us[0].result
                    nodes.append(us[0])
                else:
                    break
            shape = _tensor_shape(out)
            n_patches = shape[1] if shape and len(shape) == 3 and isinstance(shape[1], int) else None
            pe = PatchEmbed(n, w, b, g.through(n.args[0], LAYOUT_OPS), out, kernel, n_patches, int(wt.shape[0]))
            self.claim(nodes)
            cls = None
            for u in g.uses.get(out, []):
                if u.op == "aten.cat.default":
                    parts = list(u.args[0])
                    dim = u.args[1] if len(u.args) > 1 else 0
                    if dim not in (1, -2) or out not in parts:
                        continue
                    for i, p in enumerate(parts):
                        if p == out:
                            continue
                        pn = g.param_name(g.through(p, LAYOUT_OPS))
                        if pn is not None:
                            cls = ClsToken(pn, u, i, f"learned token concatenated at position {i} before the patches"
                                           if i < parts.index(out) else f"learned token concatenated at position {i}")
                            self.claim([u])
                            break
            return pe, cls
        return None, None

    def _find_image_merge(self) -> Node | None:
        for n in self.fn.nodes:
            if n.op in ("aten.masked_scatter.default", "aten.index_put.default") and len(n.args) >= 3:
                self.claim([n])
                return n
        return None

    def _find_projector(self, merge: Node | None, stacks: dict[str, list[Layer]]) -> list[Linear]:
        """Linears between the end of a layer stack that is not fed by tokens and the image merge."""
        if merge is None:
            return []
        g = self.g
        anc = g.ancestors(merge.result)
        for layers in stacks.values():
            end = layers[-1].output
            if end in anc:
                body = g.nodes_between([end], merge.args[2] if isinstance(merge.args[2], Value) else merge.result)
                lins = [self.lin_by_node[id(n)] for n in body if id(n) in self.lin_by_node]
                for l in lins:
                    self.claim(l.nodes)
                return lins
        # the vision features may be taken from an earlier layer (LLaVA's vision_feature_layer=-2)
        for layers in stacks.values():
            for ly in reversed(layers):
                if ly.output in anc:
                    body = g.nodes_between([ly.output], merge.result)
                    lins = [self.lin_by_node[id(n)] for n in body if id(n) in self.lin_by_node
                            and not any(self.lin_by_node[id(n)] is p for st in stacks.values() for x in st
                                        for p in (x.attention.q_proj, x.attention.k_proj, x.attention.v_proj,
                                                  x.attention.o_proj))]
                    lins = [l for l in lins if not any(l in (x.mlp.linears if x.mlp else []) for st in stacks.values()
                                                       for x in st)]
                    for l in lins:
                        self.claim(l.nodes)
                    return lins
        return []

    def _main_stack(self, stacks: dict[str, list[Layer]], embedding: Embedding | None) -> list[Layer]:
        if not stacks:
            return []
        if embedding is not None:
            # the stack fed by the token embedding (a VLM's language model)
            for name, layers in stacks.items():
                if embedding.output in self.g.ancestors(layers[0].input) | {layers[0].input}:
                    return layers
        return max(stacks.values(), key=len)

    def _find_head(self, main: list[Layer]) -> tuple[Norm | None, Linear | None]:
        g = self.g
        final_norm = lm_head = None
        if not main:
            return None, None
        last = main[-1].output
        layer_inputs = [x for st in self.stacks_found for ly in st for x in (ly.input, ly.attention.output)]
        for nm in self.norms:
            if g.through(nm.input, LAYOUT_OPS) == last and nm not in main[-1].norms:
                # a final norm leads to the outputs, not into another layer (a cross-attention's memory norm)
                if any(nm.output in g.ancestors(x) or nm.output == x for x in layer_inputs):
                    continue
                if any(nm.output == o or nm.output in g.ancestors(o) for o in self.fn.outputs):
                    final_norm = nm
                    break
        for o in self.fn.outputs:
            src = g.through(o, LAYOUT_OPS)
            lin = self.linears.get(src) or self.lin_by_node.get(id(g.prod.get(src)))
            if lin is None:
                continue
            feed = g.through(lin.input, LAYOUT_OPS)
            if feed == last or (final_norm is not None and feed == final_norm.output):
                lm_head = lin
                self.claim(lin.nodes)
        return final_norm, lm_head

    def _find_position_ids(self, attentions: list[Attention], pos_emb: Embedding | None):
        g = self.g
        val = None
        if not any(a.rotary for a in attentions) and pos_emb is not None:
            val = pos_emb.input
        else:
            for n in self.fn.nodes:
                if n.op in ("aten.cos.default", "aten.sin.default"):
                    # walk back to the first integer tensor (the positions), then out of its unsqueezes
                    stack, seen = [n.result], set()
                    while stack and val is None:
                        v = stack.pop()
                        if v in seen:
                            continue
                        seen.add(v)
                        t = v.type
                        if isinstance(t, TensorType) and t.dtype in ("i64", "i32"):
                            val = v
                            break
                        p = g.prod.get(v)
                        if p is not None and p.op != "param":
                            stack.extend(p.inputs)
                    if val is not None:
                        break
            while val is not None:
                p = g.prod.get(val)
                if p is not None and p.op == "aten.unsqueeze.default" and len(_tensor_shape(val) or ()) > 2:
                    val = p.args[0]
                else:
                    break
        if val is None:
            return None, []
        anc = g.ancestors(val) | {val}
        nodes = [n for n in self.fn.nodes if n.result in anc and n.op != "param"]
        self.claim(nodes)
        for n in self.fn.nodes:  # the rotary tables (cos/sin of positions x inv_freq)
            if n.loc.endswith("rotary_emb") or n.op in ("aten.cos.default", "aten.sin.default"):
                self.claim([n])
        return val, nodes

    def _kind(self, main, embedding, patch, lm_head, stacks) -> ModelKind:
        if not main:
            return "unknown"
        causal = all(ly.attention.causal for ly in main)
        bidir = all(ly.attention.causal is False for ly in main)
        if patch is not None and embedding is not None:
            return "vision-language"
        if patch is not None and bidir:
            return "vision"
        if embedding is not None and causal:
            return "decoder"
        if embedding is not None and bidir:
            return "encoder"
        feed = "token ids" if embedding is not None else ("patches" if patch is not None else
                                                          "neither token ids nor image patches")
        mix = "causal" if causal else ("bidirectional" if bidir else "mixed or unclassified")
        self.notes.append(f"model kind: the main layer stack reads {feed} and its attention is {mix}; "
                          f"no decoder / encoder / vision pattern fits")
        return "unknown"

    def _coverage_notes(self) -> None:
        """Compute nodes no recognized structure explains, grouped by model location."""
        heavy = {"aten.linear.default", "aten.addmm.default", "aten.mm.default", "aten.matmul.default",
                 "aten.bmm.default", "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
                 "aten.convolution.default", "aten.embedding.default", "aten._softmax.default", "aten.softmax.int",
                 "aten.scaled_dot_product_attention.default", "aten.layer_norm.default", "aten.group_norm.default",
                 "aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default", "aten.einsum.default"}
        groups: dict[str, list[str]] = {}
        for n in self.fn.nodes:
            if n.op in heavy and id(n) not in self.claimed:
                groups.setdefault(n.loc or "(no location)", []).append(_opname(n))
        for loc, ops in groups.items():
            counts: dict[str, int] = {}
            for o in ops:
                counts[o] = counts.get(o, 0) + 1
            what = ", ".join(f"{c} {o}" for o, c in counts.items())
            self.notes.append(f"{loc}: {what} not part of any recognized structure")


def build_model_map(module: Module, fn_name: str = "forward") -> ModelMap:
    """The model map of function ``fn_name`` (cached until a pass changes the module)."""
    return analyses().get("model-map:" + fn_name, module, lambda m: _Builder(m, fn_name).build())


__all__ = ["ModelMap", "Layer", "Attention", "MLP", "Norm", "Embedding", "Linear", "PatchEmbed", "ClsToken",
           "build_model_map"]
