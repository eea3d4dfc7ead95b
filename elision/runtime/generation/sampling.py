"""Lossless speculative sampling (numpy): logits processing and multi-candidate rejection sampling on a tree.

The one implementation used by both decoding loops: the onnxruntime loop (`elision.runtime.generation.ort_generator`) calls
it directly; the torch loop (`elision.apps.specdec.verify`) converts the target logits to numpy at the verify
boundary and draws its uniforms from a `torch.Generator`.

Logits processing mirrors transformers' warpers (temperature, then top-k, then top-p keeping at least one
token, all in float32), so sampled output follows the same distribution as `generate(do_sample=True, ...)`.

Rejection rule for deterministic drafts (SpecInfer / EAGLE `evaluate_posterior` with q = point mass): at a node
with target distribution p and children tokens c_1..c_m, try them in order; accept c_i with probability
p'(c_i) / sum(p'), otherwise set p'(c_i) = 0; if every child is rejected, sample the next token from the residual
p'. Each step therefore draws exactly from p (sampling without replacement, stopped at the first success), so
the output distribution equals the target's. Every drafter in elision drafts deterministically given the
context (lookup, recycling and copy by construction, the model drafters greedily), which is what makes this rule
lossless; a drafter's own probabilities are never needed.

All randomness comes from `uniform()`, a callable returning a float in [0, 1): the loops choose the generator
(numpy for onnxruntime, torch for the torch loop) and a fixed seed makes a run reproducible.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import numpy as np

from elision.runtime.generation.tree import TokenTree

Uniform = Callable[[], float]


@dataclass(frozen=True)
class SamplingConfig:
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0

    def validate(self) -> None:
        """Raise ValueError naming the bad option (checked only when sampling: greedy ignores them, like HF)."""
        if self.do_sample:
            if not self.temperature > 0:
                raise ValueError(f"temperature must be > 0 when sampling, got {self.temperature}")
            if self.top_k < 0:
                raise ValueError(f"top_k must be >= 0 (0 disables it), got {self.top_k}")
            if not 0 < self.top_p <= 1:
                raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def target_probs(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    """Processed next-token distribution(s) [..., V] (float32) the target samples from."""
    scores = np.array(logits, dtype=np.float32)  # a copy: the caller's logits also feed the drafters
    if cfg.temperature != 1.0:
        scores /= np.float32(cfg.temperature)
    vocab = scores.shape[-1]
    if cfg.top_k and cfg.top_k < vocab:
        kth = np.partition(scores, vocab - cfg.top_k, axis=-1)[..., vocab - cfg.top_k : vocab - cfg.top_k + 1]
        scores[scores < kth] = -np.inf  # ties with the k-th score survive, as in TopKLogitsWarper
    if cfg.top_p < 1.0:
        order = np.argsort(scores, axis=-1, kind="stable")  # ascending: the tail to drop comes first
        cum = np.cumsum(_softmax(np.take_along_axis(scores, order, axis=-1)), axis=-1)
        remove_sorted = cum <= (1 - cfg.top_p)
        remove_sorted[..., -1] = False  # keep at least one token
        remove = np.zeros_like(remove_sorted)
        np.put_along_axis(remove, order, remove_sorted, axis=-1)
        scores[remove] = -np.inf
    return _softmax(scores)


class ProcessedRows:
    """`rows[i]` = target_probs of node i's logits, computed on first access.

    Verification visits only the accepted path (a few nodes of a tree of up to dozens), and processing a row
    costs a float32 copy and, with top-p, a sort of the vocabulary; so only the visited rows are processed.
    `row(i)` returns node i's raw logits as numpy (the torch loop copies just that row off the device).
    """

    def __init__(self, row: Callable[[int], np.ndarray], cfg: SamplingConfig):
        self.row, self.cfg = row, cfg
        self._done: dict[int, np.ndarray] = {}

    def __getitem__(self, i: int) -> np.ndarray:
        if i not in self._done:
            self._done[i] = target_probs(self.row(i), self.cfg)
        return self._done[i]


def _softmax(scores: np.ndarray) -> np.ndarray:
    shifted = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return shifted / shifted.sum(axis=-1, keepdims=True)


def sample_token(probs: np.ndarray, uniform: Uniform) -> int:
    """Draw from the (not necessarily normalised) weights `probs` [V] by inverting the CDF with one uniform.

    A token of weight 0 is never returned: the first index whose cumulative sum exceeds the draw always has
    positive weight, and a draw that rounding pushes past the total falls back to the last positive weight.
    """
    cum = np.cumsum(probs, dtype=np.float64)
    total = cum[-1]
    if not total > 0:
        raise ValueError("cannot sample from a distribution with no probability mass")
    idx = int(np.searchsorted(cum, uniform() * total, side="right"))
    if idx >= len(cum) or probs[idx] <= 0:
        idx = int(np.flatnonzero(probs > 0)[-1])
    return idx


def verify_sampling(tree: TokenTree, probs: np.ndarray | ProcessedRows, uniform: Uniform) -> tuple[list[int], int]:
    """Rejection-sample a path through `tree`; probs [n, V] (or `ProcessedRows`) are the processed target
    distributions of its nodes.

    Returns the accepted node indices (root first) and the token sampled after the last accepted node.
    """
    node = 0
    path = [0]
    while True:
        residual = np.array(probs[node], dtype=np.float64)
        accepted = None
        total = float(residual.sum())  # kept up to date below rather than re-summed: O(V) once per node
        for tok, child in tree.children[node].items():
            if total <= 0.0:
                break
            if uniform() * total < float(residual[tok]):
                accepted = child
                break
            total -= float(residual[tok])
            residual[tok] = 0.0
        if accepted is None:
            # all children rejected (or a leaf): the next token is drawn from what is left of p
            if not float(residual.sum()) > 0.0:
                # only reachable through float rounding when the children held all of p's mass
                residual = np.asarray(probs[node], dtype=np.float64)
            return path, sample_token(residual, uniform)
        node = accepted
        path.append(node)


def numpy_uniform(seed: int | None) -> Uniform:
    """Uniforms from numpy's default generator (fresh OS entropy when `seed` is None)."""
    return np.random.default_rng(seed).random


__all__ = ["ProcessedRows", "SamplingConfig", "Uniform", "numpy_uniform", "sample_token", "target_probs", "verify_sampling"]
