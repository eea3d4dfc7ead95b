"""elision's custom ops and Triton kernels.

* :mod:`elision.kernels.reference` — plain-torch reference implementations; :mod:`~elision.kernels.cpu` — the
  faster CPU paths.
* :mod:`elision.kernels.triton_attention`, :mod:`~elision.kernels.triton_norm` — Triton kernels (importing them
  imports triton).
* :mod:`elision.kernels.ops` — ``torch.library`` registration of ``torch.ops.elision.*`` (attention, the norms and
  sparse cross-attention: what the fusion passes insert and volume decoding calls).
* :mod:`elision.kernels.token_reduction` — the token scoring, pruning, merging and DCT functions the token passes
  splice into graphs (plain torch, traced to aten ops).
* :mod:`elision.lowering.onnx_ops` — onnxscript translations for the ONNX exporter.

Importing this package is cheap: nothing here imports triton or registers ops until
:func:`ensure_registered` (or ``import elision.kernels.ops``) is called.
"""

from __future__ import annotations

__all__ = ["ensure_registered"]


def ensure_registered() -> None:
    """Register the ``elision::*`` torch ops (idempotent)."""
    from . import ops  # on demand: registering the ops imports triton (seconds), see the module docstring

    ops.ensure_registered()
