"""`--passes` pipelines for volume decoding and the decoders they select.

Grammar: comma-separated pass names with optional `{knob=value,...}`:
  query-independence          prove per-query independence before any subset evaluation (refuses if not)
  hoist-invariants            compute latent-side work once per shape instead of once per chunk
  sparse-volume{min_res=16,levels=,band=auto,dilation=0,iso=0}
  adaptive-kv{topk=32,block=16,samples=8,min_mass=0.99,tiers=3,tile=128}
"" is dense decoding exactly as published (chunked, latent K/V recomputed per chunk).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F

from elision.models.vecset import VecSetField
from elision.apps.volume.adaptive_kv import AdaptiveKVOptions
from elision.apps.volume.decode import SparseVolumeOptions, VolumeError

DEFAULT_PIPELINE = "query-independence,hoist-invariants,sparse-volume"
KNOWN = {"query-independence": None, "hoist-invariants": None, "sparse-volume": SparseVolumeOptions,
         "adaptive-kv": AdaptiveKVOptions}


@dataclass(frozen=True)
class VolumePlan:
    check_independence: bool = False
    hoist: bool = False
    sparse: SparseVolumeOptions | None = None
    kv: AdaptiveKVOptions | None = None

    def describe(self) -> str:
        parts = []
        if self.check_independence:
            parts.append("query-independence")
        if self.hoist:
            parts.append("hoist-invariants")
        if self.sparse:
            parts.append(f"sparse-volume{self.sparse}")
        if self.kv:
            parts.append(f"adaptive-kv{self.kv}")
        return ",".join(parts) or "dense"


def _value(text: str) -> Any:
    t = text.strip()
    if t.lower() in ("none", ""):
        return None
    for conv in (int, float):
        try:
            return conv(t)
        except ValueError:
            pass
    return t


def parse_volume_pipeline(text: str) -> VolumePlan:
    items = re.findall(r"\s*([A-Za-z0-9_\-]+)\s*(?:\{([^}]*)\})?\s*(?:,|$)", text.strip())
    rebuilt = ",".join(n + ("{" + k + "}" if k else "") for n, k in items)
    if text.strip() and rebuilt.replace(" ", "") != text.strip().replace(" ", ""):
        raise VolumeError(f"cannot parse pipeline {text!r}; expected e.g. '{DEFAULT_PIPELINE}' or "
                          "'sparse-volume{min_res=16,band=auto},adaptive-kv{topk=64}'")
    opts: dict[str, Any] = {}
    for name, knobs in items:
        if name not in KNOWN:
            raise VolumeError(f"unknown volume pass {name!r}; known: {', '.join(KNOWN)}")
        cls = KNOWN[name]
        kw: dict[str, Any] = {}
        if knobs.strip():
            for pair in re.split(r"[,;]", knobs):  # ';' as in the pass-pipeline strings of `elision compile`
                if "=" not in pair:
                    raise VolumeError(f"{name}: knob {pair.strip()!r} needs a value (knob=value)")
                k, v = (p.strip() for p in pair.split("=", 1))
                valid = [f.name for f in fields(cls)] if cls else []
                if k not in valid:
                    raise VolumeError(f"{name} has no knob {k!r}; valid knobs: {', '.join(valid) or '(none)'}")
                kw[k] = _value(v)
        try:
            opts[name] = cls(**kw) if cls else True
        except TypeError:  # a knob given a word where a number belongs
            raise VolumeError(f"{name}{{{knobs}}}: every knob takes a number (band also takes 'auto')") from None
        except ValueError as e:
            raise VolumeError(str(e)) from None
    if "adaptive-kv" in opts and "hoist-invariants" not in opts:
        # adaptive KV reads the hoisted K/V; it implies the hoist.
        opts["hoist-invariants"] = True
    return VolumePlan(check_independence="query-independence" in opts, hoist="hoist-invariants" in opts,
                      sparse=opts.get("sparse-volume"), kv=opts.get("adaptive-kv"))


class PublishedFieldDecoder:
    """Hunyuan's VanillaVolumeDecoder behaviour: the latent transformer runs once (vae.forward), but the
    geometry decoder recomputes `c_kv(ln_2(latents))` on every chunk call."""

    def __init__(self, model: VecSetField) -> None:
        self.model = model.eval()
        param = next(model.parameters())
        self.device, self.dtype = param.device, param.dtype  # runs where the model lives (CPU or CUDA)

    @torch.inference_mode()
    def prepare(self, latents: torch.Tensor) -> torch.Tensor:
        latents = latents.to(self.device, self.dtype).reshape(1, *latents.shape[-2:])
        return self.model.transformer(self.model.post_kl(latents))

    @torch.inference_mode()
    def evaluate(self, z: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
        return self.model.geo_decoder(points.to(self.device, self.dtype).unsqueeze(0), z)[0, :, 0]


__all__ = ["VolumePlan", "parse_volume_pipeline", "PublishedFieldDecoder", "DEFAULT_PIPELINE", "F"]
