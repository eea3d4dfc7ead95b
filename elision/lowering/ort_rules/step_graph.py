"""`@verify` (exported to ONNX) -> the generation *step* graph ONNX Runtime runs with its KV cache in place.

The exported `@verify(input_ids, positions, attn_bias, past_0, past_1, ...) -> (logits, k_0, v_0, ...)` concatenates
the past K/V with the new ones in every attention and returns the new slices for the host to copy into its cache.
`lower_generation_step` rewrites it, with the onnxscript rewriter, into the signature of
`elision.runtime.generation.step_signature`:

1. onnxscript's optimizer and its generic ORT fusions: RMSNorm -> SimplifiedLayerNormalization, residual add +
   RMSNorm -> SkipSimplifiedLayerNormalization, rotate-half rotary -> RotaryEmbedding, decomposed attention -> SDPA;
2. `TreeGroupQueryAttention` and its no-rotary twin (tree_gqa.py): every attention -> GroupQueryAttention over a
   shared past/present buffer, reading the new `seqlens_k`, `total_sequence_length`, `query_seqlens` inputs and
   rotary tables;
3. `PackQKV` (pack_qkv.py): the three projections -> one GEMM;
4. the new signature: the returned K/V slices give way to GQA's present outputs, inputs get their step names.

Every attention must fuse, or nothing changes: `StepLoweringError` says which part did not (the caller then keeps
the `@verify` form, which the runtime still runs).
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import onnx_ir as ir
import onnx_ir.passes.common as common_passes
from onnxscript import optimizer
from onnxscript.rewriter import pattern
from onnxscript.rewriter.ort_fusions.rms_normalization import fuse_rms_normalization
from onnxscript.rewriter.ort_fusions.rotary_embedding import fuse_rotary_embedding
from onnxscript.rewriter.ort_fusions.sdpa import fuse_sdpa
from onnxscript.rewriter.ort_fusions.skip_normalization import fuse_skip_rms_normalization

from elision.lowering.ort_rules.pack_qkv import pack_qkv_rules
from elision.lowering.ort_rules.tree_gqa import (MS_DOMAIN, GQAInputs, TreeGroupQueryAttention,
                                                 TreeGroupQueryAttentionNoRotary, TreeGroupQueryAttentionPartialRotary)
from elision.runtime.generation import step_signature as sig

__all__ = ["StepLoweringError", "lower_generation_step", "VERIFY_INPUTS"]

VERIFY_INPUTS = ("input_ids", "positions", "attn_bias")  # then past_0, past_1, ... (K, V per layer)


class StepLoweringError(ValueError):
    """The exported graph does not fit the in-place step form (the message says which part did not fuse)."""


def _int_input(name: str, shape: list) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(ir.DataType.INT32), shape=ir.Shape(shape))


def _prepare(model: ir.Model) -> dict[str, int]:
    """Shape inference, constant folding and onnxscript's generic fusions (what the GQA rule matches on)."""
    common_passes.ShapeInferencePass()(model)
    optimizer.optimize(model)  # once: it is the lowering's most expensive part on a large model
    counts = {"rms_normalization": fuse_rms_normalization(model),
              "skip_rms_normalization": fuse_skip_rms_normalization(model),
              "rotary_embedding": fuse_rotary_embedding(model),
              "sdpa": fuse_sdpa(model)}
    common_passes.RemoveUnusedNodesPass()(model)  # leftovers of the fused subgraphs would block the next match
    return counts


def _check_verify_signature(graph: ir.Graph) -> tuple[list[ir.Value], int]:
    names = [v.name for v in graph.inputs]
    pasts = list(graph.inputs[len(VERIFY_INPUTS):])
    if tuple(names[: len(VERIFY_INPUTS)]) != VERIFY_INPUTS or not pasts or len(pasts) % 2:
        raise StepLoweringError(f"expected the @verify signature {', '.join(VERIFY_INPUTS)}, past_0, past_1, ...; "
                                f"got inputs {names}")
    if len(graph.outputs) != 1 + len(pasts):
        raise StepLoweringError(f"expected logits plus {len(pasts)} new K/V outputs, got {len(graph.outputs)} outputs")
    return pasts, len(pasts) // 2


def _fuse_attention(model: ir.Model, pasts: list[ir.Value], max_positions: int) -> GQAInputs:
    graph = model.graph
    while len(graph.outputs) > 1:  # the new K/V slices: GQA writes them into the buffers instead
        graph.outputs.pop()  # (pop, not del of a slice: onnx_ir then unmarks them as graph outputs)
    new = GQAInputs(model, _int_input(sig.SEQLENS_K, ["batch"]), _int_input(sig.TOTAL_SEQUENCE_LENGTH, []),
                    _int_input(sig.QUERY_SEQLENS, ["batch"]), max_positions)
    graph.inputs.extend([new.seqlens_k, new.total_sequence_length, new.query_seqlens])
    rules = (TreeGroupQueryAttention, TreeGroupQueryAttentionPartialRotary, TreeGroupQueryAttentionNoRotary)
    fused = pattern.RewriteRuleSet([rule.rule(new) for rule in rules]).apply_to_model(model)
    layers = len(pasts) // 2
    unfused = [p.name for p in pasts if p.name not in new.presents]
    if fused != layers or unfused:
        why = f" ({new.failures[0]})" if new.failures else ""
        raise StepLoweringError(f"{fused} of {layers} attention layers became GroupQueryAttention{why}; "
                                f"past inputs left unfused: {unfused[:4]}")
    common_passes.RemoveUnusedNodesPass()(model)
    for past in pasts:  # a Shape of a past input's length would now read the buffer size, not the cache length
        fused_reads = [u for u in past.uses() if (u.node.op_type, u.node.domain, u.idx) in
                       {("GroupQueryAttention", MS_DOMAIN, 3), ("GroupQueryAttention", MS_DOMAIN, 4)}]
        others = [u for u in past.uses() if u not in fused_reads and not _reads_batch_or_heads(u.node)]
        if len(fused_reads) != 1 or others:
            users = {(u.node.op_type, u.node.domain, u.idx) for u in past.uses()}
            raise StepLoweringError(f"past input {past.name} is still read outside its GroupQueryAttention: {users}")
    return new


def _reads_batch_or_heads(node: ir.Node) -> bool:
    """A Shape of only the leading [batch, kv_heads] dims (GPT-2 takes its batch size from the past K): those are the
    same in the concatenating past and in the shared buffer, unlike the length."""
    if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
        return False
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
    return end is not None and 0 <= start < end <= 2


def _rename(graph: ir.Graph, pasts: list[ir.Value], presents: dict[str, ir.Value], kv_heads: int,
            head_dim: int) -> None:
    ids, positions, bias = graph.inputs[: len(VERIFY_INPUTS)]
    positions.name, bias.name = sig.POSITION_IDS, sig.ATTENTION_BIAS
    bias.shape = ir.Shape(["batch", 1, "n", "total_length"])
    graph.outputs[0].name = sig.LOGITS
    for i, past in enumerate(pasts):
        layer, kind = divmod(i, 2)
        kind_name = ("key", "value")[kind]
        present = presents[past.name]
        past.name = sig.past_name(layer, kind_name)
        present.name = sig.present_name(layer, kind_name)
        shape = ir.Shape(["batch", kv_heads, "max_length", head_dim])
        past.shape, present.shape = shape, shape
        present.type = past.type
        graph.outputs.append(present)


def lower_generation_step(model: ir.Model, *, max_positions: int, kv_heads: int, head_dim: int) -> dict[str, Any]:
    """Rewrite the exported `@verify` `model` in place into the step graph; returns a report of what fired.

    `max_positions` sizes the rotary tables (the model's position limit). Raises StepLoweringError (model
    unchanged in meaning but not in structure: reload it) when an attention does not fit.
    """
    pasts, layers = _check_verify_signature(model.graph)
    counts = _prepare(model)
    new = _fuse_attention(model, pasts, max_positions)
    _rename(model.graph, pasts, new.presents, kv_heads, head_dim)
    counts["group_query_attention"] = layers
    # the graph outputs now hold GQA's presents, so the packing rule's replacement keeps them as outputs
    counts["packed_qkv"] = pack_qkv_rules().apply_to_model(model)
    for cleanup in (common_passes.RemoveUnusedNodesPass(), common_passes.RemoveUnusedFunctionsPass(),
                    common_passes.RemoveUnusedOpsetsPass()):
        cleanup(model)
    ops = Counter(f"{n.domain}.{n.op_type}" if n.domain else n.op_type for n in model.graph)
    return {"fusions": counts, "ops": dict(ops.most_common())}
