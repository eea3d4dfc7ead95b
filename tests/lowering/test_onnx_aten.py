"""elision's ONNX translation of aten._scaled_dot_product_flash_attention_for_cpu (GQA, SDPA's causal
convention, masks): exported with dynamic dims, loaded by ORT CPU, checked against eager on fresh inputs.

The stock torch.onnx translation emits a MatMul of mismatched head counts for grouped-query attention, which
ORT rejects at load time; that is what sent Llama graphs of the backend's onnxruntime target back to eager.
float32: atol = rtol = 1e-5.
"""
from __future__ import annotations

import warnings

import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

from elision.lowering.onnx_export import OPSET_VERSION, _custom_translation_table


class FlashForCpu(torch.nn.Module):
    def __init__(self, is_causal: bool, with_mask: bool, scale: float | None) -> None:
        super().__init__()
        self.is_causal, self.with_mask, self.scale = is_causal, with_mask, scale

    def forward(self, q, k, v, mask):  # type: ignore[no-untyped-def]
        out, logsumexp = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(
            q, k, v, 0.0, self.is_causal, attn_mask=mask if self.with_mask else None, scale=self.scale)
        return out, logsumexp


def _inputs(q_heads: int, kv_heads: int, q_len: int, kv_len: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(2, q_heads, q_len, 16, generator=g)
    k = torch.randn(2, kv_heads, kv_len, 16, generator=g)
    v = torch.randn(2, kv_heads, kv_len, 16, generator=g)
    mask = torch.randn(2, 1, q_len, kv_len, generator=g)
    return q, k, v, mask


def _export(module, inputs, table):
    q_len, kv_len = Dim("q_len"), Dim("kv_len")
    shapes = ({2: q_len}, {2: kv_len}, {2: kv_len}, {2: q_len, 3: kv_len})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, inputs, dynamo=True, opset_version=OPSET_VERSION, dynamic_shapes=shapes,
                                    custom_translation_table=table or None, optimize=True, verbose=False)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(program.model_proto.SerializeToString(), options, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("q_heads, kv_heads, is_causal, with_mask, scale", [
    (4, 2, True, False, None),   # Llama GQA prefill: the failing case
    (4, 1, False, True, 0.3),    # multi-query with an additive mask
    (4, 4, True, False, None),   # plain multi-head, causal
    (6, 2, False, False, None),  # GQA, no mask
], ids=["gqa-causal", "mqa-mask", "mha-causal", "gqa-nomask"])
def test_flash_for_cpu_matches_eager_in_ort_at_new_shapes(q_heads, kv_heads, is_causal, with_mask, scale):
    module = FlashForCpu(is_causal, with_mask, scale).eval()
    session = _export(module, _inputs(q_heads, kv_heads, 5, 5, seed=0), _custom_translation_table())
    names = [i.name for i in session.get_inputs()]
    # fresh inputs at new lengths; causal with q_len < kv_len checks SDPA's top-left convention
    for q_len, kv_len in ((7, 7), (3, 9)):
        inputs = _inputs(q_heads, kv_heads, q_len, kv_len, seed=q_len)
        want_out, want_lse = module(*inputs)
        got = session.run(None, {n: t.numpy() for n, t in zip(names, inputs)})  # an unused mask is not an input
        torch.testing.assert_close(torch.from_numpy(got[0]), want_out, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.from_numpy(got[1]), want_lse, atol=1e-5, rtol=1e-5)


def test_stock_translation_is_what_fails_for_gqa():
    """Without elision's table ORT refuses the GQA graph; if torch.onnx fixes this, the override can go."""
    module = FlashForCpu(True, False, None).eval()
    with pytest.raises(Exception, match="Incompatible dimensions"):
        _export(module, _inputs(4, 2, 5, 5, seed=0), {})
