"""Building a model map: linears and norms first, then attentions and their masks, the residual layers around
them, what feeds the stacks (embeddings, patches, positions), the head, and notes on whatever stayed unexplained."""
from __future__ import annotations

from elision.analysis.cache import analyses
from elision.analysis.model_map.decoder import NotADecoder, find_decoder
from elision.analysis.model_map.find_attentions import find_attentions
from elision.analysis.model_map.find_embeddings import (find_embeddings, find_image_merge, find_patch_embed,
                                                        find_position_ids, find_projector)
from elision.analysis.model_map.find_layers import find_layers
from elision.analysis.model_map.linears import match_linear
from elision.analysis.model_map.masks import classify_masks
from elision.analysis.model_map.norms import match_norm
from elision.analysis.model_map.ops import LAYOUT_OPS, is_scalar_const, opname
from elision.analysis.model_map.records import Embedding, Layer, Linear, ModelKind, Norm, PatchEmbed
from elision.analysis.model_map.result import ModelMap
from elision.analysis.model_map.state import MapState
from elision.ir.core import Function, Module, Node


def build_model_map(module: Module, fn_name: str = "forward") -> ModelMap:
    """The model map of function ``fn_name`` (cached until a pass changes the module)."""
    if fn_name not in module.functions:
        raise KeyError(f"module has no function @{fn_name}; functions: {', '.join(module.functions)}")
    return analyses().get("model-map:" + fn_name, module, lambda m: map_function(m, m.functions[fn_name]))


def map_function(module: Module, fn: Function) -> ModelMap:
    """The model map of ``fn`` (a function of ``module``, or a copy of one), computed afresh."""
    st = MapState(module, fn)
    g = st.g
    for n in st.fn.nodes:
        lin = match_linear(g, n)
        if lin is not None:
            st.linears[lin.output] = lin
    st.lin_by_node = {id(l.node): l for l in st.linears.values()}
    st.norms = _find_norms(st)
    st.norm_by_out = {n.output: n for n in st.norms}
    attentions = find_attentions(st)
    classify_masks(st, attentions)
    layers = find_layers(st, attentions)
    stacks: dict[str, list[Layer]] = {}
    for ly in layers:
        stacks.setdefault(ly.stack, []).append(ly)
    embedding, pos_emb = find_embeddings(st)
    patch, cls_tok = find_patch_embed(st)
    merge = find_image_merge(st)
    projector = find_projector(st, merge, stacks)
    st.stacks_found = list(stacks.values())
    main = _main_stack(st, stacks, embedding)
    final_norm, lm_head = _find_head(st, main)
    position_ids, position_nodes = find_position_ids(st, attentions, pos_emb)
    mask_nodes: list[Node] = []
    seen: set[int] = set()
    for a in attentions:
        for n in a.mask_nodes:
            if id(n) not in seen:
                seen.add(id(n))
                mask_nodes.append(n)
    kind = _kind(st, main, embedding, patch)
    _coverage_notes(st)
    try:
        decoder, decoder_problem = find_decoder(g, attentions), None
    except NotADecoder as e:
        decoder, decoder_problem = None, str(e)
    hist: dict[str, int] = {}
    for n in st.fn.nodes:
        hist[n.op] = hist.get(n.op, 0) + 1
    return ModelMap(kind=kind, embedding=embedding, layers=main, final_norm=final_norm, lm_head=lm_head,
                    patch_embed=patch, cls_token=cls_tok, position_ids=position_ids,
                    position_nodes=position_nodes, attention_mask=mask_nodes, unrecognized=st.notes,
                    stacks=stacks, position_embedding=pos_emb, image_merge=merge, fn_name=fn.name,
                    extra_embeddings=st.extra_embeddings, projector=projector,
                    attentions=attentions, norms=st.norms,
                    op_histogram=dict(sorted(hist.items(), key=lambda kv: -kv[1])),
                    decoder=decoder, decoder_problem=decoder_problem)


def _find_norms(st: MapState) -> list[Norm]:
    out = []
    for n in st.fn.nodes:
        norm = match_norm(st.g, n)
        if norm is not None:
            out.append(norm)
            st.claim(norm.nodes)
    return out


def _main_stack(st: MapState, stacks: dict[str, list[Layer]], embedding: Embedding | None) -> list[Layer]:
    if not stacks:
        return []
    if embedding is not None:
        # the stack fed by the token embedding (a VLM's language model)
        for layers in stacks.values():
            if embedding.output in st.g.ancestors(layers[0].input) | {layers[0].input}:
                return layers
    return max(stacks.values(), key=len)


def _find_head(st: MapState, main: list[Layer]) -> tuple[Norm | None, Linear | None]:
    g = st.g
    final_norm = lm_head = None
    if not main:
        return None, None
    last = main[-1].output
    layer_inputs = [x for stack in st.stacks_found for ly in stack for x in (ly.input, ly.attention.output)]
    for nm in st.norms:
        if g.through(nm.input, LAYOUT_OPS) == last and nm not in main[-1].norms:
            # a final norm leads to the outputs, not into another layer (a cross-attention's memory norm)
            if any(nm.output in g.ancestors(x) or nm.output == x for x in layer_inputs):
                continue
            if any(nm.output == o or nm.output in g.ancestors(o) for o in st.fn.outputs):
                final_norm = nm
                break
    for o in st.fn.outputs:
        src = g.through(o, LAYOUT_OPS)
        scaled = g.prod.get(src)
        if scaled is not None and scaled.op in ("aten.mul.Tensor", "aten.div.Tensor") and \
                is_scalar_const(scaled.args[1]):  # logits scaled after the head (Cohere's logit_scale)
            src = g.through(scaled.args[0], LAYOUT_OPS)
        lin = st.linears.get(src) or st.lin_by_node.get(id(g.prod.get(src)))
        if lin is None:
            continue
        feed = g.through(lin.input, LAYOUT_OPS)
        # the norm's output may be its cast back to the input dtype, which `through` also walks past
        if feed == last or (final_norm is not None and feed == g.through(final_norm.output, LAYOUT_OPS)):
            lm_head = lin
            st.claim(lin.nodes)
    return final_norm, lm_head


def _kind(st: MapState, main: list[Layer], embedding: Embedding | None, patch: PatchEmbed | None) -> ModelKind:
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
    st.notes.append(f"model kind: the main layer stack reads {feed} and its attention is {mix}; "
                      f"no decoder / encoder / vision pattern fits")
    return "unknown"


def _coverage_notes(st: MapState) -> None:
    """Compute nodes no recognized structure explains, grouped by model location."""
    heavy = {"aten.linear.default", "aten.addmm.default", "aten.mm.default", "aten.matmul.default",
             "aten.bmm.default", "aten.conv1d.default", "aten.conv2d.default", "aten.conv3d.default",
             "aten.convolution.default", "aten.embedding.default", "aten._softmax.default", "aten.softmax.int",
             "aten.scaled_dot_product_attention.default", "aten.layer_norm.default", "aten.group_norm.default",
             "aten.batch_norm.default", "aten._native_batch_norm_legit_no_training.default", "aten.einsum.default"}
    groups: dict[str, list[str]] = {}
    for n in st.fn.nodes:
        if n.op in heavy and id(n) not in st.claimed:
            groups.setdefault(n.loc or "(no location)", []).append(opname(n))
    for loc, ops in groups.items():
        counts: dict[str, int] = {}
        for o in ops:
            counts[o] = counts.get(o, 0) + 1
        what = ", ".join(f"{c} {o}" for o, c in counts.items())
        st.notes.append(f"{loc}: {what} not part of any recognized structure")
