"""Verification of a token tree against the target model's logits, for the torch loop.

Greedy: walk from the root; at each node the target's argmax either equals one child's token (accept it
and continue) or not (stop). The argmax at the last accepted node is the free bonus token. The output is
exactly what step-by-step greedy decoding would produce (`elision.runtime.generation.verify`).

Sampling: the logits processing and the multi-candidate rejection rule live once, in numpy, in
`elision.runtime.generation.sampling` (shared with the onnxruntime loop; its docstring explains why the rule
is lossless). These wrappers move tensors to numpy at the verify boundary (only the rows of the nodes that
verification visits, after which the per-node accept/reject loop runs without device syncs) and draw the
uniforms from a `torch.Generator`, so `seed=` keeps meaning what it did for the torch loop.
"""
from __future__ import annotations

import numpy as np
import torch

from elision.runtime.generation import sampling as _core
from elision.runtime.generation.sampling import SamplingConfig  # noqa: F401 - re-exported for the torch loop
from elision.runtime.generation.tree import TokenTree
from elision.runtime.generation.verify import verify_greedy  # noqa: F401 - re-exported for the torch loop


def _numpy(x: torch.Tensor) -> np.ndarray:
    return x.detach().float().cpu().numpy()


def _uniform(generator: torch.Generator | None) -> _core.Uniform:
    return lambda: float(torch.rand((), generator=generator))


def target_probs(logits: torch.Tensor, cfg: SamplingConfig) -> torch.Tensor:
    """Processed next-token distribution(s) [..., V] the target samples from (a float32 tensor on logits' device)."""
    return torch.from_numpy(_core.target_probs(_numpy(logits), cfg)).to(logits.device)


def verify_sampling(tree: TokenTree, probs: torch.Tensor, generator: torch.Generator | None) -> tuple[list[int], int]:
    """Rejection-sample a path through `tree`; probs [n, V] are the processed target distributions."""
    return _core.verify_sampling(tree, _numpy(probs), _uniform(generator))


def verify_sampling_logits(tree: TokenTree, logits: torch.Tensor, cfg: SamplingConfig,
                           generator: torch.Generator | None) -> tuple[list[int], int]:
    """`verify_sampling` from raw logits [n, V]: only the rows of visited nodes are copied off the device and
    processed (see `ProcessedRows`)."""
    return _core.verify_sampling(tree, _core.ProcessedRows(lambda i: _numpy(logits[i]), cfg), _uniform(generator))


def sample_token(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    return _core.sample_token(_numpy(probs), _uniform(generator))
