"""torch.library custom ops (namespace `elision`) that the pruning rewrites insert into graphs.

Each op wraps a function of `algorithms.py` and has a fake (meta) implementation with a static output
shape, so torch.export / FX / the IR's type inference keep working on rewritten graphs. Names are distinct
from the kernel engineer's ops (attention, rms_norm, layer_norm, gather_tokens, sparse_cross_attention,
score_topk_gather). Importing this module registers the ops once.

  elision::attn_row_scores(q, k, query_index, valid, scale, causal) -> (B, N)
  elision::key_norm_scores(k) -> (B, N)
  elision::prune_tokens(hidden, scores, protected, valid, keep, num_protected) -> (hidden', idx, kept_valid)
  elision::tome_merge(x, size, metric, protected, r) -> (x', size')
  elision::dct_compress(x, grid_h, grid_w, keep) -> x'
"""
from __future__ import annotations

import torch

from elision.kernels import token_reduction as alg


@torch.library.custom_op("elision::attn_row_scores", mutates_args=())
def attn_row_scores(q: torch.Tensor, k: torch.Tensor, query_index: torch.Tensor, valid: torch.Tensor,
                    scale: float, causal: bool) -> torch.Tensor:
    return alg.attention_row_scores(q, k, query_index, valid=valid, scale=scale, causal=causal).contiguous()


@attn_row_scores.register_fake
def _(q, k, query_index, valid, scale, causal):
    return q.new_empty((q.shape[0], q.shape[2]))


@torch.library.custom_op("elision::key_norm_scores", mutates_args=())
def key_norm_scores(k: torch.Tensor) -> torch.Tensor:
    return alg.key_norm_scores(k).contiguous()


@key_norm_scores.register_fake
def _(k):
    return k.new_empty((k.shape[0], k.shape[2]))


def pruned_length(n: int, keep: float, num_protected: int) -> int:
    """Static sequence length after `prune_tokens` with `num_protected` never-dropped tokens per row."""
    return num_protected + alg.keep_count(max(n - num_protected, 1), keep) if n > num_protected else n


@torch.library.custom_op("elision::prune_tokens", mutates_args=())
def prune_tokens(hidden: torch.Tensor, scores: torch.Tensor, protected: torch.Tensor, valid: torch.Tensor,
                 keep: float, num_protected: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    counts = protected.sum(1)
    if not torch.all(counts == num_protected):
        raise alg.PruningError(
            f"elision::prune_tokens expected {num_protected} protected tokens per row, got {counts.tolist()}")
    h, idx, kept = alg.prune_tokens(hidden, scores, keep, protected=protected, valid=valid)
    return h.contiguous(), idx.contiguous(), kept.contiguous()


@prune_tokens.register_fake
def _(hidden, scores, protected, valid, keep, num_protected):
    b, n = scores.shape
    k = pruned_length(n, keep, num_protected)
    return (hidden.new_empty((b, k, *hidden.shape[2:])), scores.new_empty((b, k), dtype=torch.long),
            scores.new_empty((b, k), dtype=torch.bool))


@torch.library.custom_op("elision::tome_merge", mutates_args=())
def tome_merge(x: torch.Tensor, size: torch.Tensor, metric: torch.Tensor, protected: torch.Tensor,
               r: int) -> tuple[torch.Tensor, torch.Tensor]:
    out, s, _source = alg.tome_merge(x, size, metric, r, protected=protected)
    return out.contiguous(), s.contiguous()


@tome_merge.register_fake
def _(x, size, metric, protected, r):
    b, n, c = x.shape
    return x.new_empty((b, n - r, c)), size.new_empty((b, n - r))


@torch.library.custom_op("elision::dct_compress", mutates_args=())
def dct_compress(x: torch.Tensor, grid_h: int, grid_w: int, keep: float) -> torch.Tensor:
    return alg.dct_compress(x, (grid_h, grid_w), keep).contiguous().clone()


@dct_compress.register_fake
def _(x, grid_h, grid_w, keep):
    h, w = alg.dct_grid_size(grid_h, grid_w, keep)
    return x.new_empty((x.shape[0], h * w, x.shape[2]))


def fused_score_topk_gather_available() -> bool:
    """Whether the kernels engineer's fused `elision::score_topk_gather` op is registered."""
    try:
        import elision.kernels.ops  # noqa: F401  (registers the kernel ops)
    except Exception:  # kernels not present in this checkout: use our torch composition
        return False
    return hasattr(torch.ops.elision, "score_topk_gather")
