"""The ``torch.ops.elision.*`` ops: dispatch, torch.export with dynamic dims, torch.compile, errors.

Tolerance for float32 comparisons: atol = rtol = 1e-5 (same fp32 math, different summation order).
"""

from __future__ import annotations

import importlib
import os

import pytest
import torch
from torch.export import Dim

from elision.kernels import ops, reference

TOL = dict(atol=1e-5, rtol=1e-5)
# Forcing Triton onto CPU tensors needs the interpreter (tests/conftest.py sets it by default).
needs_interpreter = pytest.mark.skipif(
    os.environ.get("TRITON_INTERPRET") != "1", reason="forces Triton on CPU tensors: needs TRITON_INTERPRET=1"
)


class AllOps(torch.nn.Module):
    """One small module that uses every op the way a rewritten graph would."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm_weight = torch.nn.Parameter(torch.randn(channels))
        self.norm_bias = torch.nn.Parameter(torch.randn(channels))

    def forward(self, q, k, v, bias, x, residual, block_index):  # type: ignore[no-untyped-def]
        attn = ops.attention(q, k, v, bias, None, True)
        rms = ops.rms_norm(x, self.norm_weight, 1e-6)
        rms_fused, summed = ops.rms_norm(x, self.norm_weight, 1e-6, residual=residual)
        ln = ops.layer_norm(x, self.norm_weight, self.norm_bias, 1e-5)
        ln_fused, _ = ops.layer_norm(x, None, None, 1e-5, residual=residual)
        sparse = ops.sparse_cross_attention(q, k, v, block_index, 4, None)
        return attn, rms, rms_fused, summed, ln, ln_fused, sparse


def _inputs(batch: int, q_len: int, kv_len: int, seed: int = 0):  # type: ignore[no-untyped-def]
    gen = torch.Generator().manual_seed(seed)
    heads, kv_heads, head_dim, channels = 4, 2, 8, 8
    q = torch.randn(batch, heads, q_len, head_dim, generator=gen)
    k = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    v = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen)
    bias = torch.randn(batch, 1, q_len, kv_len, generator=gen)
    x = torch.randn(batch, kv_len, channels, generator=gen)
    residual = torch.randn(batch, kv_len, channels, generator=gen)
    block_index = torch.randint(-1, kv_len, (batch, -(-q_len // 4), 5), generator=gen)
    return q, k, v, bias, x, residual, block_index


def _reference_outputs(module: AllOps, args):  # type: ignore[no-untyped-def]
    q, k, v, bias, x, residual, block_index = args
    w, b = module.norm_weight.detach(), module.norm_bias.detach()
    return (
        reference.attention(q, k, v, bias, None, True),
        reference.rms_norm(x, w, 1e-6),
        *reference.add_rms_norm(x, residual, w, 1e-6),
        reference.layer_norm(x, w, b, 1e-5),
        reference.add_layer_norm(x, residual, None, None, 1e-5)[0],
        reference.sparse_cross_attention(q, k, v, block_index, 4, None),
    )


def _assert_all_close(actual, expected) -> None:  # type: ignore[no-untyped-def]
    assert len(actual) == len(expected)
    for a, e in zip(actual, expected):
        if e.dtype.is_floating_point:
            torch.testing.assert_close(a, e, **TOL)
        else:
            assert torch.equal(a, e)


@pytest.fixture(autouse=True)
def _no_forced_triton(monkeypatch):  # type: ignore[no-untyped-def]
    monkeypatch.delenv("ELISION_FORCE_TRITON", raising=False)


def test_ops_are_registered_in_the_elision_namespace():
    for name in ops.OP_NAMES:
        assert isinstance(getattr(torch.ops.elision, name).default, torch._ops.OpOverload)
    schema = str(torch.ops.elision.attention.default._schema)
    assert schema == (
        "elision::attention(Tensor q, Tensor k, Tensor v, Tensor? bias=None, float? scale=None, "
        "bool is_causal=False) -> Tensor"
    )


def test_ensure_registered_is_idempotent_and_survives_reimport():
    ops.ensure_registered()
    ops.ensure_registered()
    reloaded = importlib.reload(ops)  # re-runs module-level registration
    reloaded.ensure_registered()
    import elision.kernels

    elision.kernels.ensure_registered()
    q = torch.randn(1, 2, 3, 8)
    torch.testing.assert_close(reloaded.attention(q, q, q), reference.attention(q, q, q), **TOL)


@needs_interpreter
def test_cpu_dispatch_and_forced_triton_both_match_the_reference(monkeypatch):
    torch.manual_seed(0)
    module = AllOps(8)
    args = _inputs(2, 6, 11)
    with torch.no_grad():
        expected = _reference_outputs(module, args)
        _assert_all_close(module(*args), expected)
        monkeypatch.setenv("ELISION_FORCE_TRITON", "1")
        _assert_all_close(module(*args), expected)  # same ops, Triton kernels under the interpreter


@needs_interpreter
def test_forced_triton_really_launches_triton_kernels(monkeypatch):
    """With ELISION_FORCE_TRITON=1 the op goes through the Triton launcher (not the reference)."""
    calls = []
    from elision.kernels import triton_attention

    real = triton_attention.attention
    monkeypatch.setattr(triton_attention, "attention", lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 2, 3, 8)
    ops.attention(q, q, q)
    assert calls == []
    monkeypatch.setenv("ELISION_FORCE_TRITON", "1")
    ops.attention(q, q, q)
    assert calls == [1]


def test_fake_tensor_shapes():
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        q, k, v, bias, x, residual, block_index = _inputs(2, 6, 11)
        assert ops.attention(q, k, v, bias).shape == (2, 4, 6, 8)
        assert ops.rms_norm(x, None, 1e-6, residual=residual)[0].shape == (2, 11, 8)
        assert ops.sparse_cross_attention(q, k, v, block_index, 4).shape == (2, 4, 6, 8)


def test_export_with_dynamic_dims_keeps_elision_nodes_and_runs_at_new_shapes():
    torch.manual_seed(0)
    module = AllOps(8)
    batch, q_len, kv_len = Dim("batch", min=1, max=16), Dim("q_len", min=2, max=64), Dim("kv_len", min=5, max=256)
    # q_len is a multiple of the sparse block size so the index lists cover it (nblocks = q_len / 4).
    q_blocks = Dim("q_blocks", min=1, max=16)
    dynamic_shapes = {
        "q": {0: batch, 2: 4 * q_blocks},
        "k": {0: batch, 2: kv_len},
        "v": {0: batch, 2: kv_len},
        "bias": {0: batch, 2: 4 * q_blocks, 3: kv_len},
        "x": {0: batch, 1: kv_len},
        "residual": {0: batch, 1: kv_len},
        "block_index": {0: batch, 1: q_blocks},
    }
    del q_len
    ep = torch.export.export(module, _inputs(2, 8, 11), dynamic_shapes=dynamic_shapes)
    targets = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    for name in ("attention", "add_rms_norm", "rms_norm", "layer_norm", "add_layer_norm", "sparse_cross_attention"):
        assert f"elision.{name}.default" in targets
    # Lowering to core ATen must leave the elision ops alone (they are what later passes match).
    core_targets = {str(n.target) for n in ep.run_decompositions().graph.nodes if n.op == "call_function"}
    assert {f"elision.{name}.default" for name in ops.OP_NAMES} <= core_targets
    placeholder = next(n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "q")
    assert not isinstance(placeholder.meta["val"].shape[0], int), "batch must stay symbolic"

    new_args = _inputs(3, 12, 17, seed=1)
    with torch.no_grad():
        _assert_all_close(ep.module()(*new_args), _reference_outputs(module, new_args))


def test_torch_compile_eager_backend_matches_eager():
    torch.manual_seed(0)
    module = AllOps(8)
    compiled = torch.compile(module, backend="eager", dynamic=True, fullgraph=True)
    with torch.no_grad():
        for shape in ((2, 6, 11), (3, 9, 14)):
            args = _inputs(*shape)
            _assert_all_close(compiled(*args), _reference_outputs(module, args))


def test_torch_compile_aot_eager_runs_the_ops():
    """aot_eager goes through AOTAutograd/functionalization, where triton_op bodies are inlined."""
    q, k, v = torch.randn(1, 4, 5, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)

    def f(q, k, v):  # type: ignore[no-untyped-def]
        return ops.attention(q, k, v, None, None, True) * 2

    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), 2 * reference.attention(q, k, v, None, None, True), **TOL)


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda: ops.attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8)),
         r"number of query heads \(3\) must be a multiple of the number of key/value heads \(2\)"),
        (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 16), torch.randn(1, 2, 4, 16)),
         r"head_dim of k \(16\) must equal head_dim of q \(8\)"),
        (lambda: ops.attention(torch.randn(2, 4, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8)),
         r"q must be 4-D \[batch, heads, seq, head_dim\]"),
        (lambda: ops.attention(torch.randn(1, 2, 4, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.zeros(1, 1, 4, 5)),
         r"bias dim 3 must equal Lk=6, got 5"),
        (lambda: ops.rms_norm(torch.randn(2, 8), torch.randn(7)),
         r"rms_norm: weight must have shape \[8\]"),
        (lambda: ops.layer_norm(torch.randn(2, 8), None, None, 1e-5, residual=torch.randn(2, 9)),
         r"residual must have the shape of x"),
        (lambda: ops.sparse_cross_attention(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.zeros(1, 2, 3), 4),
         r"block_index must be an int32 or int64 index tensor"),
        (lambda: ops.sparse_cross_attention(torch.randn(1, 2, 10, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.zeros(1, 2, 3, dtype=torch.long), 4),
         r"2 blocks of 4 queries cover fewer than Nq=10 queries"),
        (lambda: ops.sparse_cross_attention(torch.randn(1, 2, 8, 8), torch.randn(1, 2, 6, 8), torch.randn(1, 2, 6, 8), torch.full((1, 2, 3), 6), 4),
         r"indices must lie in \[-1, 6\)"),
    ],
)
def test_bad_inputs_give_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()


@needs_interpreter
def test_bad_inputs_fail_the_same_way_under_forced_triton(monkeypatch):
    monkeypatch.setenv("ELISION_FORCE_TRITON", "1")
    with pytest.raises(ValueError, match=r"must be a multiple of the number of key/value heads"):
        ops.attention(torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8), torch.randn(1, 2, 4, 8))


@needs_interpreter
def test_fp16_and_bf16_inputs_on_cpu(monkeypatch):
    """CPU fp16 runs the Triton kernel when forced; bf16 (not supported by the interpreter) uses the reference."""
    q = torch.randn(1, 2, 5, 16)
    expected = reference.attention(q, q, q)
    monkeypatch.setenv("ELISION_FORCE_TRITON", "1")
    torch.testing.assert_close(ops.attention(q.half(), q.half(), q.half()).float(), expected, atol=5e-3, rtol=5e-3)
    torch.testing.assert_close(ops.attention(q.bfloat16(), q.bfloat16(), q.bfloat16()).float(), expected, atol=3e-2, rtol=3e-2)
