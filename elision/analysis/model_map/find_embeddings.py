"""What feeds the layer stacks: token, position and extra (segment) embeddings, a ViT patch embedding and its
[CLS] token, a VLM's image merge and projector, and the position ids."""
from __future__ import annotations

from elision.analysis.model_map.ops import LAYOUT_OPS, tensor_shape, ADD_OPS
from elision.analysis.model_map.records import Attention, ClsToken, Embedding, Layer, Linear, PatchEmbed
from elision.analysis.model_map.state import MapState
from elision.ir.core import Node, Value
from elision.ir.types import TensorType


def find_embeddings(st: MapState) -> tuple[Embedding | None, Embedding | None]:
    g = st.g
    token = pos = None
    for n in st.fn.nodes:
        if n.op != "aten.embedding.default":
            continue
        w = g.param_name(n.args[0])
        idx = n.args[1]
        if w is None:
            continue
        wt = st.module.params[w]
        e = Embedding(n, w, idx, n.result, int(wt.shape[0]), int(wt.shape[1]))
        src = g.through(idx, LAYOUT_OPS)
        if src in g.inputs and token is None:
            token = e
            st.claim([n])
        elif pos is None and _is_positions(st, idx):
            pos = e
            st.claim([n])
        elif token is not None and _added_to(st, e.output, token.output):
            # segment / token-type embeddings summed into the token embedding
            st.extra_embeddings.append(e)
            st.claim([n])
    return token, pos


def _added_to(st: MapState, v: Value, base: Value) -> bool:
    """``v`` is summed with ``base`` (possibly after other summands)."""
    g = st.g
    for u in g.uses.get(v, []):
        if u.op in ADD_OPS and base in g.ancestors(u.result):
            return True
    return False


def _is_positions(st: MapState, idx: Value) -> bool:
    """Indices built from an arange, or read from a ``*position_ids`` buffer (name as supporting evidence)."""
    g = st.g
    anc = g.ancestors(idx) | {idx}
    if any(g.op(a) == "aten.arange.default" for a in anc):
        return True
    roots = [g.prod[a].args[0] for a in anc if g.op(a) == "param"]
    return bool(roots) and all("position" in r for r in roots)


def find_patch_embed(st: MapState) -> tuple[PatchEmbed | None, ClsToken | None]:
    g = st.g
    for n in st.fn.nodes:
        if n.op not in ("aten.conv2d.default", "aten.convolution.default", "aten.conv3d.default"):
            continue
        if g.through(n.args[0], LAYOUT_OPS) not in g.inputs:
            continue
        w = g.param_name(n.args[1])
        if w is None:
            continue
        wt = st.module.params[w]
        kernel = tuple(int(s) for s in wt.shape[2:])
        stride = n.args[3] if len(n.args) > 3 else n.kwargs.get("stride", [1])
        stride = tuple(stride) if isinstance(stride, (list, tuple)) else (stride,)
        if len(stride) == 1:
            stride = stride * len(kernel)
        if stride != kernel:
            st.notes.append(f"convolution at {n.loc}: stride {stride} != kernel {kernel}, not a patch embedding")
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
        shape = tensor_shape(out)
        n_patches = shape[1] if shape and len(shape) == 3 and isinstance(shape[1], int) else None
        pe = PatchEmbed(n, w, b, g.through(n.args[0], LAYOUT_OPS), out, kernel, n_patches, int(wt.shape[0]))
        st.claim(nodes)
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
                        st.claim([u])
                        break
        return pe, cls
    return None, None


def find_image_merge(st: MapState) -> Node | None:
    for n in st.fn.nodes:
        if n.op in ("aten.masked_scatter.default", "aten.index_put.default") and len(n.args) >= 3:
            st.claim([n])
            return n
    return None


def find_projector(st: MapState, merge: Node | None, stacks: dict[str, list[Layer]]) -> list[Linear]:
    """Linears between the end of a layer stack that is not fed by tokens and the image merge."""
    if merge is None:
        return []
    g = st.g
    anc = g.ancestors(merge.result)
    for layers in stacks.values():
        end = layers[-1].output
        if end in anc:
            body = g.nodes_between([end], merge.args[2] if isinstance(merge.args[2], Value) else merge.result)
            lins = [st.lin_by_node[id(n)] for n in body if id(n) in st.lin_by_node]
            for l in lins:
                st.claim(l.nodes)
            return lins
    # the vision features may be taken from an earlier layer (LLaVA's vision_feature_layer=-2)
    for layers in stacks.values():
        for ly in reversed(layers):
            if ly.output in anc:
                body = g.nodes_between([ly.output], merge.result)
                lins = [st.lin_by_node[id(n)] for n in body if id(n) in st.lin_by_node
                        and not any(st.lin_by_node[id(n)] is p for stack in stacks.values() for x in stack
                                    for p in (x.attention.q_proj, x.attention.k_proj, x.attention.v_proj,
                                              x.attention.o_proj))]
                lins = [l for l in lins if not any(l in (x.mlp.linears if x.mlp else []) for stack in stacks.values()
                                                   for x in stack)]
                for l in lins:
                    st.claim(l.nodes)
                return lins
    return []


def find_position_ids(st: MapState, attentions: list[Attention], pos_emb: Embedding | None):
    g = st.g
    val = None
    if not any(a.rotary for a in attentions) and pos_emb is not None:
        val = pos_emb.input
    else:
        for n in st.fn.nodes:
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
            if p is not None and p.op == "aten.unsqueeze.default" and len(tensor_shape(val) or ()) > 2:
                val = p.args[0]
            else:
                break
    if val is None:
        return None, []
    anc = g.ancestors(val) | {val}
    nodes = [n for n in st.fn.nodes if n.result in anc and n.op != "param"]
    st.claim(nodes)
    for n in st.fn.nodes:  # the rotary tables (cos/sin of positions x inv_freq)
        if n.loc.endswith("rotary_emb") or n.op in ("aten.cos.default", "aten.sin.default"):
            st.claim([n])
    return val, nodes
