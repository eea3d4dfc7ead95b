"""Matching attention: the hand-written softmax(mask(scale * q @ k^T)) @ v chain, and walking back from the q/k/v
an attention reads to their projections (through layout ops, rotary embeddings, q/k norms, packed-qkv splits) and
to k/v before grouped-query head repetition."""
from __future__ import annotations

from elision.analysis.model_map.graph_view import GraphView
from elision.analysis.model_map.ops import (TO_THE_END, LAYOUT_OPS, MATMUL_OPS, REPEAT_OPS, is_full_slice,
                                           is_scalar_const, tensor_shape)
from elision.analysis.model_map.records import Linear, Norm
from elision.ir.core import Node, Value


def _rotated_half(g: GraphView, r: Value) -> tuple[Node, list[Node]] | None:
    """The node building ``rotate_half(x)`` that ``r`` reads, and the reshapes between: ``cat(-x2, x1)`` (Llama),
    or ``stack(-x[..., 1::2], x[..., ::2], -1)`` flattened by a view (interleaved rotary: GPT-J, Cohere, Helium)."""
    views: list[Node] = []
    rp = g.prod.get(r) if isinstance(r, Value) else None
    while rp is not None and rp.op in ("aten.view.default", "aten.reshape.default", "aten._unsafe_view.default",
                                       "aten.flatten.using_ints"):
        views.append(rp)
        rp = g.prod.get(rp.args[0]) if isinstance(rp.args[0], Value) else None
    if rp is None or rp.op not in ("aten.cat.default", "aten.stack.default") or (rp.op == "aten.stack.default"
                                                                                 and not views):
        return None
    return rp, views


def strip_rotary(g: GraphView, v: Value) -> tuple[Value, bool, list[Node]]:
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
                rotated = _rotated_half(g, b.args[ri])
                if rotated is None:
                    continue
                rp, views = rotated
                ins = [i for i in rp.inputs]
                if all(x in g.ancestors(i) for i in ins):
                    nodes = [a, b, p, rp] + views + [g.prod[i] for i in ins if i in g.prod]
                    return x, True, nodes
    return v, False, []


def strip_gqa_repeat(g: GraphView, v: Value) -> Value | None:
    """k/v before ``repeat_kv`` (unsqueeze(2)+expand+clone+view) or ``repeat_interleave(dim=1)``."""
    p = g.prod.get(v)
    if p is None:
        return None
    if p.op in REPEAT_OPS and len(p.args) >= 3 and p.args[2] == 1:
        return p.args[0]
    if p.op in ("aten._unsafe_view.default", "aten.view.default", "aten.reshape.default"):
        c = g.prod.get(p.args[0])
        if c is not None and c.op in ("aten.clone.default", "aten.contiguous.default"):
            c = g.prod.get(c.args[0])
        if c is None or c.op != "aten.expand.default":
            return None
        src = g.skip_full_slices(c.args[0])
        u = g.prod.get(src)
        if u is None or u.op != "aten.unsqueeze.default" or u.args[1] != 2:
            return None
        return g.skip_full_slices(u.args[0])
    return None


def find_projection(g: GraphView, v: Value, linears: dict[Value, Linear],
                     norms: dict[Value, Norm] | None = None) -> tuple[Linear | None, bool, list[Node]]:
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
        x, is_rot, nodes = strip_rotary(g, v)
        if is_rot:
            rotary, v = True, x
            rot_nodes += nodes
            continue
        p = g.prod.get(v)
        if p is None:
            return None, rotary, rot_nodes
        if p.op in LAYOUT_OPS or p.op in REPEAT_OPS:
            v = p.args[0]
            continue
        if p.op == "aten.cat.default":  # cat with an empty (cache) tensor is the identity
            parts = [x for x in p.args[0] if isinstance(x, Value)]
            live = [x for x in parts if 0 not in (tensor_shape(x) or (1,))]
            if len(live) == 1 and len(parts) == len(p.args[0]):
                v = live[0]
                continue
            partial = _partial_rotary(g, p)
            if partial is not None:
                v, nodes = partial
                rotary = True
                rot_nodes += nodes
                continue
        if p.op == "aten.index.Tensor" and _constant_selection(g, p):  # Falcon picks k/v heads by constant index
            v = p.args[0]
            continue
        if p.op == "getitem":  # split of a packed projection
            sp = g.prod.get(p.args[0])
            if sp is not None and sp.op in ("aten.split.Tensor", "aten.split_with_sizes.default", "aten.chunk.default",
                                            "aten.unbind.int"):
                v = sp.args[0]
                continue
        if p.op == "aten.mul.Tensor" and is_scalar_const(p.args[1]):  # pre-scaled q
            v = p.args[0]
            continue
        return None, rotary, rot_nodes
    return None, rotary, rot_nodes


def _slice_span(g: GraphView, v: Value, dim: int) -> tuple[Value, int, int | None] | None:
    """``v`` as ``base[..., start:end]`` along ``dim`` (other slices must keep everything): (base, start, end);
    end None means to the end."""
    start, end = 0, None
    p = g.prod.get(v)
    while p is not None and p.op == "aten.slice.Tensor" and isinstance(p.args[0], Value):
        if not is_full_slice(p):
            args = list(p.args) + [None] * (5 - len(p.args))
            rank = len(tensor_shape(p.args[0]) or ())
            sdim, s0, s1, step = args[1] % rank if rank else args[1], args[2] or 0, args[3], args[4] or 1
            if sdim != dim or step != 1 or (start, end) != (0, None) or not isinstance(s0, int) or s0 < 0 or \
                    not (s1 is None or isinstance(s1, int) and s1 > 0):
                return None
            start, end = s0, None if s1 is None or s1 >= TO_THE_END else s1
        v = p.args[0]
        p = g.prod.get(v)
    return v, start, end


def _partial_rotary(g: GraphView, cat: Node) -> tuple[Value, list[Node]] | None:
    """``cat([rotary(x[..., :r]), x[..., r:]], -1)``: partial rotary (GPT-NeoX, GPT-J, Phi, StableLM). Every part
    is a consecutive slice of one ``x`` along the cat dim, at least one with rotary applied: returns (x, nodes)."""
    rank = len(tensor_shape(cat.result) or ())
    dim = cat.args[1] if len(cat.args) > 1 else 0
    if not rank or not isinstance(dim, int):
        return None
    dim %= rank
    base, pos, nodes, rotated = None, 0, [cat], False
    parts = list(cat.args[0])
    for i, part in enumerate(parts):
        if not isinstance(part, Value):
            return None
        x, is_rot, rn = strip_rotary(g, part)
        span = _slice_span(g, x, dim)
        if span is None:
            return None
        b, start, end = span
        if (base is not None and b != base) or start != pos or (end is None) != (i == len(parts) - 1):
            return None
        base, pos, rotated = b, end, rotated or is_rot
        nodes += rn
    return (base, nodes) if rotated else None


def _constant_selection(g: GraphView, p: Node) -> bool:
    """``x[..., idx]`` where every index tensor is a constant (computed from no model input)."""
    indices = p.args[1] if len(p.args) > 1 else None
    if not isinstance(indices, (list, tuple)):
        return False
    tensors = [i for i in indices if i is not None]
    return bool(tensors) and all(isinstance(i, Value) and not ((g.ancestors(i) | {i}) & g.inputs) for i in tensors)


def _is_4d(v: Value) -> tuple | None:
    s = tensor_shape(v)
    return s if s is not None and len(s) == 4 else None


def match_explicit_attention(g: GraphView, sm: Node) -> dict | None:
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
            if mask is not None or not is_scalar_const(p.args[2]):
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
            elif is_scalar_const(fillv):
                fill = float(fillv)
            else:
                return None
            mask, form = p.args[0], "where-keep"
            mask_apply.append(p)
            nodes.insert(0, p)
            x = p.args[1]
            continue
        if p.op in ("aten.div.Tensor", "aten.mul.Tensor") and is_scalar_const(p.args[1]):
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
    if qp is not None and qp.op == "aten.mul.Tensor" and is_scalar_const(qp.args[1]):
        scale *= float(qp.args[1])
        q = qp.args[0]
        nodes.insert(0, qp)
    if _is_4d(q) is None or _is_4d(k) is None or _is_4d(v) is None:
        return None
    return dict(nodes=nodes, q=q, k=k, v=v, output=pv[0].result, mask=mask, form=form, fill=fill, scale=scale,
                mask_apply=mask_apply, mask_scale=mask_scale if mask is not None else 1.0)
