"""ONNX translations of the ``elision::*`` ops for ``torch.onnx.export(..., dynamo=True)``.

Usage::

    torch.onnx.export(model, args, dynamo=True, opset_version=18,
                      custom_translation_table=custom_translation_table())

Each translation is a trace-only onnxscript function (plain Python calling ``op.*``) that the
exporter runs with symbolic values.  Everything targets opset 18 plus ONNX Runtime's
``com.microsoft`` contrib ops, and every choice was checked against ORT's CPU execution provider
(see ``tests/test_kernels_onnx.py``):

* ``attention`` / ``sparse_cross_attention``: standard MatMul / Softmax-style
  decompositions.  ORT's fused ``MultiHeadAttention``/``GroupQueryAttention`` do not reproduce the
  op's semantics (bottom-right causal alignment with ``Lq != Lk``, zeros for fully masked rows,
  fp32 softmax for fp16 inputs), so the decomposition is used; GQA folds the query heads of a
  KV group into the row dim (``[B,Hkv,G*Lq,D] @ [B,Hkv,D,Lk]``) instead of repeating KV heads.
* ``rms_norm``: Pow/ReduceMean/Sqrt/Div/Mul (ORT's optimizer fuses this exact pattern into its
  ``SimplifiedLayerNormalization`` kernel; emitting that op directly would fail ``onnx.checker``
  because it is not in the ONNX schema registry).
* ``add_rms_norm``: ``com.microsoft.SkipSimplifiedLayerNormalization`` (outputs 0 and 3).
* ``layer_norm``: ONNX ``LayerNormalization``; ``add_layer_norm``: ``com.microsoft.SkipLayerNormalization``.
"""

from __future__ import annotations

import math
from typing import Callable

import onnx
import onnx_ir
import torch
from onnx.defs import OpSchema
from onnxscript.onnx_opset import opset18 as op
from onnxscript.values import Op, Opset

from elision.kernels import ops as _ops

__all__ = ["custom_translation_table"]

_MS = Opset("com.microsoft", 1)


def _contrib_skip_norm_schema(name: str, with_beta: bool) -> OpSchema:
    """Schema of ORT's com.microsoft Skip(Simplified)LayerNormalization (from ContribOperators.md).

    onnx ships no schemas for ORT contrib ops, and the exporter's tracer needs one to bind inputs,
    outputs and attributes.
    """
    param = OpSchema.FormalParameter
    optional = OpSchema.FormalParameterOption.Optional
    inputs = [param("input", "T"), param("skip", "T"), param("gamma", "T")]
    if with_beta:
        inputs.append(param("beta", "T", param_option=optional))
    inputs.append(param("bias", "T", param_option=optional))
    outputs = [
        param("output", "T"),
        param("mean", "U", param_option=optional),
        param("inv_std_var", "U", param_option=optional),
        param("input_skip_bias_sum", "T", param_option=optional),
    ]
    return OpSchema(
        name,
        "com.microsoft",
        1,
        inputs=inputs,
        outputs=outputs,
        type_constraints=[
            ("T", ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "input type"),
            ("U", ["tensor(float)"], "stats type"),
        ],
        attributes=[OpSchema.Attribute("epsilon", OpSchema.AttrType.FLOAT, "epsilon")],
    )


_SKIP_SIMPLIFIED_LAYER_NORM = Op(
    _MS, "SkipSimplifiedLayerNormalization", _contrib_skip_norm_schema("SkipSimplifiedLayerNormalization", False)
)
_SKIP_LAYER_NORM = Op(_MS, "SkipLayerNormalization", _contrib_skip_norm_schema("SkipLayerNormalization", True))

_FLOAT = 1  # onnx.TensorProto.FLOAT
_INT64 = 7  # onnx.TensorProto.INT64


def _static_dim(value, axis: int, what: str) -> int:  # type: ignore[no-untyped-def]
    """A dim that must be a concrete int in the exported graph (head counts, head size)."""
    dim = value.shape[axis]
    if not isinstance(dim, int):
        raise ValueError(f"ONNX translation of elision ops needs a static {what}, got symbolic dim {dim!r}")
    return dim


def _const_i64(values: list[int]):  # type: ignore[no-untyped-def]
    return op.Constant(value_ints=values)


def _scale(head_dim: int, scale: float | None) -> float:
    return scale if scale is not None else 1.0 / math.sqrt(head_dim)


def _softmax_zero_rows(logits):  # type: ignore[no-untyped-def]
    """Softmax over the last axis where rows that are entirely -inf give zeros (not NaN).

    ORT's Softmax yields NaN for such rows (exp(-inf - -inf)); one Where maps them to 0, which is
    much cheaper than a hand-written max/exp/sum softmax (checked in tests/test_kernels_onnx.py).
    """
    probs = op.Softmax(logits, axis=-1)
    return op.Where(op.IsNaN(probs), op.CastLike(0.0, probs), probs)


def _to_float(t):  # type: ignore[no-untyped-def]
    """Compute in float32; skip the Cast (a copy in ORT) when the input already is float32."""
    return t if t.dtype == onnx_ir.DataType.FLOAT else op.Cast(t, to=_FLOAT)


def _from_float(t, like):  # type: ignore[no-untyped-def]
    return t if like.dtype == onnx_ir.DataType.FLOAT else op.CastLike(t, like)


def attention(q, k, v, bias=None, scale: float | None = None, is_causal: bool = False):  # type: ignore[no-untyped-def]
    """elision::attention as MatMul/Softmax/MatMul in float32.

    GQA: the query heads of one KV group are folded into the row dim ([B, Hkv, G*Lq, D]), so both
    MatMuls stay 4-D and K/V are never repeated; with G == 1 there are no reshapes at all.
    """
    q_heads = _static_dim(q, 1, "number of query heads")
    kv_heads = _static_dim(k, 1, "number of key/value heads")
    head_dim = _static_dim(q, 3, "head_dim")
    group = q_heads // kv_heads
    # Scale q (small) rather than the logits (large).
    qf = op.Mul(_to_float(q), op.Constant(value_float=_scale(head_dim, scale)))
    kf, vf = _to_float(k), _to_float(v)

    batch = op.Shape(q, start=0, end=1)
    q_len = op.Shape(q, start=2, end=3)
    kv_len = op.Shape(k, start=2, end=3)
    if group > 1:
        qf = op.Reshape(qf, op.Concat(batch, _const_i64([kv_heads, -1, head_dim]), axis=0))
    logits = op.MatMul(qf, op.Transpose(kf, perm=[0, 1, 3, 2]))  # [B, Hkv, G*Lq, Lk]
    if group > 1:
        logits = op.Reshape(logits, op.Concat(batch, _const_i64([q_heads]), q_len, kv_len, axis=0))
    if bias is not None:
        logits = op.Add(logits, _to_float(bias))
    if is_causal:
        # Bottom-right alignment: query i sits at position Lk - Lq + i.
        zero = _const_i64([0])
        one = _const_i64([1])
        q_pos = op.Add(op.Range(op.Squeeze(zero), op.Squeeze(q_len), op.Squeeze(one)), op.Squeeze(op.Sub(kv_len, q_len)))
        k_pos = op.Range(op.Squeeze(zero), op.Squeeze(kv_len), op.Squeeze(one))
        hidden = op.Greater(op.Unsqueeze(k_pos, zero), op.Unsqueeze(q_pos, one))  # [Lq, Lk]
        logits = op.Where(hidden, op.Constant(value_float=float("-inf")), logits)
    # Only a mask can empty a row; unmasked attention takes the plain Softmax.
    probs = _softmax_zero_rows(logits) if (bias is not None or is_causal) else op.Softmax(logits, axis=-1)
    if group > 1:
        probs = op.Reshape(probs, op.Concat(batch, _const_i64([kv_heads, -1]), kv_len, axis=0))
    out = op.MatMul(probs, vf)  # [B, Hkv, G*Lq, D]
    if group > 1:
        out = op.Reshape(out, op.Shape(q))
    return _from_float(out, q)


def _weight_or_ones(x, weight):  # type: ignore[no-untyped-def]
    if weight is not None:
        return weight
    return op.CastLike(op.ConstantOfShape(op.Shape(x, start=-1), value=_ones_float()), x)


def _ones_float():  # type: ignore[no-untyped-def]

    return onnx.helper.make_tensor("one", onnx.TensorProto.FLOAT, [1], [1.0])


def rms_norm(x, weight=None, eps: float = 1e-6):  # type: ignore[no-untyped-def]
    """elision::rms_norm in fp32: x * rsqrt(mean(x^2) + eps) * weight."""
    xf = _to_float(x)
    mean_sq = op.ReduceMean(op.Mul(xf, xf), _const_i64([-1]), keepdims=1)
    y = op.Div(xf, op.Sqrt(op.Add(mean_sq, op.Constant(value_float=eps))))
    if weight is not None:
        y = op.Mul(y, _to_float(weight))
    return _from_float(y, x)


def _as_rows(t):  # type: ignore[no-untyped-def]
    """[..., C] -> [N, C]: ORT's Skip*LayerNormalization kernels take 2-D or 3-D inputs."""
    return op.Reshape(t, op.Concat(_const_i64([-1]), op.Shape(t, start=-1), axis=0))


def add_rms_norm(x, residual, weight=None, eps: float = 1e-6):  # type: ignore[no-untyped-def]
    """elision::add_rms_norm via com.microsoft.SkipSimplifiedLayerNormalization."""
    gamma = _weight_or_ones(x, weight)
    out, _mean, _inv_std, summed = _SKIP_SIMPLIFIED_LAYER_NORM(
        _as_rows(x), _as_rows(residual), op.CastLike(gamma, x), epsilon=eps, _outputs=4
    )
    shape = op.Shape(x)
    return op.Reshape(out, shape), op.Reshape(summed, shape)


def layer_norm(x, weight=None, bias=None, eps: float = 1e-5):  # type: ignore[no-untyped-def]
    """elision::layer_norm as ONNX LayerNormalization over the last axis (fp32 stash)."""
    gamma = op.CastLike(_weight_or_ones(x, weight), x)
    beta = op.CastLike(bias, x) if bias is not None else None
    # The opset signature declares Y, Mean and InvStdDev; only Y is used (the rest get pruned).
    outputs = op.LayerNormalization(x, gamma, beta, axis=-1, epsilon=eps, stash_type=1)
    return outputs[0] if isinstance(outputs, (tuple, list)) else outputs


def add_layer_norm(x, residual, weight=None, bias=None, eps: float = 1e-5):  # type: ignore[no-untyped-def]
    """elision::add_layer_norm via com.microsoft.SkipLayerNormalization."""
    gamma = op.CastLike(_weight_or_ones(x, weight), x)
    inputs = [_as_rows(x), _as_rows(residual), gamma]
    if bias is not None:
        inputs.append(op.CastLike(bias, x))
    out, _mean, _inv_std, summed = _SKIP_LAYER_NORM(*inputs, epsilon=eps, _outputs=4)
    shape = op.Shape(x)
    return op.Reshape(out, shape), op.Reshape(summed, shape)


def _repeat_heads(t, kv_heads: int, heads: int):  # type: ignore[no-untyped-def]
    """[B, Hkv, L, D] -> [B, heads, L, D] with query head h reading KV head h // (heads // Hkv)."""
    if kv_heads == heads:
        return t
    expanded = op.Expand(
        op.Unsqueeze(t, _const_i64([2])),
        op.Concat(op.Shape(t, start=0, end=2), _const_i64([heads // kv_heads]), op.Shape(t, start=2), axis=0),
    )
    return op.Reshape(expanded, op.Concat(op.Shape(t, start=0, end=1), _const_i64([heads]), op.Shape(t, start=2), axis=0))


def sparse_cross_attention(q, k, v, block_index, block_size: int, scale: float | None = None):  # type: ignore[no-untyped-def]
    """elision::sparse_cross_attention: pad queries into blocks, GatherND the listed KV rows, attend."""
    heads = _static_dim(q, 1, "number of query heads")
    head_dim = _static_dim(q, 3, "head_dim")
    kv_heads = _static_dim(k, 1, "number of key/value heads")
    qf = _to_float(q)
    kf = _repeat_heads(_to_float(k), kv_heads, heads)
    vf = _repeat_heads(_to_float(v), kv_heads, heads)
    index = op.Cast(block_index, to=_INT64)
    if len(block_index.shape) == 3:
        index = op.Unsqueeze(index, _const_i64([1]))
    batch = op.Shape(q, start=0, end=1)
    q_len = op.Shape(q, start=2, end=3)
    nblocks = op.Shape(block_index, start=-2, end=-1)
    topk = op.Shape(block_index, start=-1)
    bh = op.Concat(batch, _const_i64([heads]), axis=0)
    index = op.Expand(index, op.Concat(bh, nblocks, topk, axis=0))  # [B, H, nb, topk]
    valid = op.GreaterOrEqual(index, op.Constant(value_int=0))
    safe = op.Max(index, op.Constant(value_int=0))
    flat = op.Reshape(safe, op.Concat(bh, _const_i64([-1, 1]), axis=0))  # [B, H, nb*topk, 1]
    block_kv_shape = op.Concat(bh, nblocks, topk, _const_i64([head_dim]), axis=0)
    k_sel = op.Reshape(op.GatherND(kf, flat, batch_dims=2), block_kv_shape)
    v_sel = op.Reshape(op.GatherND(vf, flat, batch_dims=2), block_kv_shape)

    block = _const_i64([block_size])
    padded_len = op.Mul(nblocks, block)
    pad_amount = op.Sub(padded_len, q_len)
    zeros4 = _const_i64([0, 0, 0, 0])
    pads = op.Concat(zeros4, _const_i64([0, 0]), pad_amount, _const_i64([0]), axis=0)
    q_blocks = op.Reshape(op.Pad(qf, pads), op.Concat(bh, nblocks, block, _const_i64([head_dim]), axis=0))

    logits = op.MatMul(q_blocks, op.Transpose(k_sel, perm=[0, 1, 2, 4, 3]))  # [B, H, nb, bs, topk]
    logits = op.Mul(logits, op.Constant(value_float=_scale(head_dim, scale)))
    logits = op.Where(op.Unsqueeze(valid, _const_i64([3])), logits, op.Constant(value_float=float("-inf")))
    out = op.MatMul(_softmax_zero_rows(logits), v_sel)  # [B, H, nb, bs, D]
    out = op.Reshape(out, op.Concat(bh, padded_len, _const_i64([head_dim]), axis=0))
    out = op.Slice(out, _const_i64([0]), q_len, _const_i64([2]))
    return _from_float(out, q)


def custom_translation_table() -> dict[torch._ops.OpOverload, Callable]:
    """Map every ``torch.ops.elision.<op>.default`` to its ONNX translation."""
    _ops.ensure_registered()
    elision = torch.ops.elision
    return {
        elision.attention.default: attention,
        elision.rms_norm.default: rms_norm,
        elision.add_rms_norm.default: add_rms_norm,
        elision.layer_norm.default: layer_norm,
        elision.add_layer_norm.default: add_layer_norm,
        elision.sparse_cross_attention.default: sparse_cross_attention,
    }
