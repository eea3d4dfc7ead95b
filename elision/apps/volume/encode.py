"""Bring a shape into a VecSet model: auto-decoding (fit latents, optionally weights, to labelled points).

The tiny builtin model has no trained point-cloud encoder, so `encode-shape` fits the latents of a frozen
decoder to the shape's truncated SDF by gradient descent (DeepSDF-style auto-decoding). The fixture tool
uses the same routine with `train_weights=True` over several shapes at once (shared decoder,
per-shape latents).

The decoder runs where and in the dtype its parameters are (`Placement.place_model`); the latents being fitted,
the points and the loss stay float32 on that device (a master copy): an optimizer step on bfloat16 or float16
latents would round the small late updates of the learning-rate schedule away and stall the fit.
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from elision.models.vecset import VecSetField
from elision.apps.volume.shapes import ShapeSource, training_points


@dataclass
class FitResult:
    latents: list[torch.Tensor]                 # per shape [1, M, E]
    iou: dict[str, float]                       # volume IoU on held-out uniform points
    loss: float
    steps: int
    seconds: float
    history: list[tuple[int, float]] = field(default_factory=list)


def _pool(src: ShapeSource, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    pts, tgt = training_points(src, n, np.random.default_rng(seed))
    return torch.from_numpy(pts), torch.from_numpy(tgt)


def _where(model: VecSetField) -> tuple[torch.device, torch.dtype]:
    """The device and dtype the decoder runs in: those of its parameters."""
    p = next(model.parameters())
    return p.device, p.dtype


def _field(model: VecSetField, points: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
    """The field at `points` [1, N, 3] for `latents` [1, M, E], computed in the decoder's dtype, returned float32
    (gradients reach float32 latents through the cast)."""
    _, dtype = _where(model)
    return model(points.to(dtype), latents.to(dtype)).float()


def volume_iou(model: VecSetField, latents: torch.Tensor, points: torch.Tensor, target: torch.Tensor) -> float:
    device, _ = _where(model)
    points, latents, target = points.to(device), latents.to(device), target.to(device)
    with torch.no_grad():
        pred = torch.cat([_field(model, points[None, s:s + 32768], latents)[0] for s in range(0, len(points), 32768)])
    a, b = pred > 0, target > 0
    return float((a & b).sum()) / max(float((a | b).sum()), 1.0)


def attention_locality_loss(model: VecSetField, latents: torch.Tensor, surface: torch.Tensor,
                            gen: torch.Generator, clusters: int = 32, per_cluster: int = 16,
                            radius: float = 0.03) -> torch.Tensor:
    """Mean entropy (nats) of the cluster-averaged cross-attention distribution of small clusters of query
    points near the surface (cube half-edge `radius`, about one 8^3 block at 256^3).

    Low when every small neighbourhood of queries attends to a few shared latent tokens: the locality that
    trained VecSet decoders show (3DShape2VecSet; FlashVDM's adaptive KV relies on it) and that a per-shape
    fit with free latents does not acquire by itself.
    """
    device, dtype = _where(model)
    # drawn from the CPU generator `gen` (the same draws on every device), then moved to the decoder's device
    centers = surface[torch.randint(0, len(surface), (clusters,), generator=gen).to(surface.device)].to(device)
    offsets = ((torch.rand(clusters, per_cluster, 3, generator=gen) * 2 - 1) * radius).to(device)
    geo = model.geo_decoder
    k, _ = geo.latent_kv(model.transformer(model.post_kl(latents.to(device, dtype))))
    _, q = geo.query_heads((centers[:, None] + offsets).reshape(1, -1, 3).to(device, dtype))
    probs = torch.softmax((q @ k.transpose(-1, -2)).float() * q.shape[-1] ** -0.5, dim=-1)  # [1, h, N, M]
    mean = probs[0].view(probs.shape[1], clusters, per_cluster, -1).mean(2)
    return -(mean * (mean + 1e-9).log()).sum(-1).mean()


def fit(model: VecSetField, sources: list[ShapeSource], *, steps: int = 2000, points_per_shape: int = 2048,
        train_weights: bool = False, lr: float = 1e-3, latent_lr: float = 1e-2, pool_size: int = 150_000,
        eval_points: int = 50_000, seed: int = 0, init_latents: list[torch.Tensor] | None = None,
        progress: Callable[[int, float], None] | None = None, time_limit_s: float | None = None,
        locality: float = 0.0) -> FitResult:
    """Minimise L1(field, tSDF target) over latents (and weights if `train_weights`), plus `locality` times
    `attention_locality_loss` when > 0 (the reported loss is the L1 part).

    The decoder runs on its parameters' device and dtype; the latents are fitted in float32 there and returned as
    float32 CPU tensors. Training the weights needs float32 ones (their optimizer steps have no master copy)."""
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    device, dtype = _where(model)
    if train_weights and dtype != torch.float32:
        raise ValueError(f"training the decoder's weights needs them in float32, got {dtype}")
    torch.manual_seed(seed)
    c = model.config
    pools = [tuple(t.to(device) for t in _pool(s, pool_size, seed + i)) for i, s in enumerate(sources)]
    surfaces = [torch.from_numpy(s.surface_samples(50_000, np.random.default_rng(20_000 + seed + i))).to(device)
                for i, s in enumerate(sources)] if locality > 0 else []
    cluster_gen = torch.Generator().manual_seed(seed)
    evals = []
    for i, s in enumerate(sources):
        g = np.random.default_rng(10_000 + seed + i)
        pts = g.uniform(-1, 1, (eval_points, 3)).astype(np.float32)
        evals.append((torch.from_numpy(pts), torch.from_numpy(s.target(pts))))
    lat = [torch.nn.Parameter((init_latents[i].clone().reshape(1, c.num_latents, c.embed_dim)
                               if init_latents else torch.randn(1, c.num_latents, c.embed_dim) * 0.5)
                              .to(device, torch.float32))
           for i in range(len(sources))]
    groups = [{"params": lat, "lr": latent_lr}]
    model.train(train_weights)
    for p in model.parameters():
        p.requires_grad_(train_weights)
    if train_weights:
        groups.append({"params": list(model.parameters()), "lr": lr})
    opt = torch.optim.Adam(groups)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=[g["lr"] for g in groups], total_steps=steps,
                                                pct_start=0.05)
    t0 = time.perf_counter()
    history: list[tuple[int, float]] = []
    loss_val = math.nan
    step = 0
    for step in range(1, steps + 1):
        opt.zero_grad(set_to_none=True)
        total = 0.0
        for i, ((pts, tgt), z) in enumerate(zip(pools, lat)):
            idx = torch.randint(0, len(pts), (points_per_shape,)).to(device)
            pred = _field(model, pts[idx][None], z)[0]
            loss = (pred - tgt[idx]).abs().mean()
            total += float(loss.detach())
            if locality > 0:
                loss = loss + locality * attention_locality_loss(model, z, surfaces[i], cluster_gen)
            loss.backward()
        opt.step()
        sched.step()
        loss_val = total / len(sources)
        if step % 50 == 0 or step == steps:
            history.append((step, loss_val))
            if progress is not None:
                progress(step, loss_val)
        if time_limit_s is not None and time.perf_counter() - t0 > time_limit_s:
            break
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    latents = [z.detach().cpu().clone() for z in lat]
    iou = {s.name: volume_iou(model, z, *e) for s, z, e in zip(sources, latents, evals)}
    return FitResult(latents=latents, iou=iou, loss=loss_val, steps=step, seconds=time.perf_counter() - t0,
                     history=history)


def lipschitz_estimate(model: VecSetField, latents: list[torch.Tensor], sources: list[ShapeSource],
                       n: int = 20_000, quantile: float = 0.999) -> float:
    """High quantile of |grad field| at near-surface points: the band calibration constant."""
    vals = []
    for z, s in zip(latents, sources):
        g = np.random.default_rng(123)
        surf = s.surface_samples(n, g)
        pts = torch.from_numpy(np.clip(surf + g.normal(size=surf.shape).astype(np.float32) * 0.03, -1, 1))
        pts.requires_grad_(True)
        out = model(pts[None], z)[0]
        (grad,) = torch.autograd.grad(out.sum(), pts)
        vals.append(grad.norm(dim=-1).detach())
    return float(torch.quantile(torch.cat(vals), quantile))
