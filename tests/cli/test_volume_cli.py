"""decode-shape / encode-shape commands and ONNX-artifact decoding with onnxruntime."""
from __future__ import annotations

import json

import pytest
import torch
import typer
from typer.testing import CliRunner

from elision.models.vecset import FIXTURE_DIR
from elision.cli.shape import register

runner = CliRunner()


@pytest.fixture(scope="module")
def app():
    a = typer.Typer()
    register(a)
    return a


LAT = str(FIXTURE_DIR / "thin_rods.latents.safetensors")


def test_decode_shape_json_reports_counts_phases_and_mesh(app, tmp_path):
    out = tmp_path / "m.glb"
    r = runner.invoke(app, ["decode-shape", "builtin:vecset-tiny", "--latents", LAT, "--resolution", "48",
                            "--passes", "hoist-invariants,sparse-volume{min_res=24}", "-o", str(out), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert 0 < rep["queries"] < rep["dense_queries"] == 49 ** 3
    assert rep["mesh"]["faces"] > 100
    assert {"prepare", "decode", "marching_cubes"} <= set(rep["seconds"])
    assert out.stat().st_size > 1000 and (tmp_path / "m.png").stat().st_size > 1000


def test_decode_shape_dense_with_empty_passes(app, tmp_path):
    r = runner.invoke(app, ["decode-shape", "builtin:vecset-tiny", "--latents", LAT, "-r", "24", "--passes", "",
                            "-o", str(tmp_path / "d.ply"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["queries"] == 25 ** 3 and rep["passes"] == "dense"


@pytest.mark.parametrize("argv,needle", [
    (["--latents", "nope.safetensors", "-o", "x.glb"], "does not exist"),
    (["--latents", LAT, "-o", "x.glb", "--passes", "sparse-volume{band=-2}"], "band must be a finite number"),
    (["--latents", LAT, "-o", "x.glb", "-r", "5000"], "use --resolution"),
    (["--latents", LAT, "-o", "x.xyz"], "unsupported mesh format"),
    (["--latents", LAT, "-o", "x.glb", "--backend", "tpu"], "--backend must be"),
])
def test_decode_shape_bad_input_is_one_line_error(app, tmp_path, argv, needle):
    r = runner.invoke(app, ["decode-shape", "builtin:vecset-tiny", *argv])
    assert r.exit_code == 2
    assert needle in r.output and "Traceback" not in r.output


def test_decode_shape_unknown_model(app, tmp_path):
    r = runner.invoke(app, ["decode-shape", "builtin:nope", "--latents", LAT, "-o", str(tmp_path / "x.glb")])
    assert r.exit_code == 2 and "unknown builtin model" in r.output


def test_encode_shape_fits_latents_for_a_mesh(app, tmp_path):
    import trimesh
    trimesh.creation.icosphere(subdivisions=2, radius=0.6).export(str(tmp_path / "ball.ply"))
    out = tmp_path / "ball.safetensors"
    r = runner.invoke(app, ["encode-shape", "builtin:vecset-tiny", str(tmp_path / "ball.ply"), "-o", str(out),
                            "--steps", "5", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert out.is_file() and 0.0 <= rep["iou"] <= 1.0
    # an open mesh has no inside: clear error
    import numpy as np
    open_mesh = trimesh.creation.icosphere(subdivisions=1)
    open_mesh.update_faces(np.arange(len(open_mesh.faces)) >= 4)  # punch a hole
    open_mesh.export(str(tmp_path / "open.ply"))
    r = runner.invoke(app, ["encode-shape", "builtin:vecset-tiny", str(tmp_path / "open.ply"), "-o", str(out)])
    assert r.exit_code == 2 and "not watertight" in r.output


def test_onnx_artifact_drives_hierarchical_decoding_with_onnxruntime(tmp_path):
    from elision.models.registry import get_builtin
    from elision.models.vecset import fixture_latents
    from elision.apps.volume import decode_volume
    from elision.apps.volume.onnx_field import OrtFieldDecoder, export_field_onnx
    import onnx
    model = get_builtin("vecset-tiny").build()
    export_field_onnx(model, tmp_path)
    assert onnx.load(str(tmp_path / "field_chunk.onnx")).opset_import[0].version == 18
    ort_dec = OrtFieldDecoder(tmp_path)
    lat = fixture_latents("thin_rods")
    pts = torch.rand(1000, 3) * 2 - 1
    with torch.no_grad():
        ref = model(pts[None], lat)[0]
    torch.testing.assert_close(ort_dec.evaluate(ort_dec.prepare(lat), pts), ref, atol=1e-4, rtol=1e-4)
    plan = "hoist-invariants,sparse-volume{min_res=24},adaptive-kv{topk=128}"
    a = decode_volume(ort_dec, lat, 48, plan)
    b = decode_volume(model, lat, 48, plan)
    assert a.queries == b.queries
    assert int(((a.grid > 0) != (b.grid > 0)).sum()) <= 2  # fp32 ORT vs torch near the iso level only

    # the gathered-token session: tiles of queries, each attending only to its own tokens per head
    from elision.apps.volume.field import TorchFieldDecoder
    tdec = TorchFieldDecoder(model)
    heads = tdec.kv(tdec.prepare(lat))[0].shape[0]
    for tiles, tile, k in ((1, 1, 1), (7, 33, 16), (3, 64, 100)):
        tp = torch.rand(tiles, tile, 3) * 2 - 1
        tokens = torch.randint(0, 128, (heads, tiles, k))
        torch.testing.assert_close(ort_dec.evaluate_gathered(ort_dec.prepare(lat), tp, tokens),
                                   tdec.evaluate_gathered(tdec.prepare(lat), tp, tokens), atol=1e-4, rtol=1e-4)
    # and adaptive KV that really selects (top-16 of 128, a loose guard) decodes alike on both backends
    plan = "hoist-invariants,sparse-volume{min_res=24},adaptive-kv{topk=16,block=8,min_mass=0.3}"
    a, b = decode_volume(ort_dec, lat, 48, plan), decode_volume(model, lat, 48, plan)
    assert a.kv_stats["blocks_per_k"] and a.kv_stats["blocks_per_k"] == b.kv_stats["blocks_per_k"]
    assert int(((a.grid > 0) != (b.grid > 0)).sum()) <= 2


def test_onnx_field_artifact_missing_a_session_is_a_clear_error(tmp_path):
    from elision.apps.volume.onnx_field import OrtFieldDecoder
    (tmp_path / "field.json").write_text('{"config": {}, "files": []}')
    (tmp_path / "latents_side.onnx").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match="lacks field_chunk.onnx.*export it again"):
        OrtFieldDecoder(tmp_path)
