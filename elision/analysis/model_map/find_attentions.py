"""Every attention of the function as an :class:`Attention` record: SDPA calls, elision's fused attention, and
hand-written softmax(QK^T)V chains, with their projections, head counts and masks."""
from __future__ import annotations

from elision.analysis.model_map.attention import find_projection, match_explicit_attention, strip_gqa_repeat
from elision.analysis.model_map.ops import LAYOUT_OPS, SDPA_OPS, SOFTMAX_OPS, tensor_shape
from elision.analysis.model_map.records import Attention
from elision.analysis.model_map.state import MapState
from elision.ir.core import Node, Value


def find_attentions(st: MapState) -> list[Attention]:
    g = st.g
    found: list[Attention] = []
    for n in st.fn.nodes:
        if n.op in SDPA_OPS:
            args = list(n.args) + [None] * (4 - len(n.args))
            mask = args[3] if isinstance(args[3], Value) else n.kwargs.get("attn_mask")
            is_causal = bool(n.args[5] if len(n.args) > 5 else n.kwargs.get("is_causal", False))
            scale = n.kwargs.get("scale", n.args[6] if len(n.args) > 6 else None)
            mask = mask if isinstance(mask, Value) else None
            form = "none" if mask is None else ("sdpa-bool" if mask.type.dtype == "bool" else "additive")
            found.append(_attention(st, "sdpa", [n], n.result, n.args[0], n.args[1], n.args[2], mask, form,
                                         None, scale, is_causal, []))
        elif n.op == "elision.attention.default":
            args = list(n.args) + [None] * (6 - len(n.args))
            bias = args[3] if isinstance(args[3], Value) else None
            att = _attention(st, "fused", [n], n.result, args[0], args[1], args[2], bias,
                                  "none" if bias is None else "additive", None, args[4], bool(args[5]), [])
            att.k_unrepeated, att.v_unrepeated = args[1], args[2]
            found.append(att)
        elif n.op in SOFTMAX_OPS:
            m = match_explicit_attention(g, n)
            if m is None:
                where = f" at {n.loc}" if n.loc else ""
                st.notes.append(f"softmax %{n.result.name}{where} is not part of a recognized "
                                  f"softmax(QK^T)V attention")
                continue
            att = _attention(st, "explicit", m["nodes"], m["output"], m["q"], m["k"], m["v"], m["mask"],
                                  m["form"], m["fill"], m["scale"], False, m["mask_apply"])
            att.mask_scale = m["mask_scale"]
            found.append(att)
    return found


def _attention(st: MapState, kind, nodes, output, q, k, v, mask, form, fill, scale, is_causal, mask_apply) -> Attention:
    g = st.g
    loc = next((n.loc for n in nodes if n.loc), "")
    qp, rq, rn1 = find_projection(g, q, st.linears, st.norm_by_out)
    kp, rk, rn2 = find_projection(g, k, st.linears, st.norm_by_out)
    vp, _, _ = find_projection(g, v, st.linears, st.norm_by_out)
    # o_proj: the first linear fed (through layout ops) by the attention output
    op_ = None
    x = output
    for _ in range(8):
        us = st.g.uses.get(x, [])
        lins = [st.lin_by_node.get(id(u)) for u in us]
        lins = [l for l in lins if l is not None]
        if len(lins) == 1:
            op_ = lins[0]
            break
        nxt = [u for u in us if u.op in LAYOUT_OPS]
        # a linear fed through a flatten view (addmm form)
        hit = [st.lin_by_node.get(id(w)) for u in nxt for w in st.g.uses.get(u.result, [])]
        hit = [h for h in hit if h is not None and h.input == x]
        if hit:
            op_ = hit[0]
            break
        if len(nxt) != 1:
            break
        x = nxt[0].result
    qs = tensor_shape(q)
    heads = qs[1] if qs and isinstance(qs[1], int) else None
    head_dim = qs[3] if qs and isinstance(qs[3], int) else None
    packed = qp is not None and qp is kp
    # kv heads: the head dim of k as the attention reads it, before any GQA repetition
    k_un, v_un = strip_gqa_repeat(g, k), strip_gqa_repeat(g, v)
    if k_un is None or v_un is None or tensor_shape(k_un) != tensor_shape(v_un):
        k_un = v_un = None
    src = tensor_shape(k_un if k_un is not None else k)
    kv_heads = src[1] if src is not None and len(src) == 4 and isinstance(src[1], int) else None
    # a packed projection holds q, k and v heads: its width counts the kv heads even where the repetition was not
    # seen through (Falcon repeats k/v by index + expand before the head layout)
    packed_kv = (kp.out_features // head_dim - heads) // 2 if packed and head_dim and heads else None
    if k_un is None and packed_kv and packed_kv > 0 and heads % packed_kv == 0:
        kv_heads = packed_kv
    if kv_heads is None and head_dim and kp is not None and not packed:
        kv_heads = kp.out_features // head_dim
    mask_nodes: list[Node] = []
    if mask is not None:
        anc = g.ancestors(mask) | {mask}
        mask_nodes = [n for n in st.fn.nodes if n.result in anc and n.op != "param"]
    mask_nodes += [n for n in mask_apply if n not in mask_nodes]
    att = Attention(kind=kind, nodes=nodes, output=output, q=q, k=k, v=v, q_proj=qp, k_proj=kp, v_proj=vp,
                    o_proj=op_, num_heads=heads, num_kv_heads=kv_heads, head_dim=head_dim,
                    causal=True if is_causal else None, mask=mask, mask_nodes=mask_nodes, rotary=rq or rk,
                    mask_kind="causal" if is_causal else "none", mask_form=form, mask_fill=fill,
                    scale=scale, packed_qkv=packed, k_unrepeated=k_un, v_unrepeated=v_un, loc=loc)
    st.claim(nodes)
    st.claim(rn1 + rn2)
    st.claim(mask_nodes)
    for p in (qp, kp, vp, op_):
        if p is not None:
            st.claim(p.nodes)
    missing = [name for name, p in (("q", qp), ("k", kp), ("v", vp), ("o", op_)) if p is None]
    if missing:
        st.notes.append(f"attention at {loc or '%' + output.name}: no {'/'.join(missing)} projection found "
                          f"(not a linear reached through layout ops)")
    if heads is None or head_dim is None:
        st.notes.append(f"attention at {loc or '%' + output.name}: q is not a [B, H, L, D] tensor with static "
                          f"H and D ({q.type}); head counts unknown")
    return att
