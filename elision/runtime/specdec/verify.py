"""Verification of a token tree against the target model's logits.

Greedy: walk from the root; at each node the target's argmax either equals one child's token (accept it
and continue) or not (stop). The argmax at the last accepted node is the free bonus token. The output is
exactly what step-by-step greedy decoding would produce.

Sampling: multi-candidate rejection sampling for deterministic drafts (SpecInfer / EAGLE
`evaluate_posterior` with q = point mass): at a node with target distribution p and children tokens
c_1..c_m, try them in order; accept c_i with probability p'(c_i), otherwise set p'(c_i) = 0 and
renormalise; if every child is rejected, sample the next token from the residual p'. Each step therefore
draws exactly from p (it is sampling without replacement stopped at the first success), so the output
distribution equals the target's. Every drafter in elision drafts deterministically given the context,
which is what makes this rule lossless.

Logits processing mirrors transformers' warpers (temperature, then top-k, then top-p keeping at least one
token), so sampled output follows the same distribution as `generate(do_sample=True, ...)`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from elision.runtime.specdec.tree import TokenTree


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> None:
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Processed next-token distribution(s) [..., V] the target samples from."""
    scores = logits.float()
    if cfg.temperature != 1.0:
        scores = scores / cfg.temperature
    vocab = scores.shape[-1]
    if cfg.top_k and cfg.top_k < vocab:
        kth = torch.topk(scores, cfg.top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if cfg.top_p < 1.0:
        sorted_scores, sorted_idx = torch.sort(scores, descending=False, dim=-1)
        cum = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cum <= (1 - cfg.top_p)
        remove_sorted[..., -1:] = False  # keep at least one token
        remove = remove_sorted.scatter(-1, sorted_idx, remove_sorted)
        scores = scores.masked_fill(remove, float("-inf"))
    return torch.softmax(scores, dim=-1)


def verify_greedy(tree: TokenTree, argmax: list[int]) -> tuple[list[int], int]:
    """Accepted node indices (root first) and the bonus token. `argmax[i]` = target argmax at node i."""
    node = 0
    path = [0]
    while True:
        nxt = tree.children[node].get(argmax[node])
        if nxt is None:
            return path, argmax[node]
        node = nxt
        path.append(node)


def verify_sampling(tree: TokenTree, probs: torch.Tensor, generator: torch.Generator | None) -> tuple[list[int], int]:
    """Rejection-sample a path through `tree`; probs [n, V] are the processed target distributions."""
    node = 0
    path = [0]
    while True:
        residual = probs[node].clone()
        accepted = None
        for tok, child in tree.children[node].items():
            total = float(residual.sum())
            if total <= 0.0:
                break
            if float(torch.rand((), generator=generator)) * total < float(residual[tok]):
                accepted = child
                break
            residual[tok] = 0.0
        if accepted is None:
            # all children rejected (or a leaf): the next token is drawn from what is left of p
            if not float(residual.sum()) > 0.0:
                # only reachable through float rounding when the children held all of p's mass
                residual = probs[node]
            return path, int(torch.multinomial(residual, 1, generator=generator))
        node = accepted
        path.append(node)


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return int(torch.multinomial(probs, 1, generator=generator))
