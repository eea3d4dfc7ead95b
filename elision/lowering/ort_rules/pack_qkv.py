"""Rewrite rule: the three projections feeding a GroupQueryAttention -> one MatMul with packed weights.

    GroupQueryAttention(MatMul(x, Wq) [+ bq], MatMul(x, Wk) [+ bk], MatMul(x, Wv) [+ bv], rest...)
 -> GroupQueryAttention(MatMul(x, [Wq | Wk | Wv]) [+ [bq | bk | bv]], -, -, rest...)

GQA splits a packed `[batch, n, (heads + 2 kv_heads) * head_dim]` query input itself, so one GEMM replaces three
(the biggest per-layer saving of onnxruntime-genai's graph after the KV handling). Fires only when the weights
(and biases) are constants of one dtype.
"""
from __future__ import annotations

import numpy as np
import onnx_ir as ir
from onnxscript.rewriter import pattern

from elision.lowering.ort_rules.tree_gqa import MS_DOMAIN

__all__ = ["pack_qkv_rules"]


def _const(value: ir.Value | None) -> np.ndarray | None:
    if value is None or value.const_value is None:
        return None
    return value.const_value.numpy()


class PackQKV(pattern.RewriteRuleClassBase):
    def __init__(self, with_bias: bool):
        super().__init__(f"PackQKV{'Bias' if with_bias else ''}")
        self.with_bias = with_bias

    def pattern(self, op, x, wq, wk, wv, bq, bk, bv):
        def project(w, b):
            y = op.MatMul(x, w)
            return op.Add(y, b) if self.with_bias else y

        return op.GroupQueryAttention(project(wq, bq), project(wk, bk), project(wv, bv), _domain=MS_DOMAIN,
                                      _allow_other_inputs=True, _allow_other_attributes=True,
                                      _outputs=["out", "present_k", "present_v"])

    def check(self, context, wq, wk, wv, bq=None, bk=None, bv=None, **_):
        result = pattern.MatchResult()
        weights = [_const(w) for w in (wq, wk, wv)]
        if any(w is None or w.ndim != 2 for w in weights):
            return result.fail("projection weights must be 2-D constants", [wq, wk, wv])
        if len({w.shape[0] for w in weights}) != 1 or len({w.dtype for w in weights}) != 1:
            return result.fail("projection weights differ in input size or dtype", [wq, wk, wv])
        biases = [_const(b) for b in (bq, bk, bv)] if self.with_bias else []
        if self.with_bias:
            if any(b is None or b.shape != (w.shape[1],) for b, w in zip(biases, weights)):
                return result.fail("projection biases must be 1-D constants matching the weights", [bq, bk, bv])
        self._weights, self._biases = weights, biases
        return result

    def rewrite(self, op, x, wq, out, **_):
        node = out.producer()
        packed = op.initializer(ir.tensor(np.concatenate(self._weights, axis=1), name=f"{wq.name}_qkv"))
        qkv = op.MatMul(x, packed)
        if self.with_bias:
            bias = op.initializer(ir.tensor(np.concatenate(self._biases), name=f"{wq.name}_qkv_bias"))
            qkv = op.Add(qkv, bias)
        attrs = {name: attr.value for name, attr in node.attributes.items()}
        return op.GroupQueryAttention(qkv, None, None, *node.inputs[3:], _domain=MS_DOMAIN, _outputs=3, **attrs)


def pack_qkv_rules() -> pattern.RewriteRuleSet:
    # commute: torch exports a linear's bias as Add(MatMul, b), other exporters as Add(b, MatMul)
    return pattern.RewriteRuleSet([PackQKV.rule(True), PackQKV.rule(False)], commute=True)
