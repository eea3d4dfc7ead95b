"""ONNX translations of the elision ops: export (dynamo, opset 18), onnx.checker, ORT CPU vs eager.

Tolerances: float32 atol = rtol = 1e-5; float16 atol = rtol = 5e-3 (one fp16 rounding of O(1)
values).
"""

from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch.export import Dim

from elision.kernels import ops
from elision.lowering.onnx_ops import custom_translation_table


class AllOps(torch.nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.randn(channels))
        self.norm_bias = torch.nn.Parameter(torch.randn(channels))

    def forward(self, q, k, v, bias, x, residual, block_index):  # type: ignore[no-untyped-def]
        return (
            ops.attention(q, k, v, bias, None, True),
            ops.attention(q, k, v, None, 0.3, False),
            ops.rms_norm(x, self.norm_weight, 1e-6),
            *ops.rms_norm(x, None, 1e-6, residual=residual),
            ops.layer_norm(x, self.norm_weight, self.norm_bias, 1e-5),
            *ops.layer_norm(x, self.norm_weight, None, 1e-5, residual=residual),
            ops.sparse_cross_attention(q, k, v, block_index, 4, None),
            ops.sparse_cross_attention(q, k, v, block_index.unsqueeze(1).expand(-1, 4, -1, -1), 4, 0.5),
        )


def _inputs(batch: int, q_blocks: int, kv_len: int, seed: int, dtype=torch.float32):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    q_len = 4 * q_blocks
    q = torch.randn(batch, 4, q_len, 8, generator=gen)
    k = torch.randn(batch, 2, kv_len, 8, generator=gen)
    v = torch.randn(batch, 2, kv_len, 8, generator=gen)
    bias = torch.randn(batch, 1, q_len, kv_len, generator=gen).masked_fill(
        torch.rand(batch, 1, q_len, kv_len, generator=gen) < 0.2, float("-inf")
    )
    bias[:, :, 1] = float("-inf")  # a fully masked query row must come out as zeros, not NaN
    x = torch.randn(batch, kv_len, 8, generator=gen)
    residual = torch.randn(batch, kv_len, 8, generator=gen)
    block_index = torch.randint(-1, kv_len, (batch, q_blocks, 5), generator=gen)
    block_index[:, 0] = -1  # a query block with no keys at all -> zeros
    floats = [t.to(dtype) for t in (q, k, v, bias, x, residual)]
    return (*floats, block_index)


def _export(module: torch.nn.Module, args, dynamic_shapes=None) -> onnx.ModelProto:  # type: ignore[no-untyped-def]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            module,
            args,
            dynamo=True,
            opset_version=18,
            custom_translation_table=custom_translation_table(),
            dynamic_shapes=dynamic_shapes,
            verbose=False,
        )
    model = program.model_proto
    onnx.checker.check_model(model)
    return model


def _run_ort(model: onnx.ModelProto, args) -> list[np.ndarray]:  # type: ignore[no-untyped-def]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    names = [i.name for i in session.get_inputs()]
    assert len(names) == len(args)
    return session.run(None, {name: arg.numpy() for name, arg in zip(names, args)})


def _compare(got: list[np.ndarray], expected, atol: float, rtol: float) -> None:  # type: ignore[no-untyped-def]
    assert len(got) == len(expected)
    for i, (g, e) in enumerate(zip(got, expected)):
        e = e.detach()
        assert tuple(g.shape) == tuple(e.shape), f"output {i}: shape {g.shape} vs {tuple(e.shape)}"
        if e.dtype.is_floating_point:
            torch.testing.assert_close(torch.from_numpy(g).float(), e.float(), atol=atol, rtol=rtol, msg=lambda m: f"output {i}: {m}")
        else:
            assert np.array_equal(g, e.numpy()), f"output {i}: indices differ"


@pytest.fixture(scope="module")
def exported_all_ops():  # type: ignore[no-untyped-def]
    torch.manual_seed(0)
    module = AllOps(8).eval()
    batch, kv_len, q_blocks = Dim("batch", min=1, max=16), Dim("kv_len", min=5, max=512), Dim("q_blocks", min=1, max=32)
    dynamic_shapes = {
        "q": {0: batch, 2: 4 * q_blocks},
        "k": {0: batch, 2: kv_len},
        "v": {0: batch, 2: kv_len},
        "bias": {0: batch, 2: 4 * q_blocks, 3: kv_len},
        "x": {0: batch, 1: kv_len},
        "residual": {0: batch, 1: kv_len},
        "block_index": {0: batch, 1: q_blocks},
    }
    model = _export(module, _inputs(2, 2, 11, seed=0), dynamic_shapes)
    return module, model


def test_exported_graph_uses_the_intended_onnx_ops(exported_all_ops):
    _, model = exported_all_ops
    op_types = {(node.domain or "ai.onnx", node.op_type) for node in model.graph.node}
    for expected in [
        ("com.microsoft", "SkipSimplifiedLayerNormalization"),
        ("com.microsoft", "SkipLayerNormalization"),
        ("ai.onnx", "LayerNormalization"),
        ("ai.onnx", "GatherND"),
        ("ai.onnx", "Softmax"),
    ]:
        assert expected in op_types, f"{expected} missing from {sorted(op_types)}"
    assert not any(node.domain.startswith("elision") for node in model.graph.node)


@pytest.mark.parametrize("shape", [(2, 2, 11), (3, 5, 37), (1, 1, 6)])
def test_onnxruntime_matches_eager_at_several_shapes(exported_all_ops, shape):
    module, model = exported_all_ops
    args = _inputs(*shape, seed=sum(shape))
    with torch.no_grad():
        expected = module(*args)
    _compare(_run_ort(model, args), expected, atol=1e-5, rtol=1e-5)


def test_fp16_attention_and_norms_in_onnxruntime():
    class Half(torch.nn.Module):
        def forward(self, q, k, v, x, residual):  # type: ignore[no-untyped-def]
            return (
                ops.attention(q, k, v, None, None, True),
                *ops.rms_norm(x, None, 1e-6, residual=residual),
                *ops.layer_norm(x, None, None, 1e-5, residual=residual),
                ops.rms_norm(x, None, 1e-6),
            )

    gen = torch.Generator().manual_seed(3)
    args = tuple(
        torch.randn(*s, generator=gen).half()
        for s in ((1, 4, 3, 16), (1, 2, 10, 16), (1, 2, 10, 16), (2, 5, 24), (2, 5, 24))
    )
    got = _run_ort(_export(Half(), args), args)
    assert all(g.dtype == np.float16 for g in got)
    _compare(got, Half()(*args), atol=5e-3, rtol=5e-3)
