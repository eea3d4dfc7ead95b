"""ONNX translations of aten ops whose stock torch.onnx translation is wrong for the graphs elision exports.

* ``aten._scaled_dot_product_flash_attention_for_cpu``: what SDPA becomes when a graph is lowered to ATen on
  CPU (e.g. by ``make_fx``). PyTorch's CPU kernel accepts grouped-query attention (fewer key/value heads than
  query heads) directly, but the stock translation treats it as multi-head attention and emits a MatMul of
  mismatched head counts, which ONNX Runtime rejects at load time ("MatMul ... Incompatible dimensions") —
  the failure that sent Llama-family graphs of the ``onnxruntime`` target back to eager. This translation
  repeats each key/value head for its query group, applies SDPA's own causal convention (top-left aligned:
  query ``i`` sees keys ``j <= i``), and returns the real log-sum-exp as the second output.
"""
from __future__ import annotations

from typing import Callable

import onnx_ir
import torch
from onnxscript.onnx_opset import opset18 as op

from elision.lowering.onnx_ops import _const_i64, _from_float, _repeat_heads, _softmax_zero_rows, _static_dim, _to_float

__all__ = ["aten_translation_table"]


def _top_left_causal_hidden(q, k):  # type: ignore[no-untyped-def]
    """[Lq, Lk] bool, True where key j is after query i (SDPA's is_causal: tril(ones(Lq, Lk)))."""
    zero, one = _const_i64([0]), _const_i64([1])
    q_pos = op.Range(op.Squeeze(zero), op.Squeeze(op.Shape(q, start=2, end=3)), op.Squeeze(one))
    k_pos = op.Range(op.Squeeze(zero), op.Squeeze(op.Shape(k, start=2, end=3)), op.Squeeze(one))
    return op.Greater(op.Unsqueeze(k_pos, zero), op.Unsqueeze(q_pos, one))


def sdpa_flash_for_cpu(query, key, value, dropout_p: float = 0.0, is_causal: bool = False, attn_mask=None,
                       scale: float | None = None):  # type: ignore[no-untyped-def]
    """(output [B,Hq,Lq,D], logsumexp float32 [B,Hq,Lq]) with GQA; dropout must be 0 (inference)."""
    if dropout_p != 0.0:
        raise ValueError("ONNX translation of SDPA supports inference only (dropout_p must be 0)")
    heads = _static_dim(query, 1, "number of query heads")
    kv_heads = _static_dim(key, 1, "number of key/value heads")
    head_dim = _static_dim(query, 3, "head_dim")
    if heads % kv_heads:
        raise ValueError(f"SDPA with {heads} query heads and {kv_heads} key/value heads: not a grouped-query layout")
    kf = _repeat_heads(_to_float(key), kv_heads, heads)
    vf = _repeat_heads(_to_float(value), kv_heads, heads)
    qf = op.Mul(_to_float(query), op.Constant(value_float=scale if scale is not None else head_dim ** -0.5))
    logits = op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2]))  # [B, H, Lq, Lk]
    masked = is_causal or attn_mask is not None
    if attn_mask is not None:
        if attn_mask.dtype == onnx_ir.DataType.BOOL:  # True keeps the position
            logits = op.Where(attn_mask, logits, op.Constant(value_float=float("-inf")))
        else:
            logits = op.Add(logits, _to_float(attn_mask))
    if is_causal:
        logits = op.Where(_top_left_causal_hidden(query, key), op.Constant(value_float=float("-inf")), logits)
    probs = _softmax_zero_rows(logits) if masked else op.Softmax(logits, axis=-1)
    out = _from_float(op.MatMul(probs, vf), query)
    logsumexp = op.ReduceLogSumExp(logits, _const_i64([-1]), keepdims=0)
    return out, logsumexp


def aten_translation_table() -> dict[torch._ops.OpOverload, Callable]:
    return {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default: sdpa_flash_for_cpu}
