"""Compiled field decoders: the volume passes' functions lowered to torch FX and to ONNX Runtime, against eager
PyTorch on fresh random inputs, and the ONNX artifact that carries the plan to a driver without the model."""
from __future__ import annotations

import pytest
import torch

from elision.apps.volume import (VolumeError, compile_field, compiled_field, decode_volume, load_field_artifact)
from elision.models.vecset import TINY_VAE, VecSetConfig, build_field

TURBO_LIKE = VecSetConfig(num_latents=32, embed_dim=8, width=32, heads=4, num_decoder_layers=1,
                          geo_decoder_downsample_ratio=2, geo_decoder_mlp_expand_ratio=1, geo_decoder_ln_post=False)


@pytest.mark.parametrize("cfg", [TINY_VAE, TURBO_LIKE])
@pytest.mark.parametrize("passes", ["", "hoist-invariants"])
def test_compiled_field_equals_the_eager_forward(cfg, passes):
    """prepare/evaluate of the lowered module (hoisted or not) is the model's forward, bit for bit in fp32."""
    torch.manual_seed(0)
    model = build_field(cfg)
    field = compile_field(model, passes)
    assert ("prepare" in field.ir.functions) == bool(passes)
    g = torch.Generator().manual_seed(1)
    pts = torch.rand(1, 300, 3, generator=g) * 2 - 1
    lat = torch.randn(1, cfg.num_latents, cfg.embed_dim, generator=g)
    with torch.no_grad():
        ref = model(pts, lat)[0]
    torch.testing.assert_close(field.evaluate(field.prepare(lat), pts[0]), ref, atol=0, rtol=0)
    # grid points come column-major from `nonzero`: other layouts than the traced one work too
    torch.testing.assert_close(field.evaluate(field.prepare(lat), pts[0].t().contiguous().t()), ref, atol=0, rtol=0)


@pytest.fixture(scope="module")
def tiny():
    from elision.models.registry import get_builtin
    return get_builtin("vecset-tiny").build()


KV = "hoist-invariants,sparse-volume{min_res=24},adaptive-kv{topk=16,block=8,min_mass=0.3}"


@pytest.fixture(scope="module")
def fields(tiny):
    return compile_field(tiny, KV), compile_field(tiny, KV, backend="onnxruntime")


def test_onnx_runtime_field_equals_the_torch_field(tiny, fields):
    """Every lowered function: ORT = torch (fp32, up to kernel rounding), and the field = the model's forward."""
    from elision.models.vecset import fixture_latents
    tfield, ofield = fields
    lat = fixture_latents("thin_rods")
    g = torch.Generator().manual_seed(2)
    pts = torch.rand(1000, 3, generator=g) * 2 - 1
    ts, os_ = tfield.prepare(lat), ofield.prepare(lat)
    with torch.no_grad():
        ref = tiny(pts[None], lat)[0]
    torch.testing.assert_close(ofield.evaluate(os_, pts), ref, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(ofield.query_heads(os_, pts), tfield.query_heads(ts, pts), atol=1e-5, rtol=1e-4)
    for a, b in zip(ofield.kv(os_), tfield.kv(ts)):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
    heads = tfield.kv(ts)[0].shape[0]
    for tiles, tile, k in ((1, 1, 1), (7, 33, 16), (3, 64, 100)):
        tp = torch.rand(tiles, tile, 3, generator=g) * 2 - 1
        tokens = torch.randint(0, 128, (heads, tiles, k), generator=g)
        torch.testing.assert_close(ofield.evaluate_gathered(os_, tp, tokens), tfield.evaluate_gathered(ts, tp, tokens),
                                   atol=1e-4, rtol=1e-4)


def test_hierarchical_and_adaptive_kv_decoding_agree_across_backends(tiny, fields):
    from elision.models.vecset import fixture_latents
    lat = fixture_latents("thin_rods")
    a, b = (decode_volume(f, lat, 48) for f in fields)
    assert a.queries == b.queries
    assert a.kv_stats["blocks_per_k"] and a.kv_stats["blocks_per_k"] == b.kv_stats["blocks_per_k"]
    assert int(((a.grid > 0) != (b.grid > 0)).sum()) <= 2  # fp32 ORT vs torch near the iso level only
    plan = "hoist-invariants,sparse-volume{min_res=24},adaptive-kv{topk=128}"  # every token: exact
    a, b = decode_volume(tiny, lat, 48, plan, backend="onnxruntime"), decode_volume(tiny, lat, 48, plan)
    assert a.queries == b.queries and a.kv_stats["kv_fraction"] == pytest.approx(1.0)
    assert int(((a.grid > 0) != (b.grid > 0)).sum()) <= 2


def test_an_onnx_artifact_carries_the_plan(tiny, fields, tmp_path):
    """The artifact of the compiled module (what `elision compile --emit onnx` writes) decodes with onnxruntime
    alone, with the plan its passes recorded."""
    from elision.lowering.emit import emit_onnx
    from elision.models.vecset import fixture_latents
    tfield, _ = fields
    emit_onnx(tfield.ir, None, tmp_path)
    art = load_field_artifact(tmp_path)
    assert art.sparse_options == tfield.sparse_options and art.kv_options == tfield.kv_options
    assert art.pipeline == tfield.pipeline and tfield.pipeline.endswith("adaptive-kv{topk=16;block=8;min_mass=0.3}")
    lat = fixture_latents("thin_rods")
    a, b = decode_volume(art, lat, 48), decode_volume(tfield, lat, 48)
    assert a.queries == b.queries and int(((a.grid > 0) != (b.grid > 0)).sum()) <= 2
    with pytest.raises(VolumeError, match="compiled with passes .* compile it again"):
        decode_volume(art, lat, 48, "hoist-invariants")
    with pytest.raises(ValueError, match=r"latents must have shape \[1, 128, 16\] for this model, got \[1, 64, 16\]"):
        art.prepare(torch.zeros(1, 64, 16))


def test_an_artifact_that_is_not_a_field_decoder_is_a_clear_error(tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    with pytest.raises(ValueError, match=str(tmp_path)):
        load_field_artifact(tmp_path)


def test_compilation_is_memoised_per_model_and_pipeline_until_the_weights_change():
    model = build_field(TINY_VAE)
    a = compiled_field(model, "hoist-invariants,sparse-volume")
    assert compiled_field(model, "hoist-invariants,sparse-volume{min_res=16}") is a  # the same pipeline, spelled out
    assert compiled_field(model, "hoist-invariants") is not a
    with torch.no_grad():
        model.geo_decoder.output_proj.bias.add_(1.0)
    b = compiled_field(model, "hoist-invariants,sparse-volume")
    assert b is not a
    lat, pts = torch.randn(1, 128, 16), torch.rand(50, 3) * 2 - 1
    with torch.no_grad():
        torch.testing.assert_close(b.evaluate(b.prepare(lat), pts), model(pts[None], lat)[0], atol=0, rtol=0)
