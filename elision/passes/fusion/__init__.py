"""Fusion passes: recognized attention / norms / q-k-v projections become single elision ops.

* ``fuse-attention`` — every attention the model map recognizes (SDPA or hand-written softmax(QK^T)V; causal,
  boolean, padding or additive masks; GQA) becomes one ``elision.attention(q, k, v, bias, scale, is_causal)``.
  Boolean keep-masks become an additive float bias (0 / -inf) computed in the graph, shared by all layers that
  use the same mask. GQA head repetition (``repeat_kv`` / ``repeat_interleave``) is dropped: the op reads the
  kv heads directly.
* ``fuse-norms`` — LayerNorm (``aten.layer_norm``) and RMSNorm (the pow/mean/add-eps/rsqrt/mul/mul-weight chain,
  HF casts included) become ``elision.layer_norm`` / ``elision.rms_norm``; when the norm reads a residual add
  ``a + b`` of same-shaped tensors it becomes ``elision.add_layer_norm`` / ``elision.add_rms_norm`` returning
  (normed, a + b), and the add's other users read the second result.
* ``fuse-qkv`` — the q, k and v linears of one attention that read the same input become one linear with the
  concatenated weight (a new parameter ``<attention loc>.qkv_fused.weight``) followed by a split.

Bias + activation fusion is not provided: elision has no bias+activation op, and ``aten.linear`` already
carries its bias, so such a pass would only rename ops (there is nothing to fuse into).

One pass a file (`fuse_attention`, `fuse_norms`, `fuse_qkv`); `rewrite` holds what they share. A pass checks
every condition of a rewrite before it edits anything, so an attention or norm it cannot fuse stays exactly as
it was. Every pass records what it left alone and why in ``module.attrs["fusion_skipped"]`` (list of strings) so a
negative result is explainable. Semantics: all rewrites are exact up to floating-point reassociation (the
elision kernels compute norms and softmax in fp32), see tests/passes/test_fusion.py for the bounds.
"""
from elision.passes.fusion.fuse_attention import FuseAttention
from elision.passes.fusion.fuse_norms import FuseNorms
from elision.passes.fusion.fuse_qkv import FuseQKV

# what `elision compile` and `elision.compile` run when no pipeline is given
DEFAULT_PIPELINE = "canonicalize,cse,constant-fold,fuse-attention,fuse-norms,fuse-qkv,dce"

__all__ = ["DEFAULT_PIPELINE", "FuseAttention", "FuseNorms", "FuseQKV"]
