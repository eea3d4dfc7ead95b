"""Adaptive KV selection (FlashVDM): per spatial block of queries, attend only to the top-k latent tokens.

For each block a few representative queries (evenly spaced in the block) are scored against all M keys;
each head keeps the k tokens with the largest mean softmax probability. The attention mass those k
tokens retain for the representative queries is measured, and blocks whose worst retained mass is below
`min_mass` fall back to full KV (FlashVDM has no such guard; see the research note §7.2 for why it is
needed). With topk >= M the result is exact attention.

Blocks are processed in batches with queries padded to the block's size; blocks are sorted by size
first so padding stays small. The gathered attention uses `elision::sparse_cross_attention` when the
kernels module provides it, else `torch.nn.functional.scaled_dot_product_attention`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class AdaptiveKVOptions:
    topk: int = 64          # tokens kept per head and block
    block: int = 8          # block edge in grid points of the current level
    samples: int = 8        # representative queries per block
    min_mass: float = 0.98  # retained softmax mass below which a block uses all tokens

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"adaptive-kv topk must be >= 1, got {self.topk}")
        if self.block < 1:
            raise ValueError(f"adaptive-kv block must be >= 1 grid point, got {self.block}")
        if self.samples < 1:
            raise ValueError(f"adaptive-kv samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.min_mass <= 1.0:
            raise ValueError(f"adaptive-kv min_mass must be in [0, 1], got {self.min_mass}")


@dataclass
class AdaptiveKVStats:
    blocks: int = 0
    fallback_blocks: int = 0
    queries: int = 0
    kv_reads: int = 0        # sum over queries of tokens attended (per head)
    kv_reads_dense: int = 0  # the same for full attention
    min_retained_mass: float = 1.0
    retained_mass: list[float] = field(default_factory=list)  # per block (worst head/sample)

    def merge(self, other: "AdaptiveKVStats") -> None:
        self.blocks += other.blocks
        self.fallback_blocks += other.fallback_blocks
        self.queries += other.queries
        self.kv_reads += other.kv_reads
        self.kv_reads_dense += other.kv_reads_dense
        self.min_retained_mass = min(self.min_retained_mass, other.min_retained_mass)
        self.retained_mass.extend(other.retained_mass)

    def as_dict(self) -> dict:
        masses = torch.tensor(self.retained_mass) if self.retained_mass else torch.ones(1)
        return {"blocks": self.blocks, "fallback_blocks": self.fallback_blocks, "queries": self.queries,
                "kv_fraction": self.kv_reads / max(self.kv_reads_dense, 1),
                "min_retained_mass": float(self.min_retained_mass),
                "median_retained_mass": float(masses.median())}


def _sparse_kernel():
    """`torch.ops.elision.sparse_cross_attention` when the kernels module registers it, else None."""
    try:
        import elision.kernels.ops  # noqa: F401  (registers torch.ops.elision.*)
        return torch.ops.elision.sparse_cross_attention
    except (ImportError, AttributeError, RuntimeError):
        return None


def gathered_attention(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                       use_kernel: bool = True) -> torch.Tensor:
    """qb [h, nb, c, d] (nb blocks of c queries), k/v [h, M, d], idx [h, nb, topk] -> [h, nb, c, d].

    Each block attends only to its own token list (per head).
    """
    h, nb, c, d = qb.shape
    kernel = _sparse_kernel() if use_kernel else None
    if kernel is not None:
        out = kernel(qb.reshape(1, h, nb * c, d), k.unsqueeze(0), v.unsqueeze(0), idx.unsqueeze(0), c)
        return out.reshape(h, nb, c, -1)
    kh = torch.gather(k.unsqueeze(1).expand(-1, nb, -1, -1), 2, idx.unsqueeze(-1).expand(-1, -1, -1, d))
    vh = torch.gather(v.unsqueeze(1).expand(-1, nb, -1, -1), 2,
                      idx.unsqueeze(-1).expand(-1, -1, -1, v.shape[-1]))
    return F.scaled_dot_product_attention(qb, kh, vh)


def block_ids_from_grid(index: torch.Tensor, block: int, resolution: int) -> torch.Tensor:
    """Integer grid indices [N,3] -> id of the block^3 spatial block each lies in."""
    nb = resolution // block + 1
    b = torch.div(index, block, rounding_mode="floor")
    return (b[:, 0] * nb + b[:, 1]) * nb + b[:, 2]


def adaptive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor,
                       opts: AdaptiveKVOptions, max_batch_queries: int = 65536,
                       use_kernel: bool = True) -> tuple[torch.Tensor, AdaptiveKVStats]:
    """Attention of q [h, N, d] over k, v [h, M, d] with per-block top-k token selection.

    block_ids [N] groups spatially coherent queries. Returns ([h, N, d], stats).
    """
    heads, n, d = q.shape
    m = k.shape[1]
    stats = AdaptiveKVStats(queries=n, kv_reads_dense=n * m)
    if n == 0:
        return q.new_zeros(heads, 0, v.shape[-1]), stats
    topk = min(opts.topk, m)
    out = torch.empty(heads, n, v.shape[-1], dtype=q.dtype)
    order = torch.argsort(block_ids, stable=True)
    _, counts = torch.unique_consecutive(block_ids[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    # Process blocks by size so that the padding of each batch is small.
    by_size = torch.argsort(counts, descending=True, stable=True)
    scale = d ** -0.5
    pos = 0
    while pos < by_size.numel():
        cmax = int(counts[by_size[pos]])
        nb = max(1, min(by_size.numel() - pos, max_batch_queries // max(cmax, 1)))
        sel_blocks = by_size[pos:pos + nb]
        pos += nb
        cnt, st = counts[sel_blocks], starts[sel_blocks]
        # padded member index [nb, cmax] into `order`; padding repeats the block's last query
        offs = torch.arange(cmax)
        member = st[:, None] + torch.minimum(offs[None, :], (cnt - 1)[:, None])
        qidx = order[member]                                              # [nb, cmax]
        valid = offs[None, :] < cnt[:, None]
        # representative queries evenly spaced inside each block
        s = min(opts.samples, cmax)
        samp_off = (torch.arange(s)[None, :] * (cnt - 1)[:, None]) // max(s - 1, 1)
        samp = order[st[:, None] + samp_off]                              # [nb, s]
        qs = q[:, samp]                                                   # [h, nb, s, d]
        probs = torch.softmax((qs @ k.transpose(-1, -2).unsqueeze(1)) * scale, dim=-1)  # [h, nb, s, M]
        score = probs.mean(dim=2)                                         # [h, nb, M]
        sel = score.topk(topk, dim=-1).indices                            # [h, nb, topk]
        retained = torch.gather(probs, -1, sel.unsqueeze(2).expand(-1, -1, s, -1)).sum(-1)  # [h, nb, s]
        worst = retained.amin(dim=(0, 2))                                 # [nb]
        fallback = worst < opts.min_mass if topk < m else torch.zeros_like(worst, dtype=torch.bool)
        stats.blocks += nb
        stats.fallback_blocks += int(fallback.sum())
        stats.retained_mass.extend(worst.tolist())
        stats.min_retained_mass = min(stats.min_retained_mass, float(worst.min()))
        qb = q[:, qidx]                                                   # [h, nb, cmax, d]
        ok = ~fallback
        res = torch.empty(heads, nb, cmax, v.shape[-1], dtype=q.dtype)
        if ok.any():
            res[:, ok] = gathered_attention(qb[:, ok].contiguous(), k, v, sel[:, ok].contiguous(),
                                            use_kernel=use_kernel)
            stats.kv_reads += int(cnt[ok].sum()) * topk
        if fallback.any():
            res[:, fallback] = F.scaled_dot_product_attention(qb[:, fallback], k.unsqueeze(1), v.unsqueeze(1))
            stats.kv_reads += int(cnt[fallback].sum()) * m
        flat_q, flat_v = qidx[valid], res[:, valid]
        out[:, flat_q] = flat_v
    return out, stats
