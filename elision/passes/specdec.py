"""Speculative-decoding passes: ``kv-cache``, ``tree-verify`` and ``layer-skip-draft``.

They turn the traced full-sequence ``@forward`` of a decoder-only LM into the functions a draft-and-verify
runtime drives, all over *explicit* per-layer KV tensors (no Hugging Face cache objects in the graph):

``kv-cache`` adds two functions next to ``@forward``::

    @prefill(input_ids[batch, n]) -> (logits, k_0, v_0, k_1, v_1, ...)
    @decode(input_ids[batch, n], past_k_0[batch, kv_heads, past, head_dim], past_v_0, ...)
        -> (logits[batch, n, vocab], k_0[batch, kv_heads, n, head_dim], v_0, ...)

  ``@prefill`` is the traced forward that also returns every layer's new keys/values (after rotary).
  ``@decode`` concatenates the past with the new keys/values in front of every attention, attends with a
  causal (bottom-right aligned) mask over ``past + n`` slots and runs rotary / position embeddings at
  positions ``past .. past + n - 1``. Both return only the *new* K/V slices: the runtime writes them into
  its preallocated cache (see ``bench_results/specdec_compiled.md`` for why not the whole present cache).

``tree-verify`` derives ``@verify`` from ``@decode``, replacing the causal mask and the positions with inputs::

    @verify(input_ids[batch, n], positions[batch, n] i64, attn_bias[batch, 1, n, past + n] float,
            past_k_0, past_v_0, ...) -> (logits, [hidden,] k_0, v_0, ...)

  so one graph scores a whole token tree (ancestor mask in ``attn_bias``, depth-based ``positions``), a
  chain, a batch of ragged sequences, or a prompt. ``hidden=true`` also returns the final hidden state
  (the LM head's input) for drafters that want it.

``layer-skip-draft{layers=2,3}`` derives ``@draft`` from ``@verify`` with the residual branches of those
decoder layers removed (their output is their input: SWIFT / Draft&Verify self-speculation from the same
weights). Skipped layers neither read nor write KV, so ``@draft`` takes ``past_k_i/past_v_i`` of the kept
layers only. ``layers=auto`` picks the set by a calibration search that runs real speculative generation
with the compiled functions and keeps the set with the highest measured tokens/s (not acceptance).

The analysis (:func:`analyze_decoder`) finds, without model-specific code: every
``scaled_dot_product_attention`` and its K/V before GQA repetition, the attention-mask subgraph, the
position-id value feeding rotary embeddings (Llama, Qwen2, Mistral) or a learned position embedding
(GPT-2), decoder layer spans (from node ``loc``), and the LM head.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

import torch

from elision.ir.core import Function, IRError, Module, Node, Value, map_values
from elision.ir.symbolic import from_sympy, symbol, to_sympy
from elision.ir.types import ScalarType, TensorType, Type
from elision.passes.base import Pass, PassError, register_pass
from elision.passes.classic import eliminate_dead_code, remove_unused_params

SDPA = "aten.scaled_dot_product_attention.default"
ATTN_OPS = (SDPA, "elision.attention.default")
# ops that only reshape/copy: walked through when looking for GQA repetition and position ids
_SHAPE_OPS = {
    "aten.unsqueeze.default", "aten.slice.Tensor", "aten.expand.default", "aten.view.default",
    "aten.reshape.default", "aten._unsafe_view.default", "aten.clone.default", "aten.alias.default",
    "aten.contiguous.default", "aten.squeeze.dim",
}
_LAYER_LOC = re.compile(r"^(?P<prefix>[A-Za-z_][\w.]*?)\.(?P<idx>\d+)(?:\.|$)")
META_KEY = "specdec"  # node.meta[META_KEY] tags nodes this module creates ("positions", "bias", "kv_cat")


# =============================================================================================== analysis
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
class LayerSpan:
    index: int
    nodes: list[Node]
    hidden_in: Value
    hidden_out: Value


@dataclass
class DecoderMap:
    layer_prefix: str
    sites: list[AttentionSite]
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


def layer_of(loc: str) -> tuple[str, int] | None:
    m = _LAYER_LOC.match(loc or "")
    if not m:
        return None
    return m.group("prefix"), int(m.group("idx"))


def _attn_mask_arg(n: Node) -> Value | None:
    if n.op == SDPA:
        m = n.args[3] if len(n.args) > 3 else n.kwargs.get("attn_mask")
    else:
        m = n.args[3] if len(n.args) > 3 else n.kwargs.get("bias")
    return m if isinstance(m, Value) else None


def _kv_source(fn: Function, producers: dict[Value, Node], v: Value) -> Value:
    """Walk back from an attention K/V argument through HF's ``repeat_kv`` (unsqueeze(2) -> expand -> reshape)."""
    chain = [v]
    cur = v
    while cur in producers and producers[cur].op in _SHAPE_OPS:
        cur = producers[cur].args[0]
        if not isinstance(cur, Value):
            break
        chain.append(cur)
    # the source is the value fed to the rank-5 unsqueeze at dim 2 (the GQA head repetition)
    for i in range(len(chain) - 1, 0, -1):
        child = chain[i - 1]
        p = producers.get(child)
        if p is not None and p.op == "aten.unsqueeze.default" and p.args[1] == 2 and \
                isinstance(child.type, TensorType) and child.type.rank == 5:
            # skip full slices above the unsqueeze (slice(x, 0, 0, INT64_MAX) is an identity)
            src = chain[i]
            while src in producers and producers[src].op == "aten.slice.Tensor" and _is_full_slice(producers[src]):
                src = producers[src].args[0]
            return src
    return v


def _is_full_slice(n: Node) -> bool:
    args = list(n.args) + [None] * (5 - len(n.args))
    start, end, step = args[2] or 0, args[3], args[4] or 1
    return start == 0 and step == 1 and (end is None or (isinstance(end, int) and end >= 2**62))


def _ancestors(producers: dict[Value, Node], roots: list[Value]) -> set[Value]:
    seen: set[Value] = set()
    stack = list(roots)
    while stack:
        v = stack.pop()
        if v in seen:
            continue
        seen.add(v)
        p = producers.get(v)
        if p is not None:
            stack.extend(p.inputs)
    return seen


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


def find_position_roots(fn: Function, exclude: set[Value]) -> list[Value]:
    """Position-id values [1|batch, seq] feeding rotary (cast to float) or a position embedding lookup."""
    producers = fn.producers()
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
            p = producers.get(cur)
            if p is None:
                break
            if p.op in _SHAPE_OPS or (p.op == "aten.add.Tensor" and p.args[1] == 0):
                cur = p.args[0]
                continue
            break
        if best is None:
            raise PassError(f"@{fn.name}: position ids reaching %{n.result.name} ({n.loc or n.op}) are not a "
                            f"[batch, seq] tensor; this model's position handling is not supported by kv-cache")
        if best not in roots:
            roots.append(best)
    return roots


def analyze_decoder(fn: Function) -> DecoderMap:
    """Find attention sites, masks, position ids, the LM head and dims of a traced decoder-only LM."""
    producers = fn.producers()
    attn = [n for n in fn.nodes if n.op in ATTN_OPS]
    if not attn:
        raise PassError(f"@{fn.name} has no scaled_dot_product_attention: kv-cache needs a decoder LM traced "
                        f"with attention as SDPA (Hugging Face attn_implementation='sdpa', the default)")
    if not fn.inputs or not isinstance(fn.inputs[0].type, TensorType) or fn.inputs[0].type.rank != 2:
        raise PassError(f"@{fn.name}: the first input must be token ids [batch, seq]")
    ids_t = fn.inputs[0].type
    sites: list[AttentionSite] = []
    prefix = None
    for n in attn:
        lay = layer_of(n.loc)
        if lay is None:
            raise PassError(f"@{fn.name}: attention %{n.result.name} has no decoder-layer location (loc={n.loc!r})")
        if prefix is None:
            prefix = lay[0]
        elif lay[0] != prefix:
            raise PassError(f"@{fn.name}: attention in two layer stacks ({prefix}, {lay[0]}); encoder-decoder "
                            f"models are not supported by kv-cache")
        q, k, v = n.args[0], n.args[1], n.args[2]
        k_src, v_src = _kv_source(fn, producers, k), _kv_source(fn, producers, v)
        qt, kt = q.type, k_src.type
        if not (isinstance(qt, TensorType) and isinstance(kt, TensorType) and qt.rank == 4 and kt.rank == 4):
            raise PassError(f"@{fn.name}: attention at {n.loc} does not take 4-D [batch, heads, seq, dim] q/k/v")
        if not isinstance(kt.shape[1], int) or not isinstance(qt.shape[1], int) or not isinstance(kt.shape[3], int):
            raise PassError(f"@{fn.name}: attention at {n.loc} has symbolic head counts {qt} / {kt}")
        sites.append(AttentionSite(lay[1], n, k_src, v_src, qt.shape[1], kt.shape[1], kt.shape[3]))
    if sorted(s.layer for s in sites) != list(range(len(sites))):
        raise PassError(f"@{fn.name}: expected one attention per decoder layer 0..{len(sites) - 1}, found layers "
                        f"{[s.layer for s in sites]}")
    masks: list[Value] = []
    for s in sites:
        m = _attn_mask_arg(s.node)
        if m is not None and m not in masks:
            masks.append(m)
    mask_nodes = _ancestors(producers, masks)
    positions = find_position_roots(fn, mask_nodes)
    if not positions:
        raise PassError(f"@{fn.name}: cannot find the position ids (no arange-derived index feeding rotary or a "
                        f"position embedding)")
    logits = fn.outputs[0]
    head = producers.get(logits)
    if head is None or head.op != "aten.linear.default":
        raise PassError(f"@{fn.name}: the first output must be logits computed by a linear LM head")
    hidden = head.args[0]
    while hidden in producers and producers[hidden].op == "aten.slice.Tensor" and _is_full_slice(producers[hidden]):
        hidden = producers[hidden].args[0]
    qdtype = sites[0].node.args[0].type.dtype
    return DecoderMap(prefix or "", sorted(sites, key=lambda s: s.layer), masks, positions, logits, hidden,
                      ids_t.shape[1], ids_t.shape[0], qdtype)


def layer_spans(fn: Function, prefix: str, num_layers: int, hidden_type: Type) -> list[LayerSpan]:
    """Nodes of each decoder layer and its residual-stream input and output (values of ``hidden_type``).

    Other values may leave a layer too (CSE shares the first layer's rotary cos/sin with the later ones);
    they are not the residual stream and stay computed as long as someone uses them.
    """
    by_layer: dict[int, list[Node]] = {i: [] for i in range(num_layers)}
    for n in fn.nodes:
        lay = layer_of(n.loc)
        if lay is not None and lay[0] == prefix and lay[1] in by_layer:
            by_layer[lay[1]].append(n)
    uses = fn.use_map()
    producers = fn.producers()
    param_vals = {n.result for n in fn.nodes if n.op == "param"}
    out_set = set(fn.outputs)
    spans = []
    for i in range(num_layers):
        nodes = by_layer[i]
        inside = {n.result for n in nodes}
        ids = {id(n) for n in nodes}
        outs = [n.result for n in nodes if n.result not in out_set and n.result.type == hidden_type and
                any(id(u) not in ids for u in uses.get(n.result, []))]
        # the residual stream also leaves the last layer into the final norm / function outputs
        if len(outs) != 1:
            raise PassError(f"@{fn.name}: decoder layer {prefix}.{i} has {len(outs)} values leaving it "
                            f"({', '.join('%' + v.name for v in outs)}); expected exactly the residual stream")
        out = outs[0]
        ins = []
        for n in nodes:
            for v in n.inputs:
                if v in inside or v in param_vals or v in ins or v.type != out.type:
                    continue
                if v in producers and producers[v].op == "param":
                    continue
                ins.append(v)
        if len(ins) != 1:
            raise PassError(f"@{fn.name}: cannot identify the residual-stream input of layer {prefix}.{i} "
                            f"(candidates: {', '.join('%' + v.name for v in ins) or 'none'})")
        spans.append(LayerSpan(i, nodes, ins[0], out))
    return spans


# =============================================================================================== IR helpers
def remap(fn: Function, mapping: dict[Value, Value]) -> None:
    """Replace Values everywhere in ``fn`` (inputs, node results, arguments, outputs)."""
    if not mapping:
        return
    get = lambda v: mapping.get(v, v)  # noqa: E731
    fn.inputs = [get(v) for v in fn.inputs]
    for n in fn.nodes:
        n.result = get(n.result)
        n.args = map_values(n.args, get)
        n.kwargs = map_values(n.kwargs, get)
    fn.outputs = [get(v) for v in fn.outputs]


def _rename_type(t: Type, subs: dict) -> Type:
    def fix(d):
        if isinstance(d, int) or not subs:
            return d
        return from_sympy(to_sympy(d).subs(subs))

    if isinstance(t, TensorType):
        return TensorType(t.dtype, tuple(fix(d) for d in t.shape))
    if isinstance(t, ScalarType) and t.expr is not None and not t.expr.lstrip("-").isdigit():
        return ScalarType(t.kind, str(fix(t.expr)))
    return t


def rename_dims(fn: Function, names: dict[str, str]) -> None:
    """Rename symbolic dims in every type of ``fn`` (e.g. ``seq`` -> ``n``)."""
    subs = {symbol(a): symbol(b) for a, b in names.items() if a != b}
    if not subs:
        return
    mapping = {}
    memo: dict[Type, Type] = {}
    for v in fn.values():
        if v.type not in memo:
            memo[v.type] = _rename_type(v.type, subs)
        t = memo[v.type]
        if t != v.type:
            mapping[v] = Value(v.name, t)
    remap(fn, mapping)


_BINDINGS = ((17, 19, 23, 29, 31, 37), (41, 43, 47, 53, 59, 61))


def _meta_types(fn: Function, node: Node, current: dict[str, Value], producers: dict[Value, Node]) -> Type | None:
    """Result type of ``node`` from two runs on meta tensors with different prime sizes for every symbol.

    Each output dim is matched against the dims of the node's input types (and its old type); None when a dim
    cannot be explained that way (the caller falls back to fake-tensor inference).
    """
    from elision.ir.symbolic import evaluate
    from elision.ir.shape_infer import type_of

    module = fn.module
    syms = sorted({sym for v in fn.inputs if isinstance(v.type, TensorType) for sym in v.type.symbols()})
    if len(syms) > len(_BINDINGS[0]):
        return None
    outs = []
    for primes in _BINDINGS:
        bind = dict(zip(syms, primes))

        def meta(v: Value):
            p = producers.get(v)
            if p is not None and p.op == "param" and module is not None:
                t = module.params[p.args[0]]
                return torch.empty(t.shape, dtype=t.dtype, device="meta")
            t = current[v.name].type
            if isinstance(t, TensorType):
                return torch.empty([evaluate(d, bind) for d in t.shape], dtype=t.torch_dtype, device="meta")
            if isinstance(t, ScalarType) and t.kind == "int" and t.expr is not None:
                return evaluate(int(t.expr) if t.expr.lstrip("-").isdigit() else t.expr, bind)
            raise ValueError("unsupported input type")

        try:
            from elision.ir.ops import resolve_op

            out = resolve_op(node.op)(*map_values(node.args, meta), **map_values(node.kwargs, meta))
        except Exception:
            return None
        if not isinstance(out, torch.Tensor) or out.device.type != "meta":
            return None
        outs.append((out, bind))
    cands: list = []
    for v in node.inputs + [node.result]:
        t = current.get(v.name, v).type
        if isinstance(t, TensorType):
            cands += [d for d in t.shape if d not in cands]
    dims = []
    (o1, b1), (o2, b2) = outs
    if o1.dim() != o2.dim():
        return None
    for a, b in zip(o1.shape, o2.shape):
        if a == b:
            dims.append(int(a))
            continue
        hit = [c for c in cands if isinstance(c, str) and evaluate(c, b1) == a and evaluate(c, b2) == b]
        if not hit:
            return None
        dims.append(hit[0])
    return TensorType(type_of(o1).dtype, tuple(dims))


def retype(fn: Function, changed: set[Value]) -> None:
    """Re-infer result types downstream of the ``changed`` values.

    Only nodes with an input whose type changed are re-inferred, and propagation stops where a result type
    comes out the same (positions [1, n] -> [batch, n] retypes the rotary table, not the whole network).
    Inference runs on meta tensors (fast); fake tensors with symbolic sizes are the fallback.
    """
    from elision.ir.shape_infer import infer_node_type

    producers = fn.producers()
    dirty = {v.name for v in changed}
    current: dict[str, Value] = {v.name: v for v in fn.values()}
    mapping: dict[Value, Value] = {}
    for n in fn.nodes:
        if n.op == "param" or not any(i.name in dirty for i in n.inputs):
            continue
        t = _meta_types(fn, n, current, producers)
        if t is None:
            args = map_values(n.args, lambda v: current[v.name])
            kwargs = map_values(n.kwargs, lambda v: current[v.name])
            t = infer_node_type(fn, n.op, args, kwargs)
        if t != n.result.type:
            new = Value(n.result.name, t)
            mapping[n.result] = new
            current[n.result.name] = new
            dirty.add(n.result.name)
    remap(fn, mapping)


def rename_value(fn: Function, v: Value, name: str) -> Value:
    if v.name == name:
        return v
    new = Value(fn.fresh_name(name), v.type)
    remap(fn, {v: new})
    return new


def _tagged(fn: Function, tag: str) -> Value:
    for n in fn.nodes:
        if n.meta.get(META_KEY) == tag:
            return n.result
    raise PassError(f"@{fn.name} has no node tagged {tag!r}: run the kv-cache pass first")


def _specdec_attrs(module: Module) -> dict:
    return module.attrs.setdefault("specdec", {})


# =============================================================================================== kv-cache
def _add_kv_outputs(fn: Function, dmap: DecoderMap) -> None:
    """Name each layer's new K/V ``k_i``/``v_i`` and return them after the logits."""
    outs = [dmap.logits]
    for s in dmap.sites:
        # a K that is also V (or shared across layers) gets its own identity-free alias via rename only once
        k = rename_value(fn, s.k_src, f"k_{s.layer}")
        v = rename_value(fn, s.v_src, f"v_{s.layer}")
        outs += [k, v]
    fn.outputs = outs


def build_prefill(module: Module, source: str = "forward") -> Function:
    fn = module.functions[source].copy()
    fn.name = "prefill"
    dmap = analyze_decoder(fn)
    _add_kv_outputs(fn, dmap)
    eliminate_dead_code(fn)
    return fn


class _Emitter:
    """Inserts nodes with explicitly computed types at a moving position (no fake-tensor inference: fast)."""

    def __init__(self, fn: Function, index: int, loc: str = ""):
        self.fn, self.index, self.loc = fn, index, loc

    def __call__(self, op: str, args: tuple, type: Type, hint: str, kwargs: dict | None = None,
                 tag: str | None = None) -> Value:
        node = Node(op, tuple(args), dict(kwargs or {}), Value(self.fn.fresh_name(hint), type), self.loc)
        if tag:
            node.meta[META_KEY] = tag
        self.fn.nodes.insert(self.index, node)
        self.index += 1
        return node.result


def _dim_add(a, b) -> int | str:
    return from_sympy(to_sympy(str(a)) + to_sympy(str(b)))


def build_decode(module: Module, source: str = "forward", window: int = 0) -> Function:
    fn = module.functions[source].copy()
    fn.name = "decode"
    dmap = analyze_decoder(fn)
    ids = fn.inputs[0]
    B, S = dmap.batch_dim, dmap.seq_dim
    if not isinstance(S, str):
        raise PassError(f"@{source}: the sequence length of input_ids is the constant {S}; export the model with a "
                        f"dynamic sequence dim (dynamic_dims={{0: {{0: 'batch', 1: 'seq'}}}})")
    T = _dim_add("past", S)
    fdt = dmap.dtype
    # ---- past K/V inputs
    pasts: list[Value] = []
    for s in dmap.sites:
        for kind, src in (("k", s.k_src), ("v", s.v_src)):
            pasts.append(Value(fn.fresh_name(f"past_{kind}_{s.layer}"),
                               TensorType(src.type.dtype, (B, s.kv_heads, "past", s.head_dim))))
            fn.inputs.append(pasts[-1])
    # ---- positions past .. past + n - 1 and the causal bias over the past + n slots
    device = _trace_device(fn)
    first_real = next(i for i, n in enumerate(fn.nodes) if n.op != "param")
    e = _Emitter(fn, first_real)
    i64 = lambda *shape: TensorType("i64", shape)  # noqa: E731
    past_len = e("aten.sym_size.int", (pasts[0], 2), ScalarType("int", "past"), "past_len")
    n_len = e("aten.sym_size.int", (ids, 1), ScalarType("int", S), "n_len")
    q_ar = e("aten.arange.default", (n_len,), i64(S), "q_arange", dict(dtype=torch.int64, device=device))
    q_pos = e("aten.add.Tensor", (q_ar, past_len), i64(S), "q_pos")
    positions = e("aten.unsqueeze.default", (q_pos, 0), i64(1, S), "positions", tag="positions")
    total = e("py.operator.add", (past_len, n_len), ScalarType("int", str(T)), "kv_len")
    kv_pos = e("aten.arange.default", (total,), i64(T), "kv_pos", dict(dtype=torch.int64, device=device))
    row = e("aten.unsqueeze.default", (kv_pos, 0), i64(1, T), "kv_row")
    col = e("aten.unsqueeze.default", (q_pos, 1), i64(S, 1), "q_col")
    allowed = e("aten.le.Tensor", (row, col), TensorType("bool", (S, T)), "causal")
    if window and window > 0:
        lo = e("aten.sub.Tensor", (col, window), i64(S, 1), "window_lo")
        inwin = e("aten.gt.Tensor", (row, lo), TensorType("bool", (S, T)), "in_window")
        allowed = e("aten.logical_and.default", (allowed, inwin), TensorType("bool", (S, T)), "allowed")
    tdt = TensorType(fdt, ()).torch_dtype
    zero = e("aten.scalar_tensor.default", (0.0,), TensorType(fdt, ()), "zero", dict(dtype=tdt, device=device))
    ninf = e("aten.scalar_tensor.default", (float("-inf"),), TensorType(fdt, ()), "neg_inf", dict(dtype=tdt, device=device))
    bias2 = e("aten.where.self", (allowed, zero, ninf), TensorType(fdt, (S, T)), "bias2d")
    bias3 = e("aten.unsqueeze.default", (bias2, 0), TensorType(fdt, (1, S, T)), "bias3d")
    bias = e("aten.unsqueeze.default", (bias3, 0), TensorType(fdt, (1, 1, S, T)), "causal_bias", tag="bias")
    for root in dmap.positions:
        fn.replace_all_uses(root, positions)
    # ---- every attention reads cat(past, new)
    for s in dmap.sites:
        node = s.node
        pk, pv = pasts[2 * s.layer], pasts[2 * s.layer + 1]
        e = _Emitter(fn, fn.index(node), node.loc)
        kv = []
        for past, src, kind in ((pk, s.k_src, "k"), (pv, s.v_src, "v")):
            full = e("aten.cat.default", ([past, src], 2), TensorType(src.type.dtype, (B, s.kv_heads, T, s.head_dim)),
                     f"{kind}_all_{s.layer}", tag="kv_cat")
            kv.append(_repeat_heads(e, full, s, B, T))
        args = list(node.args)
        args[1], args[2] = kv
        kwargs = dict(node.kwargs)
        if len(args) > 3:
            args[3] = bias
        elif node.op == SDPA:
            kwargs["attn_mask"] = bias
        else:
            kwargs["bias"] = bias
        # the bias already encodes causality: a traced is_causal=True must not apply a second (misaligned) mask
        if node.op == SDPA and len(args) > 5:
            args[5] = False
        if "is_causal" in kwargs:
            kwargs["is_causal"] = False
        node.args, node.kwargs = tuple(args), kwargs
    _add_kv_outputs(fn, dmap)
    eliminate_dead_code(fn)
    return fn


def _trace_device(fn: Function):
    for n in fn.nodes:
        d = n.kwargs.get("device")
        if isinstance(d, torch.device):
            return d
    return torch.device("cpu")


def _repeat_heads(e: _Emitter, kv: Value, s: AttentionSite, B, T) -> Value:
    """GQA: [b, kv_heads, L, d] -> [b, heads, L, d], exactly as HF's repeat_kv (unsqueeze, expand, reshape)."""
    if s.heads == s.kv_heads:
        return kv
    if s.heads % s.kv_heads:
        raise PassError(f"attention at {s.node.loc}: {s.heads} query heads is not a multiple of {s.kv_heads} KV heads")
    rep = s.heads // s.kv_heads
    dt = kv.type.dtype
    b = e("aten.sym_size.int", (kv, 0), ScalarType("int", str(B)), "b")
    length = e("aten.sym_size.int", (kv, 2), ScalarType("int", str(T)), "kv_len")
    u = e("aten.unsqueeze.default", (kv, 2), TensorType(dt, (B, s.kv_heads, 1, T, s.head_dim)), "unsqueeze")
    x = e("aten.expand.default", (u, [b, s.kv_heads, rep, length, s.head_dim]),
          TensorType(dt, (B, s.kv_heads, rep, T, s.head_dim)), "expand")
    c = e("aten.clone.default", (x,), x.type, "clone", dict(memory_format=torch.contiguous_format))
    return e("aten.reshape.default", (c, [b, s.heads, length, s.head_dim]), TensorType(dt, (B, s.heads, T, s.head_dim)),
             "rep")


def _finish(module: Module, fn: Function, seq_dim) -> Function:
    if isinstance(seq_dim, str) and seq_dim != "n":
        rename_dims(fn, {seq_dim: "n"})
    module.add_function(fn)
    return fn


@register_pass
@dataclass(frozen=True)
class KVCache(Pass):
    """Add ``@prefill`` and ``@decode`` over explicit per-layer KV tensors (see the module docstring).

    ``window`` > 0 adds a sliding-window limit to ``@decode``'s causal mask (Mistral-style models);
    ``@verify`` takes the mask as an input and is not affected.
    """

    name: ClassVar[str] = "kv-cache"
    source: str = "forward"
    window: int = 0

    def run(self, module: Module) -> bool:
        if self.source not in module.functions:
            raise PassError(f"kv-cache: module has no function @{self.source}; functions: {', '.join(module.functions)}")
        src = module.functions[self.source]
        dmap = analyze_decoder(src)
        prefill = _finish(module, build_prefill(module, self.source), dmap.seq_dim)
        decode = _finish(module, build_decode(module, self.source, self.window), dmap.seq_dim)
        del prefill, decode
        s0 = dmap.sites[0]
        _specdec_attrs(module).update({
            "num_layers": dmap.num_layers, "kv_heads": s0.kv_heads, "heads": s0.heads, "head_dim": s0.head_dim,
            "layer_prefix": dmap.layer_prefix, "dtype": dmap.dtype, "window": self.window,
        })
        return True


# =============================================================================================== tree-verify
def build_verify(module: Module, hidden: bool = False) -> Function:
    if "decode" not in module.functions:
        raise PassError("tree-verify needs @decode: run kv-cache first (pipeline '...,kv-cache,tree-verify,...')")
    fn = module.functions["decode"].copy()
    fn.name = "verify"
    ids = fn.inputs[0]
    batch, n = ids.type.shape
    dtype = _specdec_attrs(module).get("dtype", "f32")
    causal_pos = rename_value(fn, _tagged(fn, "positions"), "causal_positions")
    causal_bias = rename_value(fn, _tagged(fn, "bias"), "causal_bias")
    pos_in = Value(fn.fresh_name("positions"), TensorType("i64", (batch, n)))
    bias_in = Value(fn.fresh_name("attn_bias"), TensorType(dtype, (batch, 1, n, _dim_add("past", n))))
    fn.inputs[1:1] = [pos_in, bias_in]
    fn.replace_all_uses(causal_pos, pos_in)
    fn.replace_all_uses(causal_bias, bias_in)
    eliminate_dead_code(fn)
    retype(fn, {pos_in, bias_in})
    if hidden:
        producers = fn.producers()
        head = producers[fn.outputs[0]]
        h = head.args[0]
        while h in producers and producers[h].op == "aten.slice.Tensor" and _is_full_slice(producers[h]):
            h = producers[h].args[0]
        h = rename_value(fn, h, "hidden")
        fn.outputs.insert(1, h)
    eliminate_dead_code(fn)
    return fn


@register_pass
@dataclass(frozen=True)
class TreeVerify(Pass):
    """Add ``@verify``: ``@decode`` with positions and an additive attention bias as inputs (token trees)."""

    name: ClassVar[str] = "tree-verify"
    hidden: bool = False

    def run(self, module: Module) -> bool:
        module.add_function(build_verify(module, self.hidden))
        _specdec_attrs(module)["verify_hidden"] = self.hidden
        return True


# =============================================================================================== layer-skip-draft
def parse_layers(text: str, num_layers: int) -> list[int] | None:
    """``"auto"`` -> None; ``"2,3"`` / ``"2;3"`` -> [2, 3] (validated)."""
    text = (text or "").strip()
    if text == "auto":
        return None
    try:
        layers = sorted({int(x) for x in re.split(r"[,; ]+", text) if x})
    except ValueError:
        raise PassError(f"layer-skip-draft: layers={text!r} is not 'auto' or a list of layer indices like 2,3") from None
    bad = [i for i in layers if not 0 <= i < num_layers]
    if bad:
        raise PassError(f"layer-skip-draft: layers {bad} out of range for a {num_layers}-layer model (0..{num_layers - 1})")
    if len(layers) >= num_layers:
        raise PassError(f"layer-skip-draft: skipping all {num_layers} layers leaves no draft model; keep at least one")
    return layers


def build_draft(module: Module, skip: list[int], source: str = "verify") -> Function:
    if source not in module.functions:
        raise PassError(f"layer-skip-draft needs @{source}: run kv-cache and tree-verify first")
    attrs = _specdec_attrs(module)
    fn = module.functions[source].copy()
    fn.name = "draft"
    num_layers = attrs["num_layers"]
    producers = fn.producers()
    head = producers[fn.outputs[0]]
    spans = layer_spans(fn, attrs["layer_prefix"], num_layers, head.args[0].type)
    bypass: dict[Value, Value] = {}
    for i in sorted(skip):
        span = spans[i]
        # the residual stream bypasses the whole layer; its attention and MLP branches become dead code.
        # Consecutive skipped layers chain: layer i+1's input is layer i's (already bypassed) output.
        src = bypass.get(span.hidden_in, span.hidden_in)
        fn.replace_all_uses(span.hidden_out, src)
        bypass[span.hidden_out] = src
    drop_out = {f"k_{i}" for i in skip} | {f"v_{i}" for i in skip}
    fn.outputs = [o for o in fn.outputs if o.name not in drop_out]
    eliminate_dead_code(fn)
    drop_in = {f"past_k_{i}" for i in skip} | {f"past_v_{i}" for i in skip}
    still_used = {v for n in fn.nodes for v in n.inputs}
    for v in fn.inputs:
        if v.name in drop_in and v in still_used:
            raise IRError(f"@draft: skipped layer input %{v.name} is still used")
    fn.inputs = [v for v in fn.inputs if v.name not in drop_in]
    # `past` must stay bound by some input: it is, as long as one layer is kept
    return fn


@register_pass
@dataclass(frozen=True)
class LayerSkipDraft(Pass):
    """Add ``@draft``: ``@verify`` with the residual branches of ``layers`` removed (self-speculation).

    ``layers=auto`` searches skip sets by measured tokens/s of real speculative generation with the compiled
    ``@verify``/``@draft`` (``trials`` candidate sets, ``new_tokens`` per calibration prompt). Calibration
    prompts come from ``module.attrs["calibration_prompts"]`` (lists of token ids) when present, otherwise two
    seeded random 12-token prompts (meaningful only for a trained model: pass real prompts for real choices).
    """

    name: ClassVar[str] = "layer-skip-draft"
    layers: str = "auto"
    trials: int = 8
    new_tokens: int = 24
    seed: int = 0

    def run(self, module: Module) -> bool:
        attrs = _specdec_attrs(module)
        if "verify" not in module.functions or "num_layers" not in attrs:
            raise PassError("layer-skip-draft needs @verify: run kv-cache and tree-verify first "
                            "(pipeline 'kv-cache,tree-verify,layer-skip-draft{layers=...}')")
        num_layers = attrs["num_layers"]
        skip = parse_layers(self.layers, num_layers)
        report = None
        if skip is None:
            from elision.apps.specdec.compiled_backend import search_skip_layers

            skip, report = search_skip_layers(module, trials=self.trials, new_tokens=self.new_tokens, seed=self.seed)
        fn = build_draft(module, skip)
        module.add_function(fn)
        attrs["skip_layers"] = list(skip)
        attrs["draft_layers"] = [i for i in range(num_layers) if i not in skip]
        if report is not None:
            attrs["skip_search"] = report
        remove_unused_params(module)
        return True


__all__ = ["AttentionSite", "DecoderMap", "LayerSpan", "KVCache", "TreeVerify", "LayerSkipDraft", "analyze_decoder",
           "layer_spans", "build_prefill", "build_decode", "build_verify", "build_draft", "parse_layers", "retype",
           "rename_dims", "remap"]
