"""Model map: find the transformer structure (embedding, layer stack, attention, norms, MLP, heads) in IR.

Roles are identified from dataflow — an attention is a ``scaled_dot_product_attention`` node or a
``matmul -> softmax -> matmul`` chain; a residual add is an ``aten.add`` whose other operand is the value that
feeds the layer's norm/projections; an RMSNorm is the ``pow/mean/add eps/rsqrt/mul`` chain — while the node
``loc`` (module path) only groups nodes into layers and names things. Whatever could not be matched is listed in
``ModelMap.unrecognized`` with a human-readable reason instead of being guessed.

Masks are classified (causal / bidirectional / custom) by *evaluating* the mask subgraph on small synthetic
inputs (`masks`). The decoder view (`decoder`: attention sites with their un-repeated K/V, position ids, LM head,
each layer's residual stream) is what the speculative-decoding passes build on.

Modules: `records` (the parts), `result` (ModelMap and its reports), `graph_view` (dataflow queries), `ops` (op
families), matchers (`linears`, `norms`, `attention`), finders over a function (`find_attentions`, `masks`,
`find_layers`, `find_embeddings`), `decoder`, and `builder` (the order they run in; the cached entry point).

Use :func:`build_model_map` (cached through the analysis manager; a pass that changes the graph invalidates it).
"""
from elision.analysis.model_map.builder import build_model_map, map_function
from elision.analysis.model_map.decoder import (AttentionSite, DecoderMap, NotADecoder, lm_head_input,
                                                residual_streams)
from elision.analysis.model_map.records import (MLP, Attention, ClsToken, Embedding, Layer, Linear, ModelKind, Norm,
                                                PatchEmbed)
from elision.analysis.model_map.result import ModelMap

__all__ = ["ModelMap", "ModelKind", "Layer", "Attention", "MLP", "Norm", "Embedding", "Linear", "PatchEmbed",
           "ClsToken", "build_model_map", "map_function", "AttentionSite", "DecoderMap", "NotADecoder",
           "lm_head_input", "residual_streams"]
