"""Exporting into an existing artifact directory never destroys the artifact there: a failing export, or Ctrl-C in
the middle of one (in process and as a real SIGINT to `elision compile`), leaves it byte for byte as it was."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from bad_input_models import Eigh, TokenModel
from elision.lowering.onnx_export import OnnxExportError, export_onnx, source_hash_of
from elision.runtime.artifact import load_artifact

REPO = Path(__file__).resolve().parents[2]


class Interrupted(torch.nn.Module):
    """Ctrl-C arriving while the exporter runs the model: its forward raises the KeyboardInterrupt Python raises."""

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise KeyboardInterrupt


def _export(model: torch.nn.Module, out: Path, example: tuple) -> Path:
    return export_onnx({"forward": (model, example, {0: {0: "batch"}})}, out, pipeline="", runtime_settings={},
                       source_hash=source_hash_of(model))


def _snapshot(path: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.fixture()
def artifact(tmp_path) -> tuple[Path, np.ndarray, dict[str, bytes]]:
    """A good artifact in tmp_path/art, its output on fixed ids, and its files."""
    model = TokenModel().eval()
    ids = np.array([[1, 5, 9], [2, 0, 255]], np.int64)
    out = _export(model, tmp_path / "art", (torch.from_numpy(ids),))
    want = load_artifact(out, threads=1).run("forward", input_ids=ids)["output_0"]
    return out, want, _snapshot(out)


def _assert_unchanged(art: Path, want: np.ndarray, files: dict[str, bytes]) -> None:
    assert _snapshot(art) == files
    got = load_artifact(art, threads=1).run("forward", input_ids=np.array([[1, 5, 9], [2, 0, 255]], np.int64))
    np.testing.assert_array_equal(got["output_0"], want)
    assert sorted(p.name for p in art.parent.iterdir()) == ["art"]  # no temporary directory left behind


def test_failing_export_keeps_the_previous_artifact(artifact):
    art, want, files = artifact
    with pytest.raises(OnnxExportError, match=r"function 'forward': torch.onnx export failed: .*linalg_eigh"):
        _export(Eigh().eval(), art, (torch.randn(3, 4, 4),))
    _assert_unchanged(art, want, files)


def test_ctrl_c_during_export_keeps_the_previous_artifact(artifact):
    art, want, files = artifact
    with pytest.raises(KeyboardInterrupt):
        _export(Interrupted(), art, (torch.zeros(2, 3, dtype=torch.int64),))
    _assert_unchanged(art, want, files)


def test_a_successful_export_replaces_the_artifact(artifact, tmp_path):
    art, want, files = artifact
    other = TokenModel(seed=1).eval()
    _export(other, art, (torch.zeros(2, 3, dtype=torch.int64),))
    ids = np.array([[3, 4, 7]], np.int64)
    got = load_artifact(art, threads=1).run("forward", input_ids=ids)["output_0"]
    with torch.no_grad():
        np.testing.assert_allclose(got, other(torch.from_numpy(ids)).numpy(), atol=1e-6, rtol=0)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["art"]


def test_sigint_to_elision_compile_mid_export_keeps_the_previous_artifact(artifact):
    """A real Ctrl-C: SIGINT to `elision compile ... --emit onnx -o ART` once the export has begun writing."""
    art, want, files = artifact
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    proc = subprocess.Popen([sys.executable, "-m", "elision.cli", "compile", "builtin:tiny-llama", "--emit", "onnx",
                             "-o", str(art)], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        deadline = time.monotonic() + 300
        while not [p for p in art.parent.iterdir() if p.name.startswith(".art.tmp-")]:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the export never started"
            time.sleep(0.05)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert "Traceback" not in err and err.strip().splitlines()[-1] == "error: interrupted"
    _assert_unchanged(art, want, files)
