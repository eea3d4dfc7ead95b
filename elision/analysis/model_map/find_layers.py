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
        res = _residual_add(st, a.o_proj.output, _residual_candidates(st, attn_in))
        if res is None:
            st.notes.append(f"attention at {where}: no residual add around it "
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
    body = g.nodes_between([stream], branch_end)
    lins = [st.lin_by_node[id(n)] for n in body if id(n) in st.lin_by_node]
    if not lins:
        return None, None, None, None
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
    mlp = MLP(mlp_nodes, mlp_in, branch_end, gated, lins, act)
    st.claim(mlp_nodes)
    out = add2.result
    if post:
        pn = next((x for x in st.norms if x.input == out or g.through(x.input) == out), None)
        if pn is not None:
            norms.append(pn)
            out = pn.output
    return mlp, add2, (r, branch_end), out
