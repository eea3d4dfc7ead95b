"""Calibration images for vision towers (`elision tune --calib images | fashion | DIR`): preprocessing as the
model's image processor would do it, photographs bundled with scikit-image, folders of the user's own files."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from elision.models import datasets as calib

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _clip_dir(tmp_path, mean=None, layers: int = 4):
    """A tiny CLIP vision tower saved as a Hugging Face model directory (safetensors), optionally with a
    preprocessor_config.json of its own."""
    import transformers as T
    torch.manual_seed(0)
    cfg = T.CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4,
                             image_size=32, patch_size=8)
    d = tmp_path / "clip"
    T.CLIPVisionModel(cfg).eval().save_pretrained(d, safe_serialization=True)
    if mean is not None:
        (d / "preprocessor_config.json").write_text(json.dumps({"image_mean": mean, "image_std": [0.25] * 3}))
    return d


def _load(d):
    from elision.frontend.model_spec import load_model
    return load_model(str(d)).model


def test_preprocessing_follows_the_model(tmp_path):
    from elision.models.vision import build_fashion_vit

    fashion = calib.ImagePreprocessing.for_model(build_fashion_vit())
    assert fashion == calib.fashion_preprocessing()
    assert (fashion.size, fashion.channels, fashion.mean) == (28, 1, (0.286,))
    clip = calib.ImagePreprocessing.for_model(_load(_clip_dir(tmp_path)))
    assert (clip.size, clip.channels) == (32, 3)
    assert clip.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # OpenAI CLIP's defaults
    own = calib.ImagePreprocessing.for_model(_load(_clip_dir(tmp_path / "own", mean=[0.1, 0.2, 0.3])))
    assert own.mean == (0.1, 0.2, 0.3) and own.std == (0.25, 0.25, 0.25)  # the directory's own config wins
    with pytest.raises(ValueError, match="does not take images"):
        calib.ImagePreprocessing.for_model(torch.nn.Linear(2, 2))


def test_normalisation_round_trips_the_committed_fashion_sample():
    prep = calib.fashion_preprocessing()
    x, _ = calib.fashion_sample(6)
    torch.testing.assert_close(prep(prep.to_unit(x)), x, atol=1e-6, rtol=0)


def test_natural_images_are_deterministic_distinct_photographs():
    prep = calib.ImagePreprocessing(48, 3, (0.5,) * 3, (0.5,) * 3)
    a, b = calib.natural_images(20, prep), calib.natural_images(20, prep)
    assert a.shape == (20, 3, 48, 48) and torch.equal(a, b)
    assert not torch.equal(a, calib.natural_images(20, prep, seed=1))
    unit = a * 0.5 + 0.5
    assert unit.min() >= 0 and unit.max() <= 1
    flat = a.flatten(1)
    assert torch.cdist(flat, flat).add(torch.eye(20) * 1e9).min() > 1.0  # no two crops alike
    # colour photographs really are in colour; a grey model gets luma
    assert (unit[:, 0] - unit[:, 2]).abs().mean() > 0.02
    grey = calib.natural_images(4, calib.ImagePreprocessing(28, 1, (0.0,), (1.0,)))
    assert grey.shape == (4, 1, 28, 28)


def test_folder_images_and_their_errors(tmp_path):
    from PIL import Image

    folder = tmp_path / "imgs"
    folder.mkdir()
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)).save(folder / "b.png")
    Image.fromarray(rng.integers(0, 255, (30, 30), dtype=np.uint8)).save(folder / "a.jpg")  # grey
    Image.fromarray(rng.integers(0, 255, (20, 20, 4), dtype=np.uint8)).save(folder / "c.png")  # RGBA
    (folder / "notes.txt").write_text("not an image")
    prep = calib.ImagePreprocessing(16, 3, (0.0,) * 3, (1.0,) * 3)
    x = calib.folder_images(folder, 10, prep)
    assert x.shape == (3, 3, 16, 16)
    # a.jpg (sorted first) is grey: its three channels are equal
    torch.testing.assert_close(x[0, 0], x[0, 1])
    assert calib.folder_images(folder, 2, prep).shape[0] == 2
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="has no image files"):
        calib.folder_images(empty, 4, prep)
    (folder / "d.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot read image d.png"):
        calib.folder_images(folder, 10, prep)


def test_tune_a_clip_tower_on_bundled_photographs(tmp_path):
    """`elision tune` on a CLIP vision tower (a Hugging Face directory): calibrates on photographs by default and
    judges candidates by the cosine of the pooled [CLS] state (the tower has no classifier logits)."""
    from typer.testing import CliRunner

    from elision.cli.main import app

    d = _clip_dir(tmp_path)
    plot = tmp_path / "pareto.png"
    args = ["tune", str(d), "--passes", "skip-layers", "--threads", "1", "--samples", "6", "--repeats", "1",
            "--min-fidelity", "0.5", "--plot", str(plot)]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    assert plot.exists()
    data = json.loads(res.stdout)
    assert "chosen" in data and data["calibration"]["held_out_rows"] == 6
    cands = data["candidates"]
    assert cands and all(c["kind"] == "embedding" for c in cands)
    folder = tmp_path / "mine"
    folder.mkdir()
    bad = CliRunner().invoke(app, args + ["--calib", str(folder)])
    assert bad.exit_code == 2 and "has no image files" in bad.output
    bad = CliRunner().invoke(app, args + ["--calib", "stdlib"])
    assert bad.exit_code == 2 and "takes images" in bad.output
