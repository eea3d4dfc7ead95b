"""Records of the parts the model map recognizes: linears, norms, embeddings, attention, MLPs, layers, patches."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from elision.ir.core import Node, Value

ModelKind = Literal["decoder", "encoder", "vision", "vision-language", "unknown"]
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
    weight_offset: float = 0.0  # the norm multiplies by ``weight + weight_offset`` (Gemma's ``1 + w``: 1.0)

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
    # attention and MLP both read the layer input (GPT-J, GPT-NeoX, Falcon, Phi, Cohere): out = x + attn + mlp.
    # Both branches start at `input`; residual_adds[i] is the add that sums in branch i (the same add when the two
    # branches are summed first), and `output` is the last add.
    parallel: bool = False


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
