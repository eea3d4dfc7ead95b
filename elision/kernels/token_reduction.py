"""Core token-reduction and layer-skipping algorithms as plain torch functions.

Everything here is shape-static (a fixed number of kept/merged tokens for a given input shape), so the
functions trace under torch.export and lower to ONNX (TopK, Sort, GatherElements). The IR rewrites and
the eager executor (`executor.py`) both call these; they are tested on their own against eager HF
attention weights.

Conventions: hidden states are (B, N, C); attention q/k are (B, H, N, D) (GQA keys may have fewer heads);
`valid` is a (B, N) bool mask of real (non-padding) tokens; `protected` is a (B, N) bool mask of tokens that
must never be dropped or merged ([CLS], [SEP], text around an image span).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

SCORE_METHODS = ("cls-attn", "last-token-attn", "key-norm", "random")


class PruningError(ValueError):
    """Bad pruning options or a model the pruning passes cannot handle; the message says what to do."""


# --------------------------------------------------------------------------------------------------
# Option checking
# --------------------------------------------------------------------------------------------------

def check_keep_ratio(keep: float) -> float:
    if not isinstance(keep, (int, float)) or not (0.0 < float(keep) <= 1.0):
        raise PruningError(f"keep={keep!r} is outside (0, 1]; pass the fraction of tokens to keep, e.g. keep=0.5")
    return float(keep)


def check_layer_index(layer: int, num_layers: int, what: str = "after") -> int:
    if not isinstance(layer, int) or not (0 <= layer < num_layers):
        raise PruningError(
            f"{what}={layer!r} is out of range: the model has {num_layers} layers, use 0..{num_layers - 1}"
        )
    return layer


def keep_count(num_candidates: int, keep: float) -> int:
    """Static number of candidate tokens kept: ceil(keep * n), at least 1 (exactly n for keep=1)."""
    check_keep_ratio(keep)
    return max(1, min(num_candidates, math.ceil(keep * num_candidates - 1e-9)))


def pruned_length(n: int, keep: float, num_protected: int) -> int:
    """Static sequence length after `prune_tokens` with `num_protected` never-dropped tokens per row."""
    return num_protected + keep_count(max(n - num_protected, 1), keep) if n > num_protected else n


# --------------------------------------------------------------------------------------------------
# Score taps
# --------------------------------------------------------------------------------------------------

def _expand_kv_heads(k: torch.Tensor, num_q_heads: int) -> torch.Tensor:
    """GQA/MQA: repeat each key head so it lines up with its query heads (HF `repeat_kv` semantics)."""
    h_kv = k.shape[1]
    if h_kv == num_q_heads:
        return k
    if num_q_heads % h_kv:
        raise PruningError(f"{num_q_heads} query heads are not a multiple of {h_kv} key heads")
    return k.repeat_interleave(num_q_heads // h_kv, dim=1)


def attention_row_scores(
    q: torch.Tensor,
    k: torch.Tensor,
    query_index: int | torch.Tensor,
    valid: torch.Tensor | None = None,
    scale: float | None = None,
    causal: bool = False,
    head_reduce: str = "mean",
) -> torch.Tensor:
    """Recompute one attention row per batch element from q and k: softmax(q[i] . K^T * scale).

    Works whatever attention backend the model uses (SDPA/flash never materialise the weights): the cost
    is O(N*D) per head instead of O(N^2*D). `query_index` is an int (0 for [CLS]) or a (B,) tensor of row
    indices (the last real token of each row under padding). Padding keys get zero weight; with
    `causal=True` keys after the query are masked too. Returns (B, N) scores, reduced over heads.
    """
    b, h, n, d = q.shape
    k = _expand_kv_heads(k, h)
    scale = d ** -0.5 if scale is None else scale
    if isinstance(query_index, int):
        q_row = q[:, :, query_index : query_index + 1 if query_index != -1 else None, :]
        qi = torch.full((b,), query_index % n, dtype=torch.long, device=q.device)
    else:
        qi = query_index.to(torch.long)
        q_row = torch.gather(q, 2, qi.view(b, 1, 1, 1).expand(b, h, 1, d))
    logits = torch.matmul(q_row * scale, k.transpose(-1, -2)).squeeze(2)  # (B, H, N)
    keep = torch.ones(b, n, dtype=torch.bool, device=q.device)
    if valid is not None:
        keep = keep & valid.to(torch.bool)
    if causal:
        keep = keep & (torch.arange(n, device=q.device).view(1, n) <= qi.view(b, 1))
    logits = logits.masked_fill(~keep[:, None, :], float("-inf"))
    probs = torch.softmax(logits.float(), dim=-1).to(q.dtype)
    if head_reduce == "mean":
        return probs.mean(1)
    if head_reduce == "sum":
        return probs.sum(1)
    if head_reduce == "max":
        return probs.amax(1)
    raise PruningError(f"head_reduce={head_reduce!r}: use mean, sum or max")


def key_norm_scores(k: torch.Tensor) -> torch.Tensor:
    """Attention-free proxy: L2 norm of each token's key, averaged over heads. k: (B, H, N, D) -> (B, N)."""
    return k.float().norm(dim=-1).mean(1).to(k.dtype)


def last_valid_index(valid: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last real token of each row (right or left padding)."""
    n = valid.shape[1]
    pos = torch.arange(n, device=valid.device).expand_as(valid)
    return torch.where(valid.to(torch.bool), pos, torch.zeros_like(pos)).amax(1)


# --------------------------------------------------------------------------------------------------
# Static top-k selection + gather
# --------------------------------------------------------------------------------------------------

def select_tokens(
    scores: torch.Tensor,
    keep: float,
    protected: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    num_protected: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Choose which tokens survive. Returns (indices (B, K) sorted ascending, kept_valid (B, K) bool).

    Only `candidates` (default: every non-protected token) can be dropped. K is static:
    K = (N - C) + keep_count(C, keep) where C is the number of candidate slots; every row keeps all of its
    non-candidate tokens. Under padding each row keeps ceil(keep * its own candidate count) real tokens;
    the remaining slots of a shorter row point at padding or at dropped tokens and come back with
    kept_valid=False, so downstream masks hide them. Indices are sorted so the kept tokens stay in
    their original (raster) order.
    """
    b, n = scores.shape
    dev = scores.device
    valid = torch.ones(b, n, dtype=torch.bool, device=dev) if valid is None else valid.to(torch.bool)
    protected = torch.zeros(b, n, dtype=torch.bool, device=dev) if protected is None else protected.to(torch.bool)
    if candidates is None:
        candidates = ~protected
    candidates = candidates.to(torch.bool) & ~protected
    # The number of candidate slots must be the same in every row for a static K. With `num_protected`
    # given (export/ONNX path) it is taken on trust, so nothing depends on tensor values.
    if num_protected is not None:
        num_cand = n - num_protected
    else:
        cand_counts = candidates.sum(1)
        num_cand = int(cand_counts.max()) if b else 0
        if b and not torch.all(cand_counts == num_cand):
            raise PruningError("every row must have the same number of candidate tokens (pad spans to equal length)")
    k_total = (n - num_cand) + keep_count(max(num_cand, 1), keep) if num_cand else n
    # Per-row budget of real candidates.
    real_cand = (candidates & valid).sum(1)
    budget = torch.ceil(real_cand.to(torch.float64) * keep - 1e-9).to(torch.long).clamp(min=0)
    budget = torch.where(real_cand > 0, budget.clamp(min=1), budget)
    # Rank: non-candidates first (always kept), then real candidates by score, then the rest.
    s = scores.float()
    s = torch.where(candidates & valid, s, torch.full_like(s, float("-inf")))
    rank_key = torch.where(~candidates, torch.full_like(s, float("inf")), s)
    # Static-k TopK (lowers to ONNX TopK); ties only occur among always-kept (+inf) or dead (-inf) slots.
    top = torch.topk(rank_key, k_total, dim=1, largest=True, sorted=True).indices
    # Which of the chosen slots are real: non-candidates that are valid, or within the row budget.
    non_cand_count = (~candidates).sum(1, keepdim=True)
    slot = torch.arange(k_total, device=dev).view(1, -1)
    within_budget = slot < (non_cand_count + budget.view(-1, 1))
    idx, perm = torch.sort(top, dim=1)
    kept_valid = torch.gather(within_budget, 1, perm) & torch.gather(valid, 1, idx)
    return idx, kept_valid


def gather_tokens(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """x: (B, N, ...) gathered along dim 1 with idx (B, K) -> (B, K, ...)."""
    shape = idx.shape + x.shape[2:]
    expanded = idx.view(*idx.shape, *([1] * (x.dim() - 2))).expand(shape)
    return torch.gather(x, 1, expanded)


def prune_tokens(
    hidden: torch.Tensor,
    scores: torch.Tensor,
    keep: float,
    protected: torch.Tensor | None = None,
    valid: torch.Tensor | None = None,
    candidates: torch.Tensor | None = None,
    num_protected: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Static top-k + sort + gather. Returns (hidden_kept (B,K,C), idx (B,K), kept_valid (B,K))."""
    idx, kept_valid = select_tokens(scores, keep, protected, valid, candidates, num_protected)
    return gather_tokens(hidden, idx), idx, kept_valid


# --------------------------------------------------------------------------------------------------
# ToMe bipartite soft matching with size tracking
# --------------------------------------------------------------------------------------------------

def stable_order_descending(x: torch.Tensor) -> torch.Tensor:
    """The indices of `torch.sort(x, dim=1, descending=True, stable=True)` for x (B, M), from pairwise comparisons
    (O(M^2), fine for token counts): ONNX has no stable sort, and ties are common (identical background patches)."""
    m = x.shape[1]
    pos = torch.arange(m, device=x.device)
    xi, xj = x[:, :, None], x[:, None, :]
    ahead = (xj > xi) | ((xj == xi) & (pos.view(1, 1, m) < pos.view(1, m, 1)))  # j goes before i
    rank = ahead.sum(-1)
    return torch.zeros_like(rank).scatter(1, rank, pos.expand_as(rank))


def tome_merge(
    x: torch.Tensor,
    size: torch.Tensor,
    metric: torch.Tensor,
    r: int,
    protected: torch.Tensor | None = None,
    num_protected_a: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Merge r tokens per row by bipartite soft matching (Bolya et al., ToMe), size-weighted.

    x: (B, N, C) tokens; size: (B, N) how many original tokens each one stands for (0 marks padding, which
    then never pulls a real token's value); metric: (B, N, Cm) similarity features (keys averaged over
    heads). Tokens alternate into sets A (even) and B (odd); each A token finds its most similar B token;
    the r A tokens with the best matches are averaged (weighted by size) into their partners. Protected
    tokens are never merged. Returns (x' (B, N-r, C), size' (B, N-r), source (B, N) index of the output
    token each input token went to). Proportional attention uses log(size') as an additive key bias.
    `num_protected_a` (the most protected tokens at even positions in a row), when given, is taken on trust so
    nothing depends on tensor values (a traced graph); no in-place writes either.
    """
    b, n, c = x.shape
    if r <= 0:
        return x, size, torch.arange(n, device=x.device).expand(b, n)
    n_a = (n + 1) // 2
    protected = torch.zeros(b, n, dtype=torch.bool, device=x.device) if protected is None else protected
    if num_protected_a is not None:
        n_prot_a = num_protected_a
    else:
        n_prot_a = int(protected[:, 0::2].sum(1).max()) if b else 0
    max_r = n_a - n_prot_a
    if r > max_r:
        raise PruningError(f"merge r={r} is too large for {n} tokens ({n_prot_a} protected); use r <= {max_r}")
    m = F.normalize(metric.float(), dim=-1)
    a, bm = m[:, 0::2], m[:, 1::2]
    sim = a @ bm.transpose(1, 2)  # (B, Na, Nb)
    pad_a = size[:, 0::2] <= 0
    pad_b = size[:, 1::2] <= 0
    # Padding is matched last (below any cosine) and never attracts real tokens first.
    sim = sim.masked_fill(pad_b[:, None, :], -2.0).masked_fill(pad_a[:, :, None], -3.0)
    sim = sim.masked_fill(protected[:, 1::2][:, None, :], float("-inf"))
    sim = sim.masked_fill(protected[:, 0::2][:, :, None], float("-inf"))
    best, dst = sim.max(-1)  # (B, Na)
    # A tokens with no finite match (only possible when all of B is protected) must not be merged.
    best = torch.where(torch.isfinite(best), best, torch.full_like(best, -1e9))
    best = best.masked_fill(protected[:, 0::2], float("-inf"))
    order = stable_order_descending(best)
    src_merged = order[:, :r]  # (B, r) positions within A
    src_kept = torch.sort(order[:, r:], dim=-1).values  # keep A tokens in original order
    dst_of_merged = torch.gather(dst, 1, src_merged)

    xa, xb = x[:, 0::2], x[:, 1::2]
    sa, sb = size[:, 0::2].to(x.dtype), size[:, 1::2].to(x.dtype)
    # size-weighted sums into B
    wa = xa * sa.unsqueeze(-1)
    wb = xb * sb.unsqueeze(-1)
    merged_w = gather_tokens(wa, src_merged)
    merged_s = torch.gather(sa, 1, src_merged)
    wb = wb.scatter_add(1, dst_of_merged.unsqueeze(-1).expand(-1, -1, c), merged_w)
    sb_new = sb.scatter_add(1, dst_of_merged, merged_s)
    # Tokens whose total size is 0 (padding only) keep their value instead of 0/0.
    xb_new = torch.where(sb_new.unsqueeze(-1) > 0, wb / sb_new.clamp(min=1e-12).unsqueeze(-1), xb)
    xa_kept = gather_tokens(xa, src_kept)
    sa_kept = torch.gather(sa, 1, src_kept)
    # Output order: interleave back by original position so [CLS] stays first and order is stable.
    pos_a = src_kept * 2
    pos_b = torch.arange(xb.shape[1], device=x.device).expand(b, -1) * 2 + 1
    pos = torch.cat([pos_a, pos_b], 1)
    out_order = torch.sort(pos, dim=1).indices
    x_out = gather_tokens(torch.cat([xa_kept, xb_new], 1), out_order)
    s_out = torch.gather(torch.cat([sa_kept, sb_new], 1), 1, out_order).to(size.dtype)
    # source map: where each input token ended up
    inv = torch.argsort(out_order, dim=1)  # position in output of concat slot
    a_slot = torch.full((b, n_a), -1, dtype=torch.long, device=x.device)
    a_slot = a_slot.scatter(1, src_kept, torch.arange(src_kept.shape[1], device=x.device).expand(b, -1))
    n_kept_a = src_kept.shape[1]
    a_out = torch.gather(inv, 1, a_slot.clamp(min=0))
    b_out = torch.gather(inv, 1, n_kept_a + torch.arange(xb.shape[1], device=x.device).expand(b, -1))
    a_out = a_out.scatter(1, src_merged, torch.gather(b_out, 1, dst_of_merged))
    # interleave a_out (even positions) and b_out (odd): pad B to A's length, pair them up, drop the pad
    b_pad = torch.cat([b_out, b_out[:, :n_a - b_out.shape[1]]], 1)
    source = torch.stack([a_out, b_pad], 2).reshape(b, 2 * n_a)[:, :n]
    return x_out, s_out, source


def proportional_attention_bias(size: torch.Tensor) -> torch.Tensor:
    """Additive key bias log(size) as an SDPA float mask (B, 1, 1, N); padding (size 0) becomes -inf."""
    return torch.log(size.float()).view(size.shape[0], 1, 1, -1)


# --------------------------------------------------------------------------------------------------
# DCT low-pass compression of a vision feature grid (Fourier-VLM)
# --------------------------------------------------------------------------------------------------

def dct_matrix(n: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """Orthonormal DCT-II matrix (n x n): row k is the k-th cosine basis vector."""
    i = torch.arange(n, dtype=torch.float64, device=device)
    k = i.view(-1, 1)
    mat = torch.cos(math.pi * (2 * i.view(1, -1) + 1) * k / (2 * n)) * math.sqrt(2.0 / n)
    mat[0] = mat[0] / math.sqrt(2.0)
    return mat.to(dtype)


def dct_grid_size(h: int, w: int, keep: float) -> tuple[int, int]:
    check_keep_ratio(keep)
    s = math.sqrt(keep)
    return max(1, min(h, round(h * s))), max(1, min(w, round(w * s)))


def dct_low_pass_matrices(grid: tuple[int, int], keep: float, device=None) -> tuple[torch.Tensor, ...] | None:
    """(rows, cols, inverse rows, inverse cols) DCT matrices of `dct_compress` for a `grid`, or None when `keep`
    keeps the whole grid. They depend on the shapes only, so a compiler computes them once as constants."""
    big_h, big_w = grid
    h, w = dct_grid_size(big_h, big_w, keep)
    if (h, w) == (big_h, big_w):
        return None
    # the inverse of an orthonormal DCT is its transpose
    return (dct_matrix(big_h, device=device)[:h], dct_matrix(big_w, device=device)[:w],
            dct_matrix(h, device=device), dct_matrix(w, device=device))


def dct_low_pass(x: torch.Tensor, dh: torch.Tensor, dw: torch.Tensor, ih: torch.Tensor,
                 iw: torch.Tensor) -> torch.Tensor:
    """Apply `dct_low_pass_matrices` to a (B, H*W, C) grid -> (B, h*w, C) (the arithmetic of `dct_compress`)."""
    (h, big_h), (w, big_w) = dh.shape, dw.shape
    b, _n, c = x.shape
    xf = x.float().reshape(b, big_h, big_w, c)
    coeff = torch.einsum("hH,bHWc,wW->bhwc", dh, xf, dw)
    small = torch.einsum("hy,bhwc,wx->byxc", ih, coeff, iw) * math.sqrt((h * w) / (big_h * big_w))
    return small.reshape(b, h * w, c).to(x.dtype)


def dct_compress(x: torch.Tensor, grid: tuple[int, int], keep: float) -> torch.Tensor:
    """Low-pass a (B, H*W, C) feature grid to (B, h*w, C) tokens, h*w ~= keep*H*W.

    2-D DCT-II, keep the h x w lowest frequencies, inverse DCT at the smaller size. The sqrt(hw/HW)
    factor makes a constant grid map to the same constant, so feature magnitudes are unchanged. keep=1
    reproduces the input up to float rounding of the orthonormal transforms.
    """
    big_h, big_w = grid
    if x.shape[1] != big_h * big_w:
        raise PruningError(f"dct compression: {x.shape[1]} tokens do not form a {big_h}x{big_w} grid")
    mats = dct_low_pass_matrices(grid, keep, device=x.device)
    return x if mats is None else dct_low_pass(x, *mats)


# --------------------------------------------------------------------------------------------------
# Layer skipping: block influence and fidelity metrics
# --------------------------------------------------------------------------------------------------

def block_influence(h_in: torch.Tensor, h_out: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ShortGPT Block Influence 1 - cos(h_in, h_out) averaged over real tokens (a scalar tensor)."""
    cos = F.cosine_similarity(h_in.float(), h_out.float(), dim=-1)
    bi = torch.nan_to_num(1.0 - cos, nan=0.5)
    if valid is None:
        return bi.mean()
    v = valid.to(bi.dtype)
    return (bi * v).sum() / v.sum().clamp(min=1)


def kl_divergence(ref_logits: torch.Tensor, new_logits: torch.Tensor) -> torch.Tensor:
    """Mean KL(ref || new) over leading dims of the softmax distributions of two logit tensors."""
    ref_lp = F.log_softmax(ref_logits.float(), dim=-1)
    new_lp = F.log_softmax(new_logits.float(), dim=-1)
    return (ref_lp.exp() * (ref_lp - new_lp)).sum(-1).mean()


def masked_mean_pool(h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Sentence embedding: mean of token states weighted by mask/size (B, N) -> (B, C)."""
    w = weight.to(h.dtype).unsqueeze(-1)
    return (h * w).sum(1) / w.sum(1).clamp(min=1e-9)
