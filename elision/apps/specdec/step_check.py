"""Differential check of a generation artifact: its ONNX Runtime session against the compiled `@verify` in torch.

Both sides are `TreeSession`s (`elision.runtime.generation.session`) driven through the same calls: a prefill of two
ragged prompts, then steps of random token trees (one sequence idle in the last step), committing a random accepted
path each time. The torch side is `KVSession` over `CompiledBackend` (concatenating cache, exactly the IR); the
ONNX side is whatever session the artifact's form uses (for the step graph: GroupQueryAttention writing the cache in
place). Logits of every valid node must agree to `tolerance` relative to the largest logit, so a rewrite rule that
changes the numbers, or a cache that drifts after compaction, fails the compile instead of the user's output.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from elision.apps.specdec.compiled_backend import CompiledSpecDec
from elision.apps.specdec.session import KVSession
from elision.runtime.generation.tree import TokenTree

__all__ = ["StepMismatchError", "compare_sessions", "check_step_artifact", "random_tree"]


class StepMismatchError(ValueError):
    """The artifact's step disagrees with the compiled graph it was lowered from."""


def random_tree(rng: np.random.Generator, root: int, size: int, vocab: int) -> TokenTree:
    """A random tree in parents-first order (siblings distinct, so it may come out smaller than `size`)."""
    tree = TokenTree.root(root)
    for i in range(1, size):
        tree.add(int(rng.integers(0, len(tree))), int(rng.integers(0, vocab)), 1.0)
    return tree


def _relative_error(got, want, counts) -> float:
    got = np.asarray(got, dtype=np.float64)
    want = want.detach().double().numpy() if isinstance(want, torch.Tensor) else np.asarray(want, dtype=np.float64)
    worst = 0.0
    for b, n in enumerate(counts):
        if n:
            scale = max(1.0, float(np.abs(want[b, :n]).max()))
            worst = max(worst, float(np.abs(got[b, :n] - want[b, :n]).max()) / scale)
    return worst


def compare_sessions(session, reference, vocab: int, *, steps: int = 3, seed: int = 0,
                     prompt_lengths: tuple[int, ...] = (9, 4), tree_size: int = 6) -> float:
    """Drive both sessions identically (see the module docstring); the worst relative logits error."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, n).tolist() for n in prompt_lengths]
    with torch.inference_mode():
        worst = _relative_error(session.prefill(prompts), reference.prefill(prompts), [len(p) for p in prompts])
        last = [p[-1] for p in prompts]
        for step in range(steps):
            trees = [random_tree(rng, last[b], tree_size, vocab) for b in range(len(prompts))]
            if step == steps - 1 and len(trees) > 1:
                trees[-1] = None  # an idle sequence: nothing of it may be written or read
            counts = [len(t) if t is not None else 0 for t in trees]
            worst = max(worst, _relative_error(session.extend(trees), reference.extend(trees), counts))
            keep = []
            for b, t in enumerate(trees):
                if t is None:
                    keep.append([])
                    continue
                path = t.path_nodes(int(rng.integers(0, len(t))))
                keep.append(path)
                last[b] = t.tokens[path[-1]]
            session.commit(keep)
            reference.commit(keep)
    return worst


def check_step_artifact(spec: CompiledSpecDec, artifact_dir: str | Path, tolerance: float = 1e-4) -> float:
    """`compare_sessions` between the artifact (loaded with onnxruntime) and `spec`'s compiled `@verify`;
    raises StepMismatchError beyond `tolerance`. Returns the worst relative error."""
    from elision.runtime.generation.ort_generator import OrtGenerator

    capacity = 64
    reference = KVSession(spec.backend("verify"), 2, capacity)
    try:
        # no weight prepacking: the check runs a few steps while the torch model is still in memory, and packed
        # copies of every weight would double the compile's peak memory for nothing
        gen = OrtGenerator.load(artifact_dir, threads=1, verify=False,
                                session_config={"session.disable_prepacking": "1"})
        session = gen.new_session(2, capacity)
        worst = compare_sessions(session, reference, int(spec.config["vocab_size"]))
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; any failure means "not this form"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepMismatchError(f"onnxruntime cannot run the lowered step: {first[:300]}") from None
    if not worst <= tolerance:
        raise StepMismatchError(f"the ONNX Runtime step differs from the compiled @verify by {worst:.2e} (relative "
                                f"to the largest logit; tolerance {tolerance:.0e})")
    return worst
