"""Adaptive KV selection (FlashVDM): per spatial block of queries, attend only to the top-k latent tokens.

For each block a few representative queries (evenly spaced in the block) are scored against all M keys;
each head ranks the tokens by their mean softmax probability. The attention mass the top k tokens retain
for the representative queries is measured, and a block gets the smallest k of a ladder (topk, 2 topk,
4 topk, ... `tiers` doublings, all below M) whose worst retained mass reaches `min_mass`; blocks that no
rung satisfies fall back to full KV (FlashVDM has one fixed k and no guard; see the research note §7.2 for
why the guard is needed). The ladder matters because locality varies across the surface: on the fitted
local decoder most fine-level blocks need only 32 tokens while a few need 128-512, and a single k either
wastes reads on the first or sends the second to full KV. With topk >= M the result is exact attention. The volume evaluator stops probing for the rest
of a level once the guard has rejected almost every probed block there (the decoder is not local at that
block size: coarse levels' blocks span much of the shape), so a non-local decoder costs about what plain
hierarchical decoding costs, while a local one still gains at the fine levels.

Accepted blocks are processed in batches with queries padded to the largest block of the batch (blocks
sorted by size, so padding stays small); all full-KV blocks share one plain attention call. On CUDA the
gathered attention runs `elision::sparse_cross_attention` (Triton); on CPU it runs
`torch.nn.functional.scaled_dot_product_attention` over the gathered K/V.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from elision.runtime.volume.field import attention


@dataclass(frozen=True)
class AdaptiveKVOptions:
    topk: int = 32          # tokens kept per head and block (the first rung of the ladder)
    block: int = 16         # block edge in grid points of the current level
    samples: int = 8        # representative queries per block
    min_mass: float = 0.98  # retained softmax mass below which a block moves up the ladder (then: all tokens)
    tiers: int = 3          # doublings of topk tried before full KV (0: one fixed k, as FlashVDM)
    tile: int = 128         # queries per attention tile (a block's tiles share its tokens)

    def __post_init__(self) -> None:
        if self.topk < 1:
            raise ValueError(f"adaptive-kv topk must be >= 1, got {self.topk}")
        if self.block < 1:
            raise ValueError(f"adaptive-kv block must be >= 1 grid point, got {self.block}")
        if self.samples < 1:
            raise ValueError(f"adaptive-kv samples must be >= 1, got {self.samples}")
        if not 0.0 <= self.min_mass <= 1.0:
            raise ValueError(f"adaptive-kv min_mass must be in [0, 1], got {self.min_mass}")
        if self.tile < 1:
            raise ValueError(f"adaptive-kv tile must be >= 1 query, got {self.tile}")
        if self.tiers < 0:
            raise ValueError(f"adaptive-kv tiers must be >= 0, got {self.tiers}")

    def ladder(self, tokens: int) -> list[int]:
        """The k values tried per block, smallest first, all below `tokens` (full KV is the last resort)."""
        return [self.topk << j for j in range(self.tiers + 1) if self.topk << j < tokens]


@dataclass
class AdaptiveKVStats:
    blocks: int = 0
    fallback_blocks: int = 0  # blocks that ran full KV (too small to probe, or below min_mass)
    queries: int = 0
    kv_reads: int = 0        # sum over queries of tokens attended (per head)
    kv_reads_dense: int = 0  # the same for full attention
    plain_queries: int = 0   # queries run without probing once the guard showed attention is non-local
    min_retained_mass: float = 1.0
    retained_mass: list[float] = field(default_factory=list)  # per block (worst head/sample, at its k)
    blocks_per_k: dict[int, int] = field(default_factory=dict)  # accepted blocks by the rung they got

    def add_plain(self, queries: int, tokens: int) -> None:
        """Queries run through plain full-KV attention without probing."""
        self.queries += queries
        self.plain_queries += queries
        self.kv_reads += queries * tokens
        self.kv_reads_dense += queries * tokens

    def merge(self, other: "AdaptiveKVStats") -> None:
        self.blocks += other.blocks
        self.fallback_blocks += other.fallback_blocks
        self.queries += other.queries
        self.kv_reads += other.kv_reads
        self.kv_reads_dense += other.kv_reads_dense
        self.plain_queries += other.plain_queries
        self.min_retained_mass = min(self.min_retained_mass, other.min_retained_mass)
        self.retained_mass.extend(other.retained_mass)
        for k, n in other.blocks_per_k.items():
            self.blocks_per_k[k] = self.blocks_per_k.get(k, 0) + n

    def as_dict(self) -> dict:
        masses = torch.tensor(self.retained_mass) if self.retained_mass else torch.ones(1)
        return {"blocks": self.blocks, "fallback_blocks": self.fallback_blocks, "queries": self.queries,
                "plain_queries": self.plain_queries, "kv_fraction": self.kv_reads / max(self.kv_reads_dense, 1),
                "min_retained_mass": float(self.min_retained_mass),
                "median_retained_mass": float(masses.median()),
                "blocks_per_k": dict(sorted(self.blocks_per_k.items()))}


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
    # On CPU the registered op runs its unfused reference (explicit softmax); SDPA's fused CPU kernel over
    # the gathered K/V is faster, so the custom kernel is only worth it where Triton runs it.
    kernel = _sparse_kernel() if use_kernel and qb.is_cuda else None
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


def _probe(q: torch.Tensor, k: torch.Tensor, samp: torch.Tensor, kmax: int,
           scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank tokens with a few sample queries per block: samp [nb, s] query ids -> (the kmax best token ids
    per head, best first [h, nb, kmax], worst retained softmax mass over heads and samples when keeping the
    best j+1 tokens [nb, kmax]) -- one ranking serves every rung of the ladder."""
    h, (nb, s) = q.shape[0], samp.shape
    # one [h, nb*s, d] x [h, d, M] product: broadcasting k over the block axis would copy it per block
    logits = torch.bmm(q[:, samp.reshape(-1)], k.transpose(-1, -2)).view(h, nb, s, -1)
    probs = torch.softmax(logits * scale, dim=-1)                         # [h, nb, s, M]
    sel = probs.mean(dim=2).topk(kmax, dim=-1).indices                    # [h, nb, kmax], sorted
    retained = torch.gather(probs, -1, sel.unsqueeze(2).expand(-1, -1, s, -1)).cumsum(-1)
    return sel, retained.amin(dim=(0, 2)).cpu()  # block bookkeeping stays on the CPU


def _run_gathered(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, order: torch.Tensor, cnt: torch.Tensor,
                  st: torch.Tensor, sel: torch.Tensor, out: torch.Tensor, use_kernel: bool, tile: int) -> None:
    """Attention of the blocks (sizes cnt, starts st into `order`) over their own tokens sel [h, nb, k],
    written into out [h, N, d].

    Blocks are cut into tiles of `tile` queries that share their block's tokens; only a block's last tile is
    padded (repeating its last query). Padding every block to the largest one instead doubled the attention
    work on a real surface, where block sizes range over 10x.
    """
    tile = min(tile, int(cnt.max()))
    ntile = (cnt + tile - 1) // tile
    tb = torch.repeat_interleave(torch.arange(cnt.numel()), ntile)          # tile -> block
    within = torch.arange(tb.numel()) - torch.repeat_interleave(torch.cumsum(ntile, 0) - ntile, ntile)
    offs = within[:, None] * tile + torch.arange(tile)[None, :]              # [tiles, tile] offset in block
    last = (cnt - 1)[tb][:, None]
    qidx = order[st[tb][:, None] + torch.minimum(offs, last)]
    valid = offs <= last
    res = gathered_attention(q[:, qidx].contiguous(), k, v, sel[:, tb].contiguous(), use_kernel=use_kernel)
    out[:, qidx[valid]] = res[:, valid]


def adaptive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor,
                       opts: AdaptiveKVOptions, max_batch_queries: int = 65536,
                       use_kernel: bool = True) -> tuple[torch.Tensor, AdaptiveKVStats]:
    """Attention of q [h, N, d] over k, v [h, M, d] with per-block top-k token selection.

    block_ids [N] groups spatially coherent queries. Returns ([h, N, d], stats).

    Cost model (the path must never cost much more than plain attention): blocks with fewer than
    4 x `samples` queries are not probed (the probe would cost over a quarter of the block's attention), and
    every block that is not probed or fails the retained-mass guard on every rung joins ONE plain full-KV call
    over all such queries. A fully non-local decoder therefore pays plain attention plus the probes
    (`samples` queries per probed block, at most a quarter of it) and the sort by block.
    """
    heads, n, d = q.shape
    m = k.shape[1]
    stats = AdaptiveKVStats(queries=n, kv_reads_dense=n * m)
    if n == 0:
        return q.new_zeros(heads, 0, v.shape[-1]), stats
    ladder = opts.ladder(m)
    if not ladder:  # exact attention: selecting every token is plain attention
        stats.kv_reads = n * m
        return attention(q, k, v), stats
    out = torch.empty(heads, n, v.shape[-1], dtype=q.dtype, device=q.device)
    order = torch.argsort(block_ids, stable=True)
    _, counts = torch.unique_consecutive(block_ids[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    stats.blocks = int(counts.numel())
    probe_min = 4 * opts.samples
    probed = (counts >= probe_min).nonzero().flatten()
    plain_blocks = [(counts < probe_min).nonzero().flatten()]
    scale = d ** -0.5
    s = opts.samples
    rungs = torch.tensor(ladder)
    # Probe and run the accepted blocks in batches, largest first, so padding stays small.
    by_size = probed[torch.argsort(counts[probed], descending=True, stable=True)]
    pos = 0
    while pos < by_size.numel():
        cmax = int(counts[by_size[pos]])
        nb = max(1, min(by_size.numel() - pos, max_batch_queries // cmax))
        blocks = by_size[pos:pos + nb]
        pos += nb
        cnt, st = counts[blocks], starts[blocks]
        samp_off = (torch.arange(s)[None, :] * (cnt - 1)[:, None]) // max(s - 1, 1)
        sel, retained = _probe(q, k, order[st[:, None] + samp_off], ladder[-1], scale)
        at_rungs = retained[:, rungs - 1]                                  # [nb, rungs]
        passes = at_rungs >= opts.min_mass
        rung = torch.where(passes.any(1), passes.int().argmax(1), len(ladder))  # first passing rung, or full KV
        worst = torch.gather(at_rungs, 1, rung.clamp(max=len(ladder) - 1)[:, None])[:, 0]
        stats.retained_mass.extend(worst.tolist())
        stats.min_retained_mass = min(stats.min_retained_mass, float(worst.min()))
        plain_blocks.append(blocks[rung == len(ladder)])
        for j, kj in enumerate(ladder):
            ok = rung == j
            if ok.any():
                _run_gathered(q, k, v, order, cnt[ok], st[ok], sel[:, ok, :kj], out, use_kernel, opts.tile)
                stats.kv_reads += int(cnt[ok].sum()) * kj
                stats.blocks_per_k[kj] = stats.blocks_per_k.get(kj, 0) + int(ok.sum())
    fallback = torch.cat(plain_blocks)
    stats.fallback_blocks = int(fallback.numel())
    if fallback.numel():
        # one plain call over every query of every fallback block (no padding, no per-block batching)
        members = torch.repeat_interleave(starts[fallback], counts[fallback])
        members += torch.arange(members.numel()) - torch.repeat_interleave(
            torch.cumsum(counts[fallback], 0) - counts[fallback], counts[fallback])
        qi = order[members]
        out[:, qi] = attention(q[:, qi], k, v)
        stats.kv_reads += int(qi.numel()) * m
    return out, stats
