"""VecSet model: Hunyuan3D-2 parameter names/shapes at full size (meta device), checkpoints, builtins, locality fit.
(The compiled split of the decoder: tests/apps/volume/test_compiled_field.py.)"""
from __future__ import annotations

import math

import numpy as np

import pytest
import torch

from elision.models.vecset import (HUNYUAN3D_2_TURBO_VAE, HUNYUAN3D_2_VAE, TINY_VAE, VecSetConfig, build_field,
                                   load_checkpoint, load_latents, save_checkpoint, save_latents)


def _hunyuan_expected_shapes(layers: int = 16, w: int = 1024, heads: int = 16) -> dict[str, tuple]:
    """Key -> shape of the hunyuan3d-vae-v2-0 decoder state dict (qkv_bias=False, qk_norm=True)."""
    d = w // heads
    exp = {"post_kl.weight": (w, 64), "post_kl.bias": (w,)}
    for i in range(layers):
        p = f"transformer.resblocks.{i}."
        exp |= {p + "attn.c_qkv.weight": (3 * w, w), p + "attn.c_proj.weight": (w, w), p + "attn.c_proj.bias": (w,),
                p + "attn.attention.q_norm.weight": (d,), p + "attn.attention.q_norm.bias": (d,),
                p + "attn.attention.k_norm.weight": (d,), p + "attn.attention.k_norm.bias": (d,),
                p + "ln_1.weight": (w,), p + "ln_1.bias": (w,), p + "ln_2.weight": (w,), p + "ln_2.bias": (w,),
                p + "mlp.c_fc.weight": (4 * w, w), p + "mlp.c_fc.bias": (4 * w,),
                p + "mlp.c_proj.weight": (w, 4 * w), p + "mlp.c_proj.bias": (w,)}
    g = "geo_decoder."
    c = g + "cross_attn_decoder."
    exp |= {g + "query_proj.weight": (w, 51), g + "query_proj.bias": (w,),
            c + "attn.c_q.weight": (w, w), c + "attn.c_kv.weight": (2 * w, w), c + "attn.c_proj.weight": (w, w),
            c + "attn.c_proj.bias": (w,), c + "attn.attention.q_norm.weight": (d,),
            c + "attn.attention.q_norm.bias": (d,), c + "attn.attention.k_norm.weight": (d,),
            c + "attn.attention.k_norm.bias": (d,)}
    for ln in ("ln_1", "ln_2", "ln_3"):
        exp |= {c + f"{ln}.weight": (w,), c + f"{ln}.bias": (w,)}
    exp |= {c + "mlp.c_fc.weight": (4 * w, w), c + "mlp.c_fc.bias": (4 * w,), c + "mlp.c_proj.weight": (w, 4 * w),
            c + "mlp.c_proj.bias": (w,), g + "ln_post.weight": (w,), g + "ln_post.bias": (w,),
            g + "output_proj.weight": (1, w), g + "output_proj.bias": (1,)}
    return exp


def test_hunyuan_full_size_names_and_shapes_on_meta_device():
    model = build_field(HUNYUAN3D_2_VAE, device="meta")
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert got == _hunyuan_expected_shapes()
    assert all(v.is_meta for v in model.state_dict().values())
    # Fourier frequencies are a non-persistent buffer (not in Hunyuan checkpoints), 8 freqs, no pi
    assert "fourier_embedder.frequencies" not in got
    assert model.fourier_embedder.out_dim == 51


def test_hunyuan_state_dict_loads_strictly_by_name():
    """A user's Hunyuan checkpoint is a name->tensor map; strict loading into our module must accept it."""
    meta_model = build_field(HUNYUAN3D_2_VAE, device="meta")
    meta_model.load_state_dict({k: torch.empty(s, device="meta") for k, s in _hunyuan_expected_shapes().items()},
                               strict=True, assign=True)


def test_turbo_decoder_layout():
    model = build_field(HUNYUAN3D_2_TURBO_VAE, device="meta")
    sd = model.state_dict()
    assert tuple(sd["geo_decoder.latents_proj.weight"].shape) == (512, 1024)
    assert tuple(sd["geo_decoder.cross_attn_decoder.mlp.c_fc.weight"].shape) == (512, 512)
    assert "geo_decoder.ln_post.weight" not in sd
    assert "geo_decoder.cross_attn_decoder.attn.attention.q_norm.weight" not in sd  # turbo drops qk_norm


def test_per_query_macs_of_hunyuan_decoder():
    """Cost per query is a property of the architecture: ~16.8M MAC (research note §1.4)."""
    c = HUNYUAN3D_2_VAE
    w, m = c.width, c.num_latents
    macs = 51 * w + 2 * w * w + 2 * m * w + 2 * w * 4 * w + w
    assert 16.5e6 < macs < 17.0e6


def test_config_errors_are_clear():
    with pytest.raises(ValueError, match="divisible by heads"):
        VecSetConfig(num_latents=8, embed_dim=4, width=30, heads=4, num_decoder_layers=1)
    with pytest.raises(ValueError, match="num_latents must be positive"):
        VecSetConfig(num_latents=0, embed_dim=4, width=32, heads=4, num_decoder_layers=1)


def test_checkpoint_and_latents_roundtrip(tmp_path):
    model = build_field(TINY_VAE)
    model.lipschitz = 12.5
    save_checkpoint(model, tmp_path / "m.safetensors", half=False)
    back = load_checkpoint(tmp_path / "m.safetensors")
    for k, v in model.state_dict().items():
        assert torch.equal(v, back.state_dict()[k])
    lat = torch.randn(1, 128, 16)
    save_latents(lat, tmp_path / "z.safetensors")
    assert torch.equal(load_latents(tmp_path / "z.safetensors"), lat)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_latents(tmp_path / "missing.safetensors")
    from safetensors.torch import save_file
    save_file({"z": lat}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ValueError, match="no tensor named 'latents'"):
        load_latents(tmp_path / "bad.safetensors")


def test_builtin_registry_entries():
    from elision.models.registry import get_builtin
    entry = get_builtin("vecset-hunyuan-random")
    assert entry.kind == "shape-decoder"
    tiny = get_builtin("vecset-tiny")
    model = tiny.build()
    pts, lat = tiny.example_inputs(model)
    assert model(pts, lat).shape == (1, pts.shape[1])
    assert model.lipschitz is not None and math.isfinite(model.lipschitz)
    local = get_builtin("vecset-local")
    model = local.build()
    assert model.config.num_latents == 1024 and not model.config.qk_norm
    pts, lat = local.example_inputs(model)
    assert model(pts, lat).shape == (1, pts.shape[1])


def test_locality_term_concentrates_the_attention_of_a_neighbourhood():
    """The fit's locality term is the entropy of a neighbourhood's mean attention: low when a few latents
    serve the whole neighbourhood; a short fit with it lowers it far below a fit without it."""
    from dataclasses import replace

    from elision.models.vecset import LOCAL_VAE, build_field
    from elision.apps.volume.encode import attention_locality_loss, fit
    from elision.apps.volume.shapes import PROCEDURAL
    src = PROCEDURAL["thin_plate"]()
    surface = torch.from_numpy(src.surface_samples(5000, np.random.default_rng(0)))
    cfg = replace(LOCAL_VAE, num_latents=256)
    entropies = {}
    for weight in (0.0, 0.2):
        model = build_field(cfg, seed=0)
        res = fit(model, [src], steps=150, points_per_shape=256, train_weights=True, pool_size=20_000,
                  eval_points=2000, locality=weight)
        with torch.no_grad():
            entropies[weight] = float(attention_locality_loss(model, res.latents[0], surface,
                                                              torch.Generator().manual_seed(1)))
    assert 0 <= entropies[0.2] < 0.5 * entropies[0.0] <= math.log(256), entropies
