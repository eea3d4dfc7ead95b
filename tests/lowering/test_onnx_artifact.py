"""ONNX artifacts: export with shared weights, manifest, ORT parity with eager, and the runtime's errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
import torch

from _lowering_models import PrimaryOutput, tiny_llama, token_ids
from elision.lowering.onnx_export import OnnxExportError, export_onnx, source_hash_of, to_dynamic_shapes
from elision.runtime.artifact import (
    FORMAT_VERSION,
    ArtifactCorruptError,
    ArtifactInputError,
    ArtifactMissingFileError,
    ArtifactTamperedError,
    ArtifactVersionError,
    load_artifact,
)

ATOL_F32 = 1e-4  # ORT vs eager, float32, after ORT graph fusions (observed ~2e-7)


class LlamaEmbed(torch.nn.Module):
    """The token embedding alone: a second function that shares a weight with the full model."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.lm.model.embed_tokens(input_ids)


@pytest.fixture(scope="module")
def llama():
    return tiny_llama(layers=1)


@pytest.fixture(scope="module")
def llama_artifact(llama, tmp_path_factory) -> Path:
    """Two functions over shared weights (logits, and the embedding lookup), ORT fusions on."""
    torch.set_num_threads(2)
    out = tmp_path_factory.mktemp("llama_artifact")
    dims = {0: {0: "batch", 1: "seq"}}
    ids = token_ids(2, 7)
    return export_onnx(
        {"logits": (PrimaryOutput(llama, use_cache=False), (ids,), dims), "embed": (LlamaEmbed(llama), (ids,), dims)},
        out,
        pipeline="canonicalize,cse",
        source_hash=source_hash_of(llama),
        runtime_settings={"kind": "causal-lm", "eos_token_id": 2},
        ort_fusions=True,
        output_names={"logits": ["logits"], "embed": ["embeddings"]},
    )


def test_manifest_records_functions_dims_pipeline_and_hashes(llama, llama_artifact):
    manifest = json.loads((llama_artifact / "manifest.json").read_text())
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["pipeline"] == "canonicalize,cse"
    assert manifest["source_hash"] == source_hash_of(llama)
    assert manifest["runtime_settings"] == {"kind": "causal-lm", "eos_token_id": 2}
    logits = manifest["functions"]["logits"]
    # token ids index the 256-row embedding: the runtime refuses ids outside [0, 256)
    assert logits["inputs"] == [{"name": "x", "dtype": "int64", "shape": ["batch", "seq"], "range": [0, 256]}]
    assert logits["outputs"] == [{"name": "logits", "dtype": "float32", "shape": ["batch", "seq", 256]}]
    assert manifest["functions"]["embed"]["outputs"][0]["shape"] == ["batch", "seq", 64]
    assert set(manifest["files"]) == {"weights.bin", "logits.onnx", "embed.onnx"}
    # the Llama attention/norm subgraphs were rewritten into ORT contrib ops
    assert logits["ort_fusions"]["applied"], logits["ort_fusions"]


def test_weights_are_stored_once_and_every_file_passes_the_checker(llama, llama_artifact):
    param_bytes = sum(p.numel() * p.element_size() for p in llama.parameters())
    weights = llama_artifact / "weights.bin"
    # both functions reference the embedding table; the file holds it once (+ alignment, rotary table)
    assert weights.stat().st_size < 1.1 * param_bytes
    manifest = json.loads((llama_artifact / "manifest.json").read_text())
    embed_bytes = llama.model.embed_tokens.weight.numel() * 4
    assert manifest["weights"]["bytes_referenced"] >= manifest["weights"]["bytes"] + embed_bytes - 4096
    locations = {}
    for name in ("logits.onnx", "embed.onnx"):
        onnx.checker.check_model(str(llama_artifact / name))
        proto = onnx.load(str(llama_artifact / name), load_external_data=False)
        external = [t for t in proto.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
        assert external and all(e.value == "weights.bin" for t in external for e in t.external_data if e.key == "location")
        for t in external:
            if tuple(t.dims) == tuple(llama.model.embed_tokens.weight.shape):
                locations[name] = {e.key: e.value for e in t.external_data}
        assert (llama_artifact / name).stat().st_size < 200_000  # structure only, no weights
    assert locations["logits.onnx"] == locations["embed.onnx"]  # same bytes, same place


def test_ort_matches_eager_at_new_shapes(llama, llama_artifact):
    artifact = load_artifact(llama_artifact, threads=1)
    assert artifact.providers[-1] == "CPUExecutionProvider"
    for batch, seq in [(1, 5), (3, 11)]:
        ids = token_ids(batch, seq, seed=batch)
        with torch.no_grad():
            want_logits = llama(ids, use_cache=False).logits.numpy()
            want_embed = llama.model.embed_tokens(ids).numpy()
        got = artifact.run("logits", x=ids.numpy())["logits"]
        np.testing.assert_allclose(got, want_logits, atol=ATOL_F32, rtol=0)
        embed = artifact.run("embed", input_ids=ids.numpy())["embeddings"]
        np.testing.assert_array_equal(embed, want_embed)


def test_run_rejects_bad_inputs_with_clear_messages(llama_artifact):
    artifact = load_artifact(llama_artifact, threads=1)
    with pytest.raises(ArtifactInputError, match=r"input 'x' has dtype int32, expected int64"):
        artifact.run("logits", x=np.zeros((1, 4), np.int32))
    with pytest.raises(ArtifactInputError, match=r"missing x; unexpected ids"):
        artifact.run("logits", ids=np.zeros((1, 4), np.int64))
    with pytest.raises(ArtifactInputError, match=r"has 1 dims \[4\], expected 2"):
        artifact.run("logits", x=np.zeros((4,), np.int64))
    with pytest.raises(ArtifactInputError, match=r"no function 'decode'; functions: logits, embed"):
        artifact.run("decode", x=np.zeros((1, 4), np.int64))


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_missing_directory_manifest_and_file(llama_artifact, tmp_path):
    with pytest.raises(ArtifactMissingFileError, match=r"does not exist; re-create it with `elision compile"):
        load_artifact(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArtifactMissingFileError, match=r"is not an elision artifact: it has no manifest.json"):
        load_artifact(tmp_path / "empty")
    art = _copy(llama_artifact, tmp_path / "a")
    (art / "embed.onnx").unlink()
    with pytest.raises(ArtifactMissingFileError, match=r"embed.onnx named in manifest.json is missing"):
        load_artifact(art)


def test_tampered_weights_are_detected(llama_artifact, tmp_path):
    art = _copy(llama_artifact, tmp_path / "a")
    data = bytearray((art / "weights.bin").read_bytes())
    data[1000] ^= 0xFF
    (art / "weights.bin").write_bytes(bytes(data))
    with pytest.raises(ArtifactTamperedError, match=r"weights.bin was modified after export: sha256 .* does not match"):
        load_artifact(art)


def test_corrupt_onnx_and_manifest(llama_artifact, tmp_path):
    art = _copy(llama_artifact, tmp_path / "a")
    (art / "logits.onnx").write_bytes(b"this is not a protobuf")
    # with hashes checked this is tampering; with the check off ORT itself refuses the file
    with pytest.raises(ArtifactTamperedError):
        load_artifact(art)
    with pytest.raises(ArtifactCorruptError, match=r"function 'logits': onnxruntime cannot load .*logits.onnx"):
        load_artifact(art, verify=False)
    (art / "manifest.json").write_text("{not json")
    with pytest.raises(ArtifactCorruptError, match=r"manifest.json is not valid JSON"):
        load_artifact(art)


def test_manifest_from_another_format_version(llama_artifact, tmp_path):
    art = _copy(llama_artifact, tmp_path / "a")
    manifest = json.loads((art / "manifest.json").read_text())
    manifest["format_version"] = FORMAT_VERSION + 1
    manifest["elision_version"] = "9.9.9"
    (art / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactVersionError, match=rf"format version {FORMAT_VERSION + 1} \(written by elision 9.9.9\); "
                                                   rf"this elision .* reads format version {FORMAT_VERSION}"):
        load_artifact(art)


def test_runtime_does_not_import_torch(llama_artifact):
    code = (
        "import sys, numpy as np\n"
        "import elision.runtime.artifact as rt\n"
        f"a = rt.load_artifact({str(llama_artifact)!r}, threads=1)\n"
        "out = a.run('logits', x=np.ones((1, 3), np.int64))\n"
        "assert out['logits'].shape == (1, 3, 256)\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr


def test_dynamic_dim_with_example_size_one_is_refused():
    with pytest.raises(OnnxExportError, match=r"example size 1; dynamic dims need an example size >= 2"):
        to_dynamic_shapes((torch.zeros(1, 4),), {0: {0: "batch"}})
    shapes = to_dynamic_shapes((torch.zeros(2, 4), torch.zeros(2, 5)), {0: {1: "seq"}, 1: {1: "seq + 1"}})
    assert str(shapes[0][1]) .startswith("Dim") or shapes[0][1] is not None
    with pytest.raises(OnnxExportError, match=r"not a valid file name"):
        export_onnx({"bad name": (torch.nn.Identity(), (torch.zeros(2),), None)}, "/tmp/unused-elision", pipeline="",
                    source_hash="", runtime_settings={})


class CacheStep(torch.nn.Module):
    """One decode step over an explicit cache tensor: present = cat(past, k(x)); attend over present."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(1)
        self.k = torch.nn.Linear(16, 16)
        self.q = torch.nn.Linear(16, 16)

    def forward(self, x: torch.Tensor, past: torch.Tensor):
        present = torch.cat([past, self.k(x)], dim=1)
        scores = torch.softmax(self.q(x) @ present.transpose(1, 2) / 4.0, dim=-1)
        return scores @ present, present


def test_io_binding_feeds_the_cache_back_without_numpy(tmp_path):
    import onnxruntime as ort

    step = CacheStep().eval()
    x, past = torch.randn(2, 1, 16), torch.randn(2, 3, 16)
    art = export_onnx({"decode": (step, (x, past), {0: {0: "batch"}, 1: {0: "batch", 1: "past"}})}, tmp_path / "a",
                      pipeline="", source_hash=source_hash_of(step), runtime_settings={"cache": "past"},
                      output_names={"decode": ["y", "present"]})
    artifact = load_artifact(art, threads=1)
    present_spec = artifact.functions["decode"].outputs[1]
    assert present_spec.shape[0] == "batch" and isinstance(present_spec.shape[1], str)  # symbolic past + 1
    cache_ort, cache_torch = ort.OrtValue.ortvalue_from_numpy(past.numpy()), past
    for i in range(3):
        xi = torch.randn(2, 1, 16, generator=torch.Generator().manual_seed(i))
        out = artifact.run_with_binding("decode", {"x": xi.numpy(), "past": cache_ort}, keep_on_device=["present"])
        assert isinstance(out["present"], ort.OrtValue) and isinstance(out["y"], np.ndarray)
        with torch.no_grad():
            want_y, cache_torch = step(xi, cache_torch)
        np.testing.assert_allclose(out["y"], want_y.numpy(), atol=1e-5, rtol=0)
        cache_ort = out["present"]
    np.testing.assert_allclose(cache_ort.numpy(), cache_torch.numpy(), atol=1e-5, rtol=0)
    assert cache_ort.shape() == [2, 6, 16]


class _VariadicStep(torch.nn.Module):
    def forward(self, ids, *past):
        return ids.float().sum(-1, keepdim=True) + torch.cat(past, -1).sum(-1, keepdim=True)


def test_variadic_inputs_get_their_dims_by_position_and_export_under_numbered_names(tmp_path):
    """A forward ending in `*past` (the speculative step's K/V inputs): dims stay keyed by input position, the
    variadic ones are grouped the way torch.export wants, and the graph inputs are named past_0, past_1."""
    import onnxruntime as ort

    inputs = (torch.zeros(2, 3), torch.ones(2, 4), torch.ones(2, 4))
    shapes = to_dynamic_shapes(inputs, {0: {0: "batch"}, 1: {0: "batch", 1: "past"}, 2: {0: "batch", 1: "past"}},
                               _VariadicStep())
    assert len(shapes) == 2 and isinstance(shapes[1], tuple) and len(shapes[1]) == 2
    assert set(shapes[1][0]) == {0, 1} and shapes[1][0][1] is shapes[1][1][1]
    out = export_onnx({"step": (_VariadicStep(), inputs, {0: {0: "batch"}, 1: {0: "batch", 1: "past"},
                                                          2: {0: "batch", 1: "past"}})},
                      tmp_path / "art", pipeline="", source_hash="", runtime_settings={})
    session = ort.InferenceSession(str(next(Path(out).glob("step*.onnx"))))
    assert [i.name for i in session.get_inputs()] == ["ids", "past_0", "past_1"]
    feeds = {"ids": np.ones((3, 3), np.float32), "past_0": np.ones((3, 5), np.float32),
             "past_1": np.full((3, 5), 2.0, np.float32)}
    np.testing.assert_allclose(session.run(None, feeds)[0], np.full((3, 1), 18.0))
