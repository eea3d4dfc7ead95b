"""``torch.library`` registration of elision's custom ops (namespace ``elision``).

Each op is a ``torch.library.triton_op``: one Python body that allocates the outputs and either
launches Triton kernels (through ``wrap_triton``, so ``torch.compile`` on CUDA sees and can fuse
the kernels) or calls the plain-torch reference.  Dispatch inside the body:

* CUDA tensors (fp32/fp16/bf16)                     -> Triton kernels.
* CPU tensors (and CUDA dtypes Triton does not take) -> :mod:`elision.kernels.cpu` (SDPA,
  ``F.rms_norm``/``F.layer_norm``) or :mod:`elision.kernels.reference` where no faster stock
  kernel exists (sparse cross-attention).
* CPU tensors with ``ELISION_FORCE_TRITON=1``       -> the same Triton kernels under Triton's
  interpreter (set ``TRITON_INTERPRET=1`` before triton is imported); this is how the tests drive
  the kernels through the op.  bf16 and fp64 CPU tensors always take the CPU path.

Every op also has an explicit fake (meta) implementation, so it traces through ``torch.export``
with dynamic dims (and stays a single ``elision.*`` node in the exported graph: ``triton_op`` is
not decomposed during export), and runs under ``torch.compile``.  Inputs are validated identically
on every path (see :mod:`elision.kernels._checks`).

Ops (all functional, no mutation):

``elision::attention(q [B,Hq,Lq,D], k [B,Hkv,Lk,D], v, bias: Tensor? [B|1,1|Hq,Lq,Lk], scale: float?, is_causal: bool=False) -> Tensor``
    Additive-mask attention over a KV cache with GQA (``Hq % Hkv == 0``); causal is bottom-right
    aligned; fully masked rows give zeros.
``elision::rms_norm(x, weight: Tensor?, eps: float) -> Tensor``
``elision::add_rms_norm(x, residual, weight: Tensor?, eps: float) -> (out, x + residual)``
``elision::layer_norm(x, weight: Tensor?, bias: Tensor?, eps: float) -> Tensor``
``elision::add_layer_norm(x, residual, weight: Tensor?, bias: Tensor?, eps: float) -> (out, x + residual)``
``elision::sparse_cross_attention(q [B,H,Nq,D], k [B,Hkv,M,D], v, block_index [B,(H,)nblocks,topk], block_size: int, scale: float?) -> [B,H,Nq,D]``

Importing this module registers the ops (via the idempotent :func:`ensure_registered`); code
that only uses ``torch.ops.elision.*`` must import it (or call ``elision.kernels.ensure_registered()``)
first.  The Python wrappers at the bottom are thin calls of the registered ops.
"""

from __future__ import annotations

import os
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch._subclasses.functional_tensor import FunctionalTensor
from torch.library import triton_op

from elision.kernels import _checks, cpu, reference

__all__ = [
    "ensure_registered",
    "force_triton",
    "attention",
    "rms_norm",
    "layer_norm",
    "sparse_cross_attention",
    "OP_NAMES",
]

# one op per reference implementation: the reference module is the list of elision's ops
OP_NAMES = tuple(reference.__all__)

_TRITON_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


def force_triton() -> bool:
    """True when ``ELISION_FORCE_TRITON=1``: run the Triton kernels on CPU tensors (interpreter)."""
    return os.environ.get("ELISION_FORCE_TRITON", "0") not in ("", "0")


def _is_real(t: torch.Tensor) -> bool:
    """A concrete eager tensor (not a FakeTensor/FunctionalTensor seen while tracing)."""
    return not isinstance(t, (FakeTensor, FunctionalTensor))


def _use_triton(t: torch.Tensor) -> bool:
    if t.device.type == "cuda":
        return t.dtype in _TRITON_DTYPES
    if t.device.type == "cpu" and force_triton() and _is_real(t):
        # The interpreter has no bf16 (documented Triton limitation); fp64 is not a kernel dtype.
        return t.dtype in (torch.float16, torch.float32)
    return False


def _validate_indices_on_cpu(name: str, idx: torch.Tensor, upper: int, allow_padding: bool) -> None:
    """Index range check; on CPU only (on CUDA it would force a device sync on every call)."""
    if idx.device.type == "cpu" and _is_real(idx):
        _checks.check_index_range(name, idx, upper, allow_padding)


# ----------------------------------------------------------------------------- op bodies
# Type hints below define the op schemas (torch.library.infer_schema); keep them exact.


def _attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    _checks.check_attention(q, k, v, bias)
    if _use_triton(q):
        from . import triton_attention  # optional triton (Linux x86_64): on first launch

        return triton_attention.attention(q, k, v, bias, scale, is_causal)
    return cpu.attention(q, k, v, bias, scale, is_causal)


def _attention_fake(q, k, v, bias=None, scale=None, is_causal=False):  # type: ignore[no-untyped-def]
    _checks.check_attention(q, k, v, bias)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    _checks.check_norm("rms_norm", x, weight)
    if _use_triton(x):
        from . import triton_norm  # optional triton (Linux x86_64): on first launch

        return triton_norm.rms_norm(x, weight, eps)[0]
    return cpu.rms_norm(x, weight, eps)


def _rms_norm_fake(x, weight, eps):  # type: ignore[no-untyped-def]
    _checks.check_norm("rms_norm", x, weight)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_norm("add_rms_norm", x, weight, residual=residual)
    if _use_triton(x):
        from . import triton_norm  # optional triton (Linux x86_64): on first launch

        out, summed = triton_norm.rms_norm(x, weight, eps, residual)
        return out, summed
    return cpu.add_rms_norm(x, residual, weight, eps)


def _add_rms_norm_fake(x, residual, weight, eps):  # type: ignore[no-untyped-def]
    _checks.check_norm("add_rms_norm", x, weight, residual=residual)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


def _layer_norm(
    x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None, eps: float
) -> torch.Tensor:
    _checks.check_norm("layer_norm", x, weight, bias)
    if _use_triton(x):
        from . import triton_norm  # optional triton (Linux x86_64): on first launch

        return triton_norm.layer_norm(x, weight, bias, eps)[0]
    return cpu.layer_norm(x, weight, bias, eps)


def _layer_norm_fake(x, weight, bias, eps):  # type: ignore[no-untyped-def]
    _checks.check_norm("layer_norm", x, weight, bias)
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _checks.check_norm("add_layer_norm", x, weight, bias, residual)
    if _use_triton(x):
        from . import triton_norm  # optional triton (Linux x86_64): on first launch

        out, summed = triton_norm.layer_norm(x, weight, bias, eps, residual)
        return out, summed
    return cpu.add_layer_norm(x, residual, weight, bias, eps)


def _add_layer_norm_fake(x, residual, weight, bias, eps):  # type: ignore[no-untyped-def]
    _checks.check_norm("add_layer_norm", x, weight, bias, residual)
    return (
        torch.empty_like(x, memory_format=torch.contiguous_format),
        torch.empty_like(x, memory_format=torch.contiguous_format),
    )


def _sparse_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    _checks.check_sparse_cross_attention(q, k, v, block_index, block_size)
    _validate_indices_on_cpu("sparse_cross_attention: block_index", block_index, k.shape[2], allow_padding=True)
    if _use_triton(q):
        from . import triton_attention  # optional triton (Linux x86_64): on first launch

        return triton_attention.sparse_cross_attention(q, k, v, block_index, block_size, scale)
    return reference.sparse_cross_attention(q, k, v, block_index, block_size, scale)


def _sparse_cross_attention_fake(q, k, v, block_index, block_size, scale=None):  # type: ignore[no-untyped-def]
    _checks.check_sparse_cross_attention(q, k, v, block_index, block_size)
    return torch.empty_like(q, memory_format=torch.contiguous_format)


_DEFINITIONS: dict[str, tuple[Callable, Callable]] = {
    "attention": (_attention, _attention_fake),
    "rms_norm": (_rms_norm, _rms_norm_fake),
    "add_rms_norm": (_add_rms_norm, _add_rms_norm_fake),
    "layer_norm": (_layer_norm, _layer_norm_fake),
    "add_layer_norm": (_add_layer_norm, _add_layer_norm_fake),
    "sparse_cross_attention": (_sparse_cross_attention, _sparse_cross_attention_fake),
}


def _is_defined(name: str) -> bool:
    try:
        getattr(torch.ops.elision, name)
    except (AttributeError, RuntimeError):
        return False
    return True


def ensure_registered() -> None:
    """Register every ``elision::*`` op that is not registered yet (safe to call any number of times).

    Registration lives in the process-wide dispatcher, so a second import of this module (e.g.
    ``importlib.reload``) finds the ops present and leaves them alone instead of failing.
    """
    for name, (body, fake) in _DEFINITIONS.items():
        if _is_defined(name):
            continue
        op = triton_op(f"elision::{name}", body, mutates_args=())
        # triton_op uses the body as its fake impl; an explicit one avoids running shape-dependent
        # launch logic on fake tensors and keeps symbolic shapes symbolic.
        op.register_fake(fake)


ensure_registered()


# ----------------------------------------------------------------------------- Python wrappers


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    bias: torch.Tensor | None = None,
    scale: float | None = None,
    is_causal: bool = False,
) -> torch.Tensor:
    """``torch.ops.elision.attention``: additive-mask (tree) attention over a KV cache with GQA."""
    return torch.ops.elision.attention(q, k, v, bias, scale, is_causal)


def rms_norm(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, residual: torch.Tensor | None = None
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """RMSNorm; with ``residual`` returns ``(rms_norm(x + residual), x + residual)``."""
    if residual is None:
        return torch.ops.elision.rms_norm(x, weight, eps)
    return torch.ops.elision.add_rms_norm(x, residual, weight, eps)


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float = 1e-5,
    residual: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """LayerNorm; with ``residual`` returns ``(layer_norm(x + residual), x + residual)``."""
    if residual is None:
        return torch.ops.elision.layer_norm(x, weight, bias, eps)
    return torch.ops.elision.add_layer_norm(x, residual, weight, bias, eps)


def sparse_cross_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    block_index: torch.Tensor,
    block_size: int,
    scale: float | None = None,
) -> torch.Tensor:
    """``torch.ops.elision.sparse_cross_attention``: per-query-block attention over listed KV rows."""
    return torch.ops.elision.sparse_cross_attention(q, k, v, block_index, block_size, scale)
