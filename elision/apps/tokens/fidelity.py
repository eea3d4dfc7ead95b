"""Fidelity harness: how close a rewritten (approximate) model stays to the original.

Approximate rewrites (token pruning/merging, layer skipping) must report what they cost. The harness
compares outputs of the rewritten model with the original's on the same calibration inputs:

  kl        mean KL(original || rewritten) of the output distributions (logits only; the primary metric)
  cosine    mean cosine similarity of the outputs (pooled embeddings, logits, last-token states)
  min_cosine  worst-case cosine over the calibration set
  top1      fraction of rows whose argmax agrees (logits only)
  accuracy  task accuracy of the rewritten model where labels exist (and `ref_accuracy` of the original)

`fidelity` is the single number search floors apply to: exp(-KL) for logits (1.0 = identical
distributions, 0.98 ~ KL 0.02 nats) and mean cosine for embeddings.
"""
from __future__ import annotations

import math
import statistics
import time
from dataclasses import asdict, dataclass
from typing import Callable

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class FidelityReport:
    kind: str
    fidelity: float
    cosine: float
    min_cosine: float
    kl: float | None = None
    top1: float | None = None
    accuracy: float | None = None
    ref_accuracy: float | None = None
    samples: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def summary(self) -> str:
        parts = [f"fidelity {self.fidelity:.4f}", f"cos {self.cosine:.4f} (min {self.min_cosine:.4f})"]
        if self.kl is not None:
            parts.append(f"KL {self.kl:.4f}")
        if self.top1 is not None:
            parts.append(f"top-1 agree {self.top1:.3f}")
        if self.accuracy is not None:
            parts.append(f"acc {self.accuracy:.4f} (orig {self.ref_accuracy:.4f})")
        return ", ".join(parts)


def compare_outputs(ref: torch.Tensor, new: torch.Tensor, kind: str = "logits",
                    labels: torch.Tensor | None = None) -> FidelityReport:
    """Compare (rows, features) outputs of the original (`ref`) and rewritten (`new`) model."""
    if kind not in ("logits", "embedding"):
        raise ValueError(f"kind={kind!r}: use 'logits' (classifier/LM outputs) or 'embedding'")
    if ref.shape != new.shape:
        raise ValueError(f"output shapes differ: original {tuple(ref.shape)} vs rewritten {tuple(new.shape)}")
    ref2 = ref.reshape(-1, ref.shape[-1]).float()
    new2 = new.reshape(-1, new.shape[-1]).float()
    cos = F.cosine_similarity(ref2, new2, dim=-1)
    kl = top1 = acc = ref_acc = None
    if kind == "logits":
        ref_lp, new_lp = F.log_softmax(ref2, -1), F.log_softmax(new2, -1)
        kl = float(F.kl_div(new_lp, ref_lp, reduction="batchmean", log_target=True).clamp(min=0))
        top1 = float((ref2.argmax(-1) == new2.argmax(-1)).float().mean())
        if labels is not None:
            acc = float((new2.argmax(-1) == labels.reshape(-1)).float().mean())
            ref_acc = float((ref2.argmax(-1) == labels.reshape(-1)).float().mean())
        fidelity = math.exp(-kl)
    else:
        fidelity = float(cos.mean())
    return FidelityReport(kind=kind, fidelity=fidelity, cosine=float(cos.mean()), min_cosine=float(cos.min()),
                          kl=kl, top1=top1, accuracy=acc, ref_accuracy=ref_acc, samples=ref2.shape[0])


def measure(run_ref: Callable[[tuple], torch.Tensor], run_new: Callable[[tuple], torch.Tensor],
            batches: list[tuple], kind: str = "logits", labels: list[torch.Tensor] | None = None,
            ref_outputs: list[torch.Tensor] | None = None) -> FidelityReport:
    """Run both models over calibration `batches` and compare all outputs at once."""
    with torch.no_grad():
        refs = ref_outputs if ref_outputs is not None else [run_ref(b) for b in batches]
        news = [run_new(b) for b in batches]
    lab = torch.cat(labels) if labels is not None else None
    return compare_outputs(torch.cat(refs), torch.cat(news), kind, lab)


def median_latency(fn: Callable[[], object], repeats: int = 7, warmup: int = 1) -> float:
    """Median wall time of fn() in seconds after `warmup` untimed calls."""
    with torch.no_grad():
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)
