"""Differential check of a generation artifact: its ONNX Runtime session against the compiled `@verify` in torch.

Both sides are `TreeSession`s (`elision.runtime.generation.session`) driven through the same calls: a prefill of two
ragged prompts, then steps of random token trees (one sequence idle in the last step), committing a random accepted
path each time. The torch side is `KVSession` over `CompiledBackend` (concatenating cache, exactly the IR); the
ONNX side is whatever session the artifact's form uses (for the step graph: GroupQueryAttention writing the cache in
place). Logits of every valid node must agree to `tolerance` relative to the largest logit, so a rewrite rule that
changes the numbers, or a cache that drifts after compaction, fails the compile instead of the user's output.
The torch side is recorded first (`reference_run`), so the compile never holds the torch weights and the
onnxruntime session at once.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from elision.apps.specdec.compiled_backend import CompiledSpecDec
from elision.apps.specdec.session import KVSession
from elision.runtime.generation.ort_generator import OrtGenerator
from elision.runtime.generation.tree import TokenTree

__all__ = ["StepMismatchError", "check_step_artifact", "compare_sessions", "drive", "random_tree", "reference_run",
           "step_tolerance", "worst_relative_error"]

_CAPACITY = 64


class StepMismatchError(ValueError):
    """The artifact's step disagrees with the compiled graph it was lowered from."""


def random_tree(rng: np.random.Generator, root: int, size: int, vocab: int) -> TokenTree:
    """A random tree in parents-first order (siblings distinct, so it may come out smaller than `size`)."""
    tree = TokenTree.root(root)
    for i in range(1, size):
        tree.add(int(rng.integers(0, len(tree))), int(rng.integers(0, vocab)), 1.0)
    return tree


def _valid_rows(logits, counts) -> list[np.ndarray]:
    """Copies (the step session reuses its logits buffer) of each sequence's valid rows, as float64 numpy."""
    if isinstance(logits, torch.Tensor):
        logits = logits.detach().double().numpy()
    return [np.array(logits[b, :n], dtype=np.float64) for b, n in enumerate(counts) if n]


def drive(session, vocab: int, *, steps: int = 3, seed: int = 0, prompt_lengths: tuple[int, ...] = (9, 4),
          tree_size: int = 6) -> list[np.ndarray]:
    """The check's calls on `session` (see the module docstring); the logits rows of every valid node of every call.
    The calls depend only on `seed`, never on the logits, so two sessions see exactly the same sequence."""
    rng = np.random.default_rng(seed)
    prompts = [rng.integers(0, vocab, n).tolist() for n in prompt_lengths]
    with torch.inference_mode():
        rows = _valid_rows(session.prefill(prompts), [len(p) for p in prompts])
        last = [p[-1] for p in prompts]
        for step in range(steps):
            trees = [random_tree(rng, last[b], tree_size, vocab) for b in range(len(prompts))]
            if step == steps - 1 and len(trees) > 1:
                trees[-1] = None  # an idle sequence: nothing of it may be written or read
            rows += _valid_rows(session.extend(trees), [len(t) if t is not None else 0 for t in trees])
            keep = []
            for b, t in enumerate(trees):
                if t is None:
                    keep.append([])
                    continue
                path = t.path_nodes(int(rng.integers(0, len(t))))
                keep.append(path)
                last[b] = t.tokens[path[-1]]
            session.commit(keep)
    return rows


def worst_relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    """Largest |got - want| over every row block, relative to that block's largest logit (at least 1)."""
    if len(got) != len(want) or any(g.shape != w.shape for g, w in zip(got, want)):
        return float("inf")
    return max(float(np.abs(g - w).max()) / max(1.0, float(np.abs(w).max())) for g, w in zip(got, want))


def compare_sessions(session, reference, vocab: int, **options) -> float:
    """Drive both sessions identically (see `drive`); the worst relative logits error."""
    return worst_relative_error(drive(session, vocab, **options), drive(reference, vocab, **options))


def reference_run(spec: CompiledSpecDec) -> list[np.ndarray]:
    """`drive` on the compiled @verify in torch (KVSession over CompiledBackend): what the artifact must reproduce.
    Recorded before export, so the torch weights can be freed before the artifact is loaded for the check."""
    return drive(KVSession(spec.backend("verify"), 2, _CAPACITY), int(spec.config["vocab_size"]))


def step_tolerance(dtype: str) -> float:
    """How far (relative to the largest logit) the lowered step may differ from the compiled @verify in `dtype`:
    1e-4 in float32; in half precision both sides round every op to 11 (bfloat16: 8) significant bits, in a different
    order (fused attention, packed QKV), so the bound is 8 units in the last place of the largest logit (float16:
    7.8e-3, a lowering bug or a drifting cache is off by orders of magnitude more)."""
    return max(1e-4, 8 * float(torch.finfo(getattr(torch, dtype)).eps))


def check_step_artifact(artifact_dir: str | Path, reference: list[np.ndarray], tolerance: float = 1e-4) -> float:
    """Replay `drive` on the artifact loaded with onnxruntime and compare with `reference` (`reference_run`);
    raises StepMismatchError beyond `tolerance` (`step_tolerance` of the artifact's dtype). Returns the worst
    relative error."""
    try:
        # no weight prepacking: a few steps only, and packed copies of every weight would add to the peak memory
        gen = OrtGenerator.load(artifact_dir, threads=1, verify=False,
                                session_config={"session.disable_prepacking": "1"})
        worst = worst_relative_error(drive(gen.new_session(2, _CAPACITY), gen.vocab_size), reference)
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own types; any failure means "not this form"
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise StepMismatchError(f"onnxruntime cannot run the lowered step: {first[:300]}") from None
    if not worst <= tolerance:
        raise StepMismatchError(f"the ONNX Runtime step differs from the compiled @verify by {worst:.2e} (relative "
                                f"to the largest logit; tolerance {tolerance:.0e})")
    return worst
