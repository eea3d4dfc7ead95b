"""Residual layers around the recognized attentions: the residual adds, the norms before (pre-norm) or after
(post-norm) each branch, and the MLP branch that follows the attention branch."""
from __future__ import annotations

from elision.analysis.model_map.ops import ADD_OPS, LAYOUT_OPS, layer_of, opname
from elision.analysis.model_map.records import MLP, Attention, Layer, Norm
from elision.analysis.model_map.state import MapState
from elision.ir.core import Node, Value


def find_layers(st: MapState, attentions: list[Attention]) -> list[Layer]:
    g = st.g
    layers: list[Layer] = []
    counters: dict[str, int] = {}
    for a in attentions:
        where = a.loc or f"%{a.output.name}"
        if a.o_proj is None or a.q_proj is None:
            st.notes.append(f"attention at {where}: not placed in a layer (projections missing)")
            continue
        lay = layer_of(a.loc)
        attn_in = a.q_proj.input
        candidates = _residual_candidates(st, attn_in)
        parallel = _parallel_block(st, a, candidates)
        if parallel is not None:
            layers.append(_parallel_layer(st, a, _place(lay, parallel[3][-1], counters), *parallel))
            continue
        res = _residual_add(st, a.o_proj.output, candidates)
        if res is None:
            st.notes.append(f"attention at {where}: no residual add around it "
                              f"(parallel or non-residual block?); layer not mapped")
            continue
        add1, residual_in, attn_end = res
        stack, index, layer_loc = _place(lay, add1, counters)
        norms: list[Norm] = []
        n_in = st.norm_by_out.get(attn_in) or st.norm_by_out.get(g.through(attn_in))
        # pre-norm: the residual is the norm's input; when the residual *is* the norm output, that norm
        # closes the previous block (post-norm models, or the embedding norm)
        if n_in is not None and g.through(residual_in) != g.through(attn_in):
            norms.append(n_in)
        else:
            n_in = None
        stream = st.stream_continues.get(add1.result.name, add1.result)
        post = False
        users = g.uses.get(stream, [])
        post_norm = next((nm for nm in st.norms if nm.input == stream or g.through(nm.input) == stream), None)
        if n_in is None and post_norm is not None and len(users) == 1:
            norms.append(post_norm)
            stream, post = post_norm.output, True
            stream = st.stream_continues.get(stream.name, stream)  # a post-norm layer merged after its norm
        mlp, add2, mlp_branch, out = _find_mlp(st, stream, post, norms)
        st.claim([add1] + ([add2] if add2 is not None else []))
        layer = Layer(index=index, loc=layer_loc, input=residual_in,
                      output=out if out is not None else stream, attention=a, mlp=mlp, norms=norms,
                      residual_adds=[add1] + ([add2] if add2 is not None else []),
                      attn_branch=(residual_in, attn_end), mlp_branch=mlp_branch, post_norm=post, stack=stack)
        if mlp is None:
            st.notes.append(f"layer {layer.loc or index}: no MLP branch found after the attention")
        # norms located inside the layer (q/k norms) complete the list
        for nm in st.norms:
            if layer.loc and nm.loc.startswith(layer.loc + ".") and nm not in norms:
                norms.append(nm)
        layers.append(layer)
    return layers


def _place(lay: tuple[str, int] | None, add: Node, counters: dict[str, int]) -> tuple[str, int, str]:
    """(stack, index, layer loc) of a layer: from its numbered location, or for an unnumbered block the module
    doing the residual add ``add`` is the layer (numbered in order of appearance)."""
    if lay is not None:
        return lay[0], lay[1], f"{lay[0]}.{lay[1]}"
    layer_loc = add.loc
    stack = layer_loc.rsplit(".", 1)[0] if "." in layer_loc else ""
    index = counters.get(stack, 0)
    counters[stack] = index + 1
    return stack, index, layer_loc


def _residual_add(st: MapState, start: Value, residual_candidates: set[Value]) -> tuple[Node, Value, Value] | None:
    """First aten.add reached forward from ``start`` whose other operand is a residual candidate."""
    g = st.g
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


def _residual_candidates(st: MapState, x: Value) -> set[Value]:
    """Values that can be the residual input of a branch whose first compute reads ``x``."""
    g = st.g
    cands = {x, g.through(x)}
    norm = st.norm_by_out.get(x) or st.norm_by_out.get(g.through(x))
    if norm is not None:
        cands |= {norm.input, g.through(norm.input)}
    return cands


def _find_mlp(st: MapState, stream: Value, post: bool, norms: list[Norm]):
    g = st.g
    # the mlp add: add(stream, f(stream)) where f contains a linear
    candidates = []
    for u in st.fn.nodes:
        if u.op in ADD_OPS and len(u.args) >= 2 and all(isinstance(a, Value) for a in u.args[:2]):
            for i in (0, 1):
                r, b = u.args[i], u.args[1 - i]
                if (r == stream or g.through(r) == stream) and stream in g.ancestors(b):
                    candidates.append((u, r, b))
    if not candidates:
        return None, None, None, None
    add2, r, branch_end = min(candidates, key=lambda c: g.order[c[0].result])
    mlp = _mlp_record(st, stream, branch_end, norms)
    if mlp is None:
        return None, None, None, None
    out = add2.result
    if post:
        pn = next((x for x in st.norms if x.input == out or g.through(x.input) == out), None)
        if pn is not None:
            norms.append(pn)
            out = pn.output
    return mlp, add2, (r, branch_end), out


def _mlp_record(st: MapState, start: Value, branch_end: Value, norms: list[Norm]) -> MLP | None:
    """The MLP computed from ``start`` to ``branch_end`` (its norm, when it has one, goes to ``norms``)."""
    g = st.g
    body = g.nodes_between([start], branch_end)
    lins = [st.lin_by_node[id(n)] for n in body if id(n) in st.lin_by_node]
    if not lins:
        return None
    mlp_in = lins[0].input
    nm = st.norm_by_out.get(mlp_in) or st.norm_by_out.get(g.through(mlp_in))
    if nm is not None and nm not in norms:
        norms.append(nm)
    first_inputs = [l for l in lins if g.through(l.input) == g.through(mlp_in)]
    gated = len(first_inputs) >= 2
    acts = [opname(n) for n in body if opname(n) in
            ("gelu", "silu", "relu", "tanh", "sigmoid", "hardswish", "mish")]
    act = "gelu-tanh" if "tanh" in acts and "gelu" not in acts else ("quick-gelu" if acts == ["sigmoid"] else
                                                                   (acts[0] if acts else ""))
    mlp_nodes = [n for n in body if not (nm is not None and n in nm.nodes)]
    st.claim(mlp_nodes)
    return MLP(mlp_nodes, mlp_in, branch_end, gated, lins, act)


def _parallel_block(st: MapState, a: Attention, candidates: set[Value]):
    """``x + attn(n1(x)) + mlp(n2(x))`` summed in any order (n2 may be n1): (residual input, attention branch end,
    MLP branch end, the adds in order, MLP start) when the attention output joins such a sum, else None.

    The MLP branch is recognized by dataflow: it starts at the attention's own input (a shared norm: GPT-J, Phi,
    Cohere) or at another norm of the same residual (GPT-NeoX, Falcon), holds a linear, and does not read the
    attention output."""
    g = st.g
    attn_end = g.forward_through(a.o_proj.output)
    attn_in = a.q_proj.input
    starts = {attn_in, g.through(attn_in)} | {nm.output for nm in st.norms
                                              if nm.input in candidates or g.through(nm.input) in candidates}
    residual = mlp_end = mlp_start = None
    adds: list[Node] = []
    cur = attn_end
    for _ in range(2):  # two adds join the residual, the attention and the MLP
        users = [u for u in g.uses.get(cur, []) if u.op in ADD_OPS]
        if len(users) != 1 or len(g.uses.get(cur, [])) != 1:
            return None
        add = users[0]
        if len(add.args) < 2 or not all(isinstance(x, Value) for x in add.args[:2]) or add.kwargs.get("alpha", 1) != 1:
            return None
        other = add.args[1] if add.args[0] == cur else add.args[0]
        if residual is None and (other in candidates or g.through(other) in candidates):
            residual = other
        elif mlp_end is None and attn_end not in g.ancestors(other):
            mlp_start = next((s for s in starts if s in g.ancestors(other)), None)
            if mlp_start is None:
                return None
            mlp_end = other
        else:
            return None
        adds.append(add)
        cur = g.forward_through(add.result)
    if residual is None or mlp_end is None:
        return None
    return residual, attn_end, mlp_end, adds, mlp_start


def _parallel_layer(st: MapState, a: Attention, place: tuple[str, int, str], residual: Value, attn_end: Value,
                    mlp_end: Value, adds: list[Node], mlp_start: Value) -> Layer:
    g = st.g
    norms: list[Norm] = []
    n_in = st.norm_by_out.get(a.q_proj.input) or st.norm_by_out.get(g.through(a.q_proj.input))
    if n_in is not None:
        norms.append(n_in)
    mlp = _mlp_record(st, mlp_start, mlp_end, norms)
    st.claim(adds)
    stack, index, layer_loc = place
    add_of = {v: n for n in adds for v in n.args[:2]}
    layer = Layer(index=index, loc=layer_loc, input=residual,
                  output=adds[-1].result, attention=a, mlp=mlp, norms=norms,
                  residual_adds=[add_of[attn_end], add_of[mlp_end]], attn_branch=(residual, attn_end),
                  mlp_branch=(residual, mlp_end), stack=stack, parallel=True)
    for nm in st.norms:  # norms located inside the layer (q/k norms) complete the list
        if layer.loc and nm.loc.startswith(layer.loc + ".") and nm not in norms:
            norms.append(nm)
    return layer
