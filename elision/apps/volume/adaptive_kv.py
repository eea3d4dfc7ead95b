"""Adaptive KV selection (FlashVDM): per spatial block of queries, attend only to the top-k latent tokens.

For each block a few representative queries (evenly spaced in the block) are scored against all M keys;
each head ranks the tokens by their mean softmax probability. The attention mass the top k tokens retain
for the representative queries is measured, and a block gets the smallest k of a ladder (topk, 2 topk,
4 topk, ... `tiers` doublings, all below M) whose worst retained mass reaches `min_mass`; blocks that no
rung satisfies fall back to full KV (FlashVDM has one fixed k and no guard; see the research note §7.2 for
why the guard is needed). The ladder matters because locality varies across the surface: on the fitted
local decoder most fine-level blocks need only 32 tokens while a few need 128-512, and a single k either
wastes reads on the first or sends the second to full KV. With topk >= M the result is exact attention.
The volume evaluator stops probing for the rest of a level once the guard has rejected almost every probed
block there (the decoder is not local at that block size: coarse levels' blocks span much of the shape), so
a non-local decoder costs about what plain hierarchical decoding costs, while a local one still gains at
the fine levels.

`plan_adaptive_kv` makes the decisions (it only needs the probe queries); execution is the compiled decoder's:
accepted blocks are cut into tiles of queries that share their block's tokens (`TileGroup`), which the field
decoder evaluates whole (`GatheredFieldDecoder.evaluate_gathered`: the @evaluate_gathered function the adaptive-kv
pass adds, lowered to torch or ONNX Runtime), and all full-KV queries go through the plain @evaluate in one pass.
`adaptive_attention` applies the same plan to raw attention tensors (the reference the tests check the plan
against); its gathered attention runs `elision::sparse_cross_attention` (Triton) on CUDA and
`torch.nn.functional.scaled_dot_product_attention` over the gathered K/V on the CPU.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn.functional as F

from elision.passes.volume import AdaptiveKVOptions

__all__ = ["AdaptiveKVOptions", "AdaptiveKVStats", "KVPlan", "TileGroup", "adaptive_attention", "attention",
           "block_ids_from_grid", "gather_heads", "gathered_attention", "plan_adaptive_kv", "tile_batches"]


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


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """SDPA over [heads, N, d] tensors. Called with a leading batch axis: on CPU, 3-D inputs take the
    unfused math path, about 8x slower than the fused kernel 4-D inputs get (measured, torch 2.x)."""
    return F.scaled_dot_product_attention(q[None], k[None], v[None])[0]


def _sparse_kernel():
    """`torch.ops.elision.sparse_cross_attention` when the kernels module registers it, else None."""
    try:
        import elision.kernels.ops  # noqa: F401  (registers torch.ops.elision.*)
        return torch.ops.elision.sparse_cross_attention
    except (ImportError, AttributeError, RuntimeError):
        return None


def gather_heads(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x [h, M, d], idx [h, ...] token ids per head -> [h, ..., d]: one flat Gather over the (head, token) rows,
    so neither torch nor an ONNX graph materializes a per-block copy of K or V."""
    h, m, d = x.shape
    offset = (torch.arange(h, device=idx.device) * m).view(h, *([1] * (idx.dim() - 1)))
    return x.reshape(h * m, d)[idx + offset]


def gathered_attention(qb: torch.Tensor, k: torch.Tensor, v: torch.Tensor, idx: torch.Tensor,
                       use_kernel: bool = True) -> torch.Tensor:
    """qb [h, nb, c, d] (nb tiles of c queries), k/v [h, M, d], idx [h, nb, topk] -> [h, nb, c, d].

    Each tile attends only to its own token list (per head).
    """
    h, nb, c, d = qb.shape
    # On CPU the registered op runs its unfused reference (explicit softmax); SDPA's fused CPU kernel over
    # the gathered K/V is faster, so the custom kernel is only worth it where Triton runs it.
    kernel = _sparse_kernel() if use_kernel and qb.is_cuda else None
    if kernel is not None:
        out = kernel(qb.reshape(1, h, nb * c, d), k.unsqueeze(0), v.unsqueeze(0), idx.unsqueeze(0), c)
        return out.reshape(h, nb, c, -1)
    return F.scaled_dot_product_attention(qb, gather_heads(k, idx), gather_heads(v, idx))


def block_ids_from_grid(index: torch.Tensor, block: int, resolution: int) -> torch.Tensor:
    """Integer grid indices [N,3] -> id of the block^3 spatial block each lies in."""
    nb = resolution // block + 1
    b = torch.div(index, block, rounding_mode="floor")
    return (b[:, 0] * nb + b[:, 1]) * nb + b[:, 2]


def _probe(qs: torch.Tensor, k: torch.Tensor, kmax: int, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank tokens with a few sample queries per block: qs [h, nb, s, d] -> (the kmax best token ids per head,
    best first [h, nb, kmax], worst retained softmax mass over heads and samples when keeping the best j+1
    tokens [nb, kmax]) -- one ranking serves every rung of the ladder."""
    h, nb, s, d = qs.shape
    # one [h, nb*s, d] x [h, d, M] product: broadcasting k over the block axis would copy it per block
    logits = torch.bmm(qs.reshape(h, nb * s, d), k.transpose(-1, -2)).view(h, nb, s, -1)
    probs = torch.softmax(logits * scale, dim=-1)                         # [h, nb, s, M]
    sel = probs.mean(dim=2).topk(kmax, dim=-1).indices                    # [h, nb, kmax], sorted
    retained = torch.gather(probs, -1, sel.unsqueeze(2).expand(-1, -1, s, -1)).cumsum(-1)
    return sel, retained.amin(dim=(0, 2)).cpu()  # block bookkeeping stays on the CPU


@dataclass
class TileGroup:
    """Blocks that attend to the same number of tokens, cut into tiles of at most `tile` queries that share
    their block's tokens; only a block's last tile is padded (repeating its last query). Padding every block
    to the largest one instead doubled the attention work on a real surface, where block sizes range over 10x."""
    topk: int
    queries: torch.Tensor  # [tiles, c] query ids (padded)
    valid: torch.Tensor    # [tiles, c] False on padding
    tokens: torch.Tensor   # [h, tiles, topk] token ids per head


@dataclass
class KVPlan:
    groups: list[TileGroup]
    full: torch.Tensor     # query ids that attend to every token (unprobed or rejected blocks)


def _tiles(order: torch.Tensor, cnt: torch.Tensor, st: torch.Tensor, sel: torch.Tensor, tile: int) -> TileGroup:
    tile = min(tile, int(cnt.max()))
    ntile = (cnt + tile - 1) // tile
    tb = torch.repeat_interleave(torch.arange(cnt.numel()), ntile)          # tile -> block
    within = torch.arange(tb.numel()) - torch.repeat_interleave(torch.cumsum(ntile, 0) - ntile, ntile)
    offs = within[:, None] * tile + torch.arange(tile)[None, :]              # [tiles, tile] offset in block
    last = (cnt - 1)[tb][:, None]
    return TileGroup(sel.shape[-1], order[st[tb][:, None] + torch.minimum(offs, last)], offs <= last,
                     sel[:, tb.to(sel.device)].contiguous())


# probe logits/probabilities held at once: h x blocks x samples x M elements (64 MiB in fp32)
PROBE_BUDGET = 1 << 24


def plan_adaptive_kv(query_heads: Callable[[torch.Tensor], torch.Tensor], k: torch.Tensor,
                     block_ids: torch.Tensor, opts: AdaptiveKVOptions,
                     scale: float | None = None) -> tuple[KVPlan, AdaptiveKVStats]:
    """Decide, per block of queries (block_ids [N]), which tokens each head attends to.

    `query_heads(ids)` gives the queries' heads [h, len(ids), d] for query ids: only the `samples` probe
    queries of each block are asked for, so a backend can compute them alone. k is [h, M, d]; `scale` is the
    attention's logit scale (None: d^-0.5, SDPA's default).

    Cost model (the path must never cost much more than plain attention): blocks with fewer than
    4 x `samples` queries are not probed (the probe would cost over a quarter of the block's attention), and
    every block that is not probed or fails the retained-mass guard on every rung attends to all tokens, in
    one plain call over all such queries. A fully non-local decoder therefore pays plain attention plus the
    probes (`samples` queries per probed block, at most a quarter of it) and the sort by block.
    """
    heads, m, d = k.shape
    n = block_ids.numel()
    stats = AdaptiveKVStats(queries=n, kv_reads_dense=n * m)
    ladder = opts.ladder(m)
    if n == 0 or not ladder:  # nothing to do, or exact attention: selecting every token is plain attention
        stats.kv_reads = n * m
        return KVPlan([], torch.arange(n)), stats
    order = torch.argsort(block_ids, stable=True)
    _, counts = torch.unique_consecutive(block_ids[order], return_counts=True)
    starts = torch.cumsum(counts, 0) - counts
    stats.blocks = int(counts.numel())
    s = opts.samples
    probed = (counts >= 4 * s).nonzero().flatten()
    full_blocks = [(counts < 4 * s).nonzero().flatten()]
    rungs = torch.tensor(ladder)
    chosen: dict[int, list] = {kk: [] for kk in ladder}  # rung -> [(blocks' counts, starts, tokens)]
    per_batch = max(1, PROBE_BUDGET // (heads * s * m))
    for pos in range(0, probed.numel(), per_batch):
        blocks = probed[pos:pos + per_batch]
        cnt, st = counts[blocks], starts[blocks]
        samp = order[st[:, None] + (torch.arange(s)[None, :] * (cnt - 1)[:, None]) // max(s - 1, 1)]
        qs = query_heads(samp.reshape(-1)).reshape(heads, blocks.numel(), s, d)
        sel, retained = _probe(qs, k, ladder[-1], d ** -0.5 if scale is None else scale)
        at_rungs = retained[:, rungs - 1]                                   # [nb, rungs]
        passes = at_rungs >= opts.min_mass
        rung = torch.where(passes.any(1), passes.int().argmax(1), len(ladder))  # first passing rung, or all
        worst = torch.gather(at_rungs, 1, rung.clamp(max=len(ladder) - 1)[:, None])[:, 0]
        stats.retained_mass.extend(worst.tolist())
        stats.min_retained_mass = min(stats.min_retained_mass, float(worst.min()))
        full_blocks.append(blocks[rung == len(ladder)])
        for j, kk in enumerate(ladder):
            ok = rung == j
            if ok.any():
                chosen[kk].append((cnt[ok], st[ok], sel[:, ok.to(sel.device), :kk]))
    groups = []
    for kk, parts in chosen.items():
        if parts:
            cnt, st = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            groups.append(_tiles(order, cnt, st, torch.cat([p[2] for p in parts], 1), opts.tile))
            stats.kv_reads += int(cnt.sum()) * kk
            stats.blocks_per_k[kk] = int(cnt.numel())
    fb = torch.cat(full_blocks)
    stats.fallback_blocks = int(fb.numel())
    # every query of every full-KV block, in block order
    members = torch.repeat_interleave(starts[fb], counts[fb])
    members += torch.arange(members.numel()) - torch.repeat_interleave(torch.cumsum(counts[fb], 0) - counts[fb],
                                                                      counts[fb])
    stats.kv_reads += int(members.numel()) * m
    return KVPlan(groups, order[members]), stats


def tile_batches(group: TileGroup, max_queries: int):
    """Slices of a group's tiles holding at most `max_queries` queries (at least one tile) each."""
    step = max(1, max_queries // group.queries.shape[1])
    for t in range(0, group.queries.shape[0], step):
        yield slice(t, t + step)


def adaptive_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, block_ids: torch.Tensor,
                       opts: AdaptiveKVOptions, max_batch_queries: int = 65536,
                       use_kernel: bool = True) -> tuple[torch.Tensor, AdaptiveKVStats]:
    """Attention of q [h, N, d] over k, v [h, M, d] with per-block token selection (see `plan_adaptive_kv`);
    returns ([h, N, d], stats). Gathered tiles run in batches of at most `max_batch_queries` queries."""
    plan, stats = plan_adaptive_kv(lambda ids: q[:, ids], k, block_ids, opts)
    out = torch.empty(q.shape[0], q.shape[1], v.shape[-1], dtype=q.dtype, device=q.device)
    for g in plan.groups:
        for sl in tile_batches(g, max_batch_queries):
            qidx, valid = g.queries[sl], g.valid[sl]
            res = gathered_attention(q[:, qidx].contiguous(), k, v, g.tokens[:, sl], use_kernel=use_kernel)
            out[:, qidx[valid]] = res[:, valid]
    if plan.full.numel():
        out[:, plan.full] = attention(q[:, plan.full], k, v)
    return out, stats
