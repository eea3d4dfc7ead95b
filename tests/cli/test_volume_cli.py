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
    (["--latents", LAT, "-o", "x.glb", "--passes", "octree"], "unknown pass 'octree'"),
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


def test_encode_shape_in_bfloat16_writes_float32_latents_that_decode(app, tmp_path):
    """--dtype bfloat16 runs the frozen decoder in bfloat16; the latents are fitted (master copy) and written in
    float32, and decode-shape turns them into a mesh."""
    import trimesh
    from safetensors import safe_open

    trimesh.creation.icosphere(subdivisions=2, radius=0.6).export(str(tmp_path / "ball.ply"))
    latents = tmp_path / "ball.safetensors"
    r = runner.invoke(app, ["encode-shape", "builtin:vecset-tiny", str(tmp_path / "ball.ply"), "-o", str(latents),
                            "--steps", "5", "--dtype", "bfloat16", "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["dtype"] == "bfloat16" and rep["device"] == "cpu" and rep["steps"] == 5 and 0.0 <= rep["iou"] <= 1.0
    with safe_open(str(latents), "pt") as f:
        assert f.metadata()["decoder_dtype"] == "bfloat16"
        z = f.get_tensor("latents")
    assert z.dtype == torch.float32 and z.shape == (1, 128, 16) and bool(torch.isfinite(z).all())
    r = runner.invoke(app, ["decode-shape", "builtin:vecset-tiny", "--latents", str(latents), "-r", "16",
                            "-o", str(tmp_path / "ball.glb"), "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["mesh"]["faces"] > 0 and (tmp_path / "ball.glb").is_file()


def test_decode_shape_dump_ir_shows_each_pass(app, tmp_path):
    dump = tmp_path / "ir"
    r = runner.invoke(app, ["decode-shape", "builtin:vecset-tiny", "--latents", LAT, "-r", "24",
                            "--passes", "query-independence,hoist-invariants,sparse-volume{min_res=12},adaptive-kv",
                            "--dump-ir", str(dump), "-o", str(tmp_path / "m.ply"), "--json"])
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout)
    assert rep["passes"] == "query-independence,hoist-invariants,sparse-volume{min_res=12},adaptive-kv"
    assert rep["adaptive_kv"] is not None and "compile" in rep["seconds"]
    names = sorted(p.name for p in dump.iterdir())
    assert names == ["00-query-independence.after.ir", "00-query-independence.before.ir",
                     "01-hoist-invariants.after.ir", "01-hoist-invariants.before.ir", "02-sparse-volume.after.ir",
                     "02-sparse-volume.before.ir", "03-adaptive-kv.after.ir", "03-adaptive-kv.before.ir",
                     "passes.json"]
    assert "func @forward(" in (dump / "01-hoist-invariants.before.ir").read_text()
    after = (dump / "01-hoist-invariants.after.ir").read_text()
    assert "func @prepare(" in after and "func @evaluate(" in after and "func @forward(" not in after
    assert '"sparse": {"band": "auto"' in (dump / "02-sparse-volume.after.ir").read_text()
    assert "func @evaluate_gathered(" in (dump / "03-adaptive-kv.after.ir").read_text()


def test_decode_shape_runs_a_compiled_onnx_artifact(app, tmp_path):
    """`elision compile MODEL --passes ... --emit onnx` writes the artifact; decode-shape runs it with onnxruntime
    and the plan it carries, and decodes what the torch backend decodes."""
    from elision.cli.main import app as elision_app
    art = tmp_path / "art"
    r = runner.invoke(elision_app, ["compile", "builtin:vecset-tiny", "--passes",
                                    "hoist-invariants,sparse-volume{min_res=12}", "--emit", "onnx", "-o", str(art)])
    assert r.exit_code == 0, r.output
    r = runner.invoke(app, ["decode-shape", str(art), "--backend", "onnxruntime", "--latents", LAT, "-r", "24",
                            "-o", str(tmp_path / "a.ply"), "--json"])
    assert r.exit_code == 0, r.output
    ort = json.loads(r.stdout)
    r = runner.invoke(app, ["decode-shape", "builtin:vecset-tiny", "--latents", LAT, "-r", "24", "--passes",
                            "hoist-invariants,sparse-volume{min_res=12}", "-o", str(tmp_path / "t.ply"), "--json"])
    ref = json.loads(r.stdout)
    assert ort["passes"] == ref["passes"] == "hoist-invariants,sparse-volume{min_res=12}"
    assert ort["queries_per_level"] == ref["queries_per_level"]
    assert abs(ort["mesh"]["faces"] - ref["mesh"]["faces"]) <= 8
    # an artifact's passes are fixed: asking for others is a clear error, as is a torch backend or --dump-ir
    for argv, needle in ((["--backend", "ort", "--passes", "hoist-invariants"], "cannot change its passes"),
                         (["--backend", "torch"], "runs with --backend onnxruntime"),
                         (["--backend", "onnxruntime", "--dump-ir", str(tmp_path)], "compiled already")):
        r = runner.invoke(app, ["decode-shape", str(art), "--latents", LAT, "-r", "24", "-o",
                                str(tmp_path / "x.ply"), *argv])
        assert r.exit_code == 2 and needle in r.output and "Traceback" not in r.output, r.output


def test_decode_shape_refuses_a_directory_that_is_not_a_field_artifact(app, tmp_path):
    (tmp_path / "manifest.json").write_text("{}")
    r = runner.invoke(app, ["decode-shape", str(tmp_path), "--backend", "ort", "--latents", LAT,
                            "-o", str(tmp_path / "x.glb")])
    assert r.exit_code == 2 and "Traceback" not in r.output and str(tmp_path.name) in r.output
