"""`elision run DIR`: runs an ONNX artifact from the command line; bad input is a one-line error."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import typer
from typer.testing import CliRunner

from elision.lowering.onnx_export import export_onnx, source_hash_of
from elision.cli.run import register


class TwoLayer(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.a, self.b = torch.nn.Linear(8, 16), torch.nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.nn.functional.gelu(self.a(x)))


@pytest.fixture(scope="module")
def mlp_artifact(tmp_path_factory) -> tuple[Path, TwoLayer]:
    model = TwoLayer().eval()
    out = tmp_path_factory.mktemp("mlp")
    export_onnx({"forward": (model, (torch.randn(3, 8),), {0: {0: "batch"}})}, out, pipeline="", source_hash=source_hash_of(model),
                runtime_settings={"kind": "generic"}, output_names={"forward": ["y"]})
    return out, model


@pytest.fixture()
def cli() -> typer.Typer:
    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keeps `run` a subcommand, as in the real elision app
        pass

    register(app)
    return app


def test_run_prints_outputs_and_json_matches_eager(cli, mlp_artifact, tmp_path):
    art, model = mlp_artifact
    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    np.save(tmp_path / "x.npy", x)
    result = CliRunner().invoke(cli, ["run", str(art), "--input", f"x={tmp_path / 'x.npy'}"])
    assert result.exit_code == 0, result.output
    assert "forward" in result.output and "[5, 4]" in result.output
    result = CliRunner().invoke(cli, ["run", str(art), "-i", f"x={tmp_path / 'x.npy'}", "--json", "--save", str(tmp_path / "o")])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    with torch.no_grad():
        want = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.array(payload["outputs"]["y"]["values"], np.float32), want, atol=1e-5, rtol=0)
    np.testing.assert_allclose(np.load(tmp_path / "o" / "y.npy"), want, atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--input", "x"], "--input expects NAME=FILE.npy"),
        (["--input", "x=/nonexistent.npy"], "input file /nonexistent.npy for 'x' does not exist"),
        ([], "no inputs: pass --input NAME=FILE.npy"),
        (["--prompt", "hello"], "--prompt needs a generation loop for artifacts of kind 'generic'"),
        (["--function", "decode", "--input", "x=X"], "artifact has no function 'decode'"),
    ],
)
def test_bad_input_is_a_one_line_error(cli, mlp_artifact, tmp_path, args, message):
    art, _ = mlp_artifact
    args = [a.replace("X", str(tmp_path / "x.npy")) for a in args]
    np.save(tmp_path / "x.npy", np.zeros((2, 8), np.float32))
    result = CliRunner().invoke(cli, ["run", str(art), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()), result.output
    assert "Traceback" not in result.output


def test_wrong_dtype_and_missing_artifact(cli, mlp_artifact, tmp_path):
    art, _ = mlp_artifact
    np.save(tmp_path / "x.npy", np.zeros((2, 8), np.float64))
    result = CliRunner().invoke(cli, ["run", str(art), "--input", f"x={tmp_path / 'x.npy'}"])
    assert result.exit_code == 2 and "has dtype float64, expected float32" in " ".join(result.output.split())
    result = CliRunner().invoke(cli, ["run", str(tmp_path / "missing"), "--input", f"x={tmp_path / 'x.npy'}"])
    assert result.exit_code == 2 and "does not exist" in result.output
