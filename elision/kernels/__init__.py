"""elision's custom ops and Triton kernels.

* :mod:`elision.kernels.reference` — plain-torch reference implementations (the CPU kernels).
* :mod:`elision.kernels.triton_attention`, :mod:`~elision.kernels.triton_norm`,
  :mod:`~elision.kernels.triton_tokens` — Triton kernels (importing them imports triton).
* :mod:`elision.kernels.ops` — ``torch.library`` registration of ``torch.ops.elision.*``.
* :mod:`elision.lowering.onnx_ops` — onnxscript translations for the ONNX exporter.

Importing this package is cheap: nothing here imports triton or registers ops until
:func:`ensure_registered` (or ``import elision.kernels.ops``) is called.
"""

from __future__ import annotations

__all__ = ["ensure_registered"]


def ensure_registered() -> None:
    """Register the ``elision::*`` torch ops (idempotent)."""
    from . import ops

    ops.ensure_registered()
