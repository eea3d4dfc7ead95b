"""The decoder view of a model map: what a KV-cached decode step needs from a decoder-only LM.

Built from the map's attention records (SDPA or elision's fused attention, with K/V before grouped-query head
repetition) and the map's layer numbering (`ops.layer_of`): for every attention its layer, K/V source (rotary
already applied) and head counts; the distinct attention masks; the position-id values a cache step replaces
(arange-derived indices feeding rotary tables or a learned position embedding, found apart from the masks); the
logits and the LM head's input. A function that is not such a decoder gets a one-line reason instead
(`ModelMap.decoder_problem`), which the ``kv-cache`` pass reports as its error.

:func:`residual_streams` gives each decoder layer's residual stream (the value entering and the value leaving
it), which ``layer-skip-draft`` bypasses: the map's :class:`Layer` where the layer was recognized, otherwise the
layer's location span (the one value of the hidden type that enters the layer's nodes and the one that leaves
them), which covers blocks the map does not structure, such as parallel attention + MLP residuals (GPT-NeoX,
Phi, Falcon).
"""
from __future__ import annotations

from dataclasses import dataclass

from elision.analysis.model_map.graph_view import GraphView
from elision.analysis.model_map.ops import FUSED_ATTENTION_OPS, SDPA_OPS, layer_of
from elision.analysis.model_map.records import Attention, Layer
from elision.ir.core import Function, Node, Value
from elision.ir.types import ScalarType, TensorType, Type

# ops that only reshape/copy: walked through from a position-id use back to the [batch, seq] positions
_POSITION_SHAPE_OPS = {
    "aten.unsqueeze.default", "aten.slice.Tensor", "aten.expand.default", "aten.view.default",
    "aten.reshape.default", "aten._unsafe_view.default", "aten.clone.default", "aten.alias.default",
    "aten.contiguous.default", "aten.squeeze.dim",
}


@dataclass
class AttentionSite:
    """One attention call: the node and its K/V before GQA repetition."""

    layer: int
    node: Node
    k_src: Value  # [batch, kv_heads, seq, head_dim], rotary already applied
    v_src: Value
    heads: int
    kv_heads: int
    head_dim: int


@dataclass
class DecoderMap:
    layer_prefix: str
    sites: list[AttentionSite]  # one per layer, by layer index
    masks: list[Value]  # distinct attn_mask values of the attention calls (may be empty: is_causal)
    positions: list[Value]  # position-id roots [1|batch, seq] (usually one)
    logits: Value
    hidden: Value  # input of the LM head
    seq_dim: str | int  # the sequence dim of input_ids
    batch_dim: str | int
    dtype: str  # float dtype of activations

    @property
    def num_layers(self) -> int:
        return len(self.sites)


class NotADecoder(Exception):
    """The function lacks something a KV-cached decoder needs; the message says what."""


def find_decoder(g: GraphView, attentions: list[Attention]) -> DecoderMap:
    """The decoder view of ``g.fn`` from the map's ``attentions``; raises :class:`NotADecoder` with the reason."""
    fn = g.fn
    cached = [a for a in attentions if a.kind != "explicit" and a.node.op in SDPA_OPS | FUSED_ATTENTION_OPS]
    if not cached:
        raise NotADecoder(f"@{fn.name} has no scaled_dot_product_attention: kv-cache needs a decoder LM traced "
                          f"with attention as SDPA (Hugging Face attn_implementation='sdpa', the default)")
    explicit = [a for a in attentions if a.kind == "explicit"]
    if explicit:
        raise NotADecoder(f"@{fn.name}: attention at {explicit[0].loc or '%' + explicit[0].output.name} is a "
                          f"hand-written softmax(QK^T)V; kv-cache needs every attention as SDPA")
    if not fn.inputs or not isinstance(fn.inputs[0].type, TensorType) or fn.inputs[0].type.rank != 2:
        raise NotADecoder(f"@{fn.name}: the first input must be token ids [batch, seq]")
    ids_t = fn.inputs[0].type
    sites: list[AttentionSite] = []
    prefix = None
    for a in cached:
        n = a.node
        lay = layer_of(n.loc)
        if lay is None:
            raise NotADecoder(f"@{fn.name}: attention %{n.result.name} has no decoder-layer location "
                              f"(loc={n.loc!r})")
        if prefix is None:
            prefix = lay[0]
        elif lay[0] != prefix:
            raise NotADecoder(f"@{fn.name}: attention in two layer stacks ({prefix}, {lay[0]}); encoder-decoder "
                              f"models are not supported by kv-cache")
        k_src = a.k_unrepeated if a.k_unrepeated is not None else a.k
        v_src = a.v_unrepeated if a.v_unrepeated is not None else a.v
        qt, kt = a.q.type, k_src.type
        if not (isinstance(qt, TensorType) and isinstance(kt, TensorType) and qt.rank == 4 and kt.rank == 4):
            raise NotADecoder(f"@{fn.name}: attention at {n.loc} does not take 4-D [batch, heads, seq, dim] q/k/v")
        if not isinstance(kt.shape[1], int) or not isinstance(qt.shape[1], int) or not isinstance(kt.shape[3], int):
            raise NotADecoder(f"@{fn.name}: attention at {n.loc} has symbolic head counts {qt} / {kt}")
        sites.append(AttentionSite(lay[1], n, k_src, v_src, qt.shape[1], kt.shape[1], kt.shape[3]))
    if sorted(s.layer for s in sites) != list(range(len(sites))):
        raise NotADecoder(f"@{fn.name}: expected one attention per decoder layer 0..{len(sites) - 1}, found layers "
                          f"{[s.layer for s in sites]}")
    masks: list[Value] = []
    for a in cached:
        if a.mask is not None and a.mask not in masks:
            masks.append(a.mask)
    positions = _position_roots(g, exclude=g.upstream(masks))
    if not positions:
        raise NotADecoder(f"@{fn.name}: cannot find the position ids (no arange-derived index feeding rotary or a "
                          f"position embedding)")
    logits = fn.outputs[0]
    head = g.prod.get(logits)
    if head is None or head.op != "aten.linear.default":
        raise NotADecoder(f"@{fn.name}: the first output must be logits computed by a linear LM head")
    qdtype = sites[0].node.args[0].type.dtype
    return DecoderMap(prefix or "", sorted(sites, key=lambda s: s.layer), masks, positions, logits,
                      g.skip_full_slices(head.args[0]), ids_t.shape[1], ids_t.shape[0], qdtype)


def lm_head_input(fn: Function) -> Value:
    """The hidden state the LM head reads in a function whose first output is the logits (full slices seen
    through: ``hidden[:, 0:]`` is how Hugging Face keeps all positions)."""
    g = GraphView(fn.module, fn)
    return g.skip_full_slices(g.prod[fn.outputs[0]].args[0])


def _arange_derived(fn: Function) -> set[Value]:
    """Integer tensors computed from ``arange`` and sizes only (no input data, no parameters)."""
    out: set[Value] = set()
    data = set(fn.inputs)
    for n in fn.nodes:
        ins = n.inputs
        if n.op == "param":
            data.add(n.result)
            continue
        if any(i in data and not isinstance(i.type, ScalarType) for i in ins) and n.op != "aten.sym_size.int":
            data.add(n.result)
            continue
        t = n.result.type
        if isinstance(t, TensorType) and t.dtype in ("i64", "i32"):
            if n.op.startswith("aten.arange") or any(i in out for i in ins):
                out.add(n.result)
    return out


def _position_roots(g: GraphView, exclude: set[Value]) -> list[Value]:
    """Position-id values [1|batch, seq] feeding rotary (cast to float) or a position embedding lookup."""
    fn = g.fn
    derived = _arange_derived(fn)
    roots: list[Value] = []
    for n in fn.nodes:
        if n.result in exclude:
            continue
        idx = None
        if n.op in ("aten._to_copy.default", "aten.to.dtype") and isinstance(n.result.type, TensorType) and \
                n.result.type.dtype in ("f32", "f16", "bf16", "f64"):
            idx = n.args[0]
        elif n.op == "aten.embedding.default" and len(n.args) > 1:
            idx = n.args[1]
        if not isinstance(idx, Value) or idx not in derived:
            continue
        # walk back through reshapes (and +0) to the rank-2 value closest to the arange
        cur, best = idx, None
        while True:
            if isinstance(cur.type, TensorType) and cur.type.rank == 2:
                best = cur
            p = g.prod.get(cur)
            if p is None:
                break
            if p.op in _POSITION_SHAPE_OPS or (p.op == "aten.add.Tensor" and p.args[1] == 0):
                cur = p.args[0]
                continue
            break
        if best is None:
            raise NotADecoder(f"@{fn.name}: position ids reaching %{n.result.name} ({n.loc or n.op}) are not a "
                              f"[batch, seq] tensor; this model's position handling is not supported by kv-cache")
        if best not in roots:
            roots.append(best)
    return roots


def residual_streams(fn: Function, layers: list[Layer], prefix: str, num_layers: int,
                     hidden_type: Type) -> list[tuple[Value, Value]]:
    """(value entering, value leaving) the residual stream of decoder layers ``prefix.0 .. prefix.{n-1}`` of ``fn``.

    ``layers`` are the map's recognized layers of ``fn``; a layer not among them is read from its location span
    (raises :class:`NotADecoder` when that span is not one stream in, one stream out). Other values may leave a
    layer too (CSE shares the first layer's rotary cos/sin with the later ones): they are not the residual stream
    and stay computed as long as someone uses them.
    """
    g = GraphView(fn.module, fn)
    mapped = {ly.index: ly for ly in layers if ly.stack == prefix}
    spans: dict[int, list[Node]] | None = None
    streams = []
    for i in range(num_layers):
        ly = mapped.get(i)
        if ly is not None and ly.input.type == hidden_type and ly.output.type == hidden_type:
            streams.append((ly.input, ly.output))
            continue
        if spans is None:
            spans = _location_spans(g.fn, prefix, num_layers)
        streams.append(_span_stream(g, spans[i], f"{prefix}.{i}", hidden_type))
    return streams


def _location_spans(fn: Function, prefix: str, num_layers: int) -> dict[int, list[Node]]:
    by_layer: dict[int, list[Node]] = {i: [] for i in range(num_layers)}
    for n in fn.nodes:
        lay = layer_of(n.loc)
        if lay is not None and lay[0] == prefix and lay[1] in by_layer:
            by_layer[lay[1]].append(n)
    return by_layer


def _span_stream(g: GraphView, nodes: list[Node], where: str, hidden_type: Type) -> tuple[Value, Value]:
    """The one value of ``hidden_type`` entering ``nodes`` from outside and the one leaving them."""
    fn = g.fn
    inside = {n.result for n in nodes}
    ids = {id(n) for n in nodes}
    out_set = set(fn.outputs)
    outs = [n.result for n in nodes if n.result not in out_set and n.result.type == hidden_type and
            any(id(u) not in ids for u in g.uses.get(n.result, []))]
    # the residual stream also leaves the last layer into the final norm / function outputs
    if len(outs) != 1:
        raise NotADecoder(f"@{fn.name}: decoder layer {where} has {len(outs)} values leaving it "
                          f"({', '.join('%' + v.name for v in outs)}); expected exactly the residual stream")
    out = outs[0]
    ins: list[Value] = []
    for n in nodes:
        for v in n.inputs:
            if v in inside or v in ins or v.type != out.type:
                continue
            p = g.prod.get(v)
            if p is not None and p.op == "param":
                continue
            ins.append(v)
    if len(ins) != 1:
        raise NotADecoder(f"@{fn.name}: cannot identify the residual-stream input of layer {where} "
                          f"(candidates: {', '.join('%' + v.name for v in ins) or 'none'})")
    return ins[0], out

