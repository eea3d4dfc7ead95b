"""The ops on CUDA, where they dispatch to compiled Triton kernels (skipped without a GPU).

Run on a GPU machine with ``TRITON_INTERPRET=0`` (conftest only sets the interpreter by default):
``TRITON_INTERPRET=0 pytest tests/kernels/test_kernels_cuda.py``.  Tolerances: fp32 2e-4 (IEEE dots, but
different accumulation order over long rows), fp16 5e-3, bf16 3e-2 (atol = rtol).
"""

from __future__ import annotations

import pytest
import torch

from _gpu import needs_compiled_cuda
from elision.kernels import ops, reference

pytestmark = needs_compiled_cuda

TOL = {
    torch.float32: dict(atol=2e-4, rtol=2e-4),
    torch.float16: dict(atol=5e-3, rtol=5e-3),
    torch.bfloat16: dict(atol=3e-2, rtol=3e-2),
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_all_ops_on_cuda_match_reference(dtype):
    gen = torch.Generator().manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen).to("cuda", dtype)

    q, k, v = randn(2, 8, 37, 64), randn(2, 2, 301, 64), randn(2, 2, 301, 64)
    bias = torch.randn(2, 1, 37, 301, generator=gen).masked_fill(torch.rand(2, 1, 37, 301, generator=gen) < 0.3, float("-inf"))
    bias = bias.to("cuda", dtype)
    tol = TOL[dtype]
    cpu = [t.float().cpu() for t in (q, k, v, bias)]
    torch.testing.assert_close(ops.attention(q, k, v, bias, None, True).float().cpu(), reference.attention(*cpu, None, True), **tol)

    x, r, w = randn(3, 50, 777), randn(3, 50, 777), randn(777)
    out, summed = ops.rms_norm(x, w, 1e-6, residual=r)
    ref_out, _ = reference.add_rms_norm(x.cpu(), r.cpu(), w.cpu(), 1e-6)
    torch.testing.assert_close(out.cpu().float(), ref_out.float(), **tol)
    torch.testing.assert_close(summed.cpu(), x.cpu() + r.cpu())
    torch.testing.assert_close(
        ops.layer_norm(x, w, w, 1e-5).cpu().float(), reference.layer_norm(x.cpu(), w.cpu(), w.cpu(), 1e-5).float(), **tol
    )

    block_index = torch.randint(-1, 301, (2, 5, 40), generator=gen).cuda()
    sparse = ops.sparse_cross_attention(q, k, v, block_index, 8)
    torch.testing.assert_close(
        sparse.float().cpu(), reference.sparse_cross_attention(*cpu[:3], block_index.cpu(), 8), **tol
    )


def test_torch_compile_inductor_sees_the_triton_kernels():
    q, k, v = (torch.randn(1, 4, 16, 64, device="cuda", dtype=torch.float16) for _ in range(3))

    def f(q, k, v):  # type: ignore[no-untyped-def]
        return ops.attention(q, k, v, None, None, True) * 2

    compiled = torch.compile(f, fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), f(q, k, v), atol=5e-3, rtol=5e-3)
