"""ONNX artifacts of tiny GPT-2, BERT and ViT (real HF classes): ORT parity with eager at a new shape."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from _lowering_models import PrimaryOutput, pixels, tiny_bert, tiny_gpt2, tiny_vit, token_ids
from elision.lowering.onnx_export import export_onnx, source_hash_of
from elision.runtime.artifact import load_artifact

ATOL_F32 = 1e-4


@pytest.mark.parametrize("builder, example, dims, fresh", [
    (tiny_gpt2, token_ids(2, 6), {0: {0: "batch", 1: "seq"}}, token_ids(3, 9, seed=3)),
    (tiny_bert, token_ids(2, 6), {0: {0: "batch", 1: "seq"}}, token_ids(3, 9, seed=3)),
    (tiny_vit, pixels(2), {0: {0: "batch"}}, pixels(3, seed=3)),
], ids=["gpt2", "bert", "vit"])
def test_artifact_matches_eager(builder, example, dims, fresh, tmp_path):
    hf = builder()
    model = PrimaryOutput(hf).eval()
    art = export_onnx({"forward": (model, (example,), dims)}, tmp_path / "a", pipeline="", source_hash=source_hash_of(hf),
                      runtime_settings={}, ort_fusions=True, output_names={"forward": ["out"]})
    manifest = json.loads((art / "manifest.json").read_text())
    fusions = manifest["functions"]["forward"]["ort_fusions"]
    assert "applied" in fusions  # fused when ORT accepted and matched, else the plain graph with the reason
    artifact = load_artifact(art, threads=1)
    with torch.no_grad():
        want = model(fresh).numpy()
    got = artifact.run("forward", **{artifact.functions["forward"].inputs[0].name: fresh.numpy()})["out"]
    np.testing.assert_allclose(got, want, atol=ATOL_F32, rtol=0)
