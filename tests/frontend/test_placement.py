"""--dtype / --device / --threads: one Placement, applied when a model is loaded or compiled.

Half-precision paths run on the CPU here (torch's CPU kernels and onnxruntime's CPU provider); each is compared with
the float32 model on the same fresh inputs. Tolerances, relative to the largest reference magnitude: float16 1e-2,
bfloat16 3e-2 (8 mantissa bits: ~4e-3 per rounding, accumulated over a few layers). CUDA is absent on this
machine: the tests check the refusal, and the CUDA runs stay unmeasured here.
"""
from __future__ import annotations

import json
import shutil

import numpy as np
import onnxruntime
import pytest
import torch

import elision
from elision.apps.compile.numerics import fresh_inputs, primary
from elision.cli.main import main
from elision.errors import PlacementError
from elision.frontend.model_spec import load_model
from elision.frontend.placement import Placement
from elision.runtime.artifact import ArtifactProviderError, load_artifact, read_manifest, select_providers

TOLERANCE = {"float16": 1e-2, "bfloat16": 3e-2}
HALF = sorted(TOLERANCE)


def _rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).abs().max() / want.double().abs().max())


@pytest.fixture
def threads_restored():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("bad,message", [
    ({"dtype": "float64"}, "dtype must be one of float32, float16, bfloat16, got 'float64'"),
    ({"device": "tpu"}, "device must be one of cpu, cuda, got 'tpu'"),
    ({"threads": 0}, "threads must be an integer >= 1, got 0"),
    ({"threads": 1.5}, "threads must be an integer >= 1, got 1.5"),
])
def test_bad_placements_are_refused(bad, message):
    with pytest.raises(PlacementError, match=message.replace("(", r"\(").replace(")", r"\)")):
        Placement(**bad)


def test_cuda_is_refused_exactly_when_torch_has_none():
    cuda = Placement(device="cuda")
    if torch.cuda.is_available():
        assert cuda.check_available() is cuda
    else:
        with pytest.raises(PlacementError, match="device cuda: this torch has no usable CUDA device"):
            cuda.check_available()


@pytest.mark.parametrize("spec", ["builtin:tiny-llama", "builtin:fashion-vit"])
@pytest.mark.parametrize("dtype", HALF)
def test_loaded_models_and_float_inputs_take_the_dtype(spec, dtype):
    lm = load_model(spec, placement=Placement(dtype))
    assert {p.dtype for p in lm.model.parameters()} == {Placement(dtype).torch_dtype}
    for x in lm.example_inputs:  # pixels take the dtype, token ids stay integers
        assert x.dtype == (Placement(dtype).torch_dtype if x.is_floating_point() else torch.int64)


@pytest.mark.parametrize("spec", ["builtin:tiny-llama", "builtin:fashion-vit"])
@pytest.mark.parametrize("dtype", HALF)
def test_compile_in_half_precision_matches_float32(spec, dtype, threads_restored):
    lm = load_model(spec)
    inputs = fresh_inputs(lm.example_inputs, lm.dynamic_dims, high=getattr(lm.model.config, "vocab_size", None))
    with torch.no_grad():
        want = primary(lm.model(*inputs))
    fast = elision.compile(lm.model, lm.example_inputs, dynamic_dims=lm.dynamic_dims, select="elision", dtype=dtype,
                           threads=1)
    assert torch.get_num_threads() == 1
    assert {p.dtype for p in lm.model.parameters()} == {Placement(dtype).torch_dtype}  # converted in place
    with torch.no_grad():
        got = primary(fast(*Placement(dtype).place_inputs(inputs)))
    assert got.dtype == Placement(dtype).torch_dtype
    assert _rel_error(got, want) < TOLERANCE[dtype]


def test_the_api_keeps_a_model_as_it_is_without_placement_arguments():
    lm = load_model("builtin:tiny-llama", placement=Placement("bfloat16"))
    fast = elision.compile(lm.model, lm.example_inputs, dynamic_dims=lm.dynamic_dims, select="elision")
    assert {p.dtype for p in lm.model.parameters()} == {torch.bfloat16}
    assert primary(fast(*lm.example_inputs)).dtype == torch.bfloat16


def test_float16_onnx_artifact_targets_cuda_and_runs_on_the_cpu_provider(tmp_path, capsys):
    out = tmp_path / "fp16"
    assert main(["compile", "builtin:tiny-llama", "--emit", "onnx", "--dtype", "float16", "-o", str(out),
                 "--verify", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["dtype"] == "float16" and report["verify"]["ok"]
    manifest = read_manifest(out)
    # both: CUDA first (half precision is what its tensor cores are for), and the CPU provider runs it too (below)
    assert manifest["dtype"] == "float16"
    assert manifest["execution_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    artifact = load_artifact(out)  # the manifest's order, filtered to what onnxruntime has
    has_cuda = "CUDAExecutionProvider" in onnxruntime.get_available_providers()
    assert artifact.providers[0] == ("CUDAExecutionProvider" if has_cuda else "CPUExecutionProvider")
    lm = load_model("builtin:tiny-llama")
    ids = fresh_inputs(lm.example_inputs, lm.dynamic_dims, high=lm.model.config.vocab_size)[0]
    got = artifact.run("forward", input_ids=ids.numpy())["logits"]
    assert got.dtype == np.float16
    with torch.no_grad():
        want = lm.model(ids, use_cache=False).logits
    assert _rel_error(torch.from_numpy(got), want) < TOLERANCE["float16"]


def test_bfloat16_onnx_artifact_says_it_needs_cuda_on_a_cpu_onnxruntime(tmp_path, capsys):
    out = tmp_path / "bf16"
    assert main(["compile", "builtin:tiny-llama", "--emit", "onnx", "--dtype", "bfloat16", "-o", str(out)]) == 0
    capsys.readouterr()
    manifest = read_manifest(out)
    assert manifest["dtype"] == "bfloat16" and manifest["execution_providers"] == ["CUDAExecutionProvider"]
    # what onnxruntime 1.32's CPU provider does with it: no bfloat16 MatMul kernel, so the session cannot be built
    with pytest.raises(ArtifactProviderError, match="this bfloat16 artifact targets CUDAExecutionProvider, and "
                                                    "onnxruntime's CPU provider cannot run it"):
        load_artifact(out, providers=["CPUExecutionProvider"])
    if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
        with pytest.raises(ArtifactProviderError, match="this bfloat16 artifact targets CUDAExecutionProvider"):
            load_artifact(out)  # its manifest's order (CUDA alone) has nothing installed here: the same refusal


def test_float32_artifacts_target_both_providers(tmp_path, capsys):
    assert main(["compile", "builtin:tiny-llama", "--emit", "onnx", "-o", str(tmp_path / "a")]) == 0
    capsys.readouterr()
    manifest = read_manifest(tmp_path / "a")
    assert manifest["dtype"] == "float32"
    assert manifest["execution_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_the_loader_follows_the_manifests_provider_order_unless_told_otherwise(monkeypatch):
    cuda, cpu = "CUDAExecutionProvider", "CPUExecutionProvider"
    monkeypatch.delenv("ELISION_ORT_PROVIDERS", raising=False)
    has_cuda = cuda in onnxruntime.get_available_providers()
    assert select_providers(order=[cuda, cpu]) == ([cuda, cpu] if has_cuda else [cpu])
    assert select_providers(order=[cpu, cuda]) == ([cpu, cuda] if has_cuda else [cpu])  # compiled with --device cpu
    assert select_providers(order=[cuda]) == ([cuda] if has_cuda else [cpu])  # bfloat16: the load then says why not
    assert select_providers([cpu], order=[cuda, cpu]) == [cpu]  # asked for (elision run --device cpu)
    monkeypatch.setenv("ELISION_ORT_PROVIDERS", cpu)
    assert select_providers(order=[cuda, cpu]) == [cpu]


@pytest.mark.parametrize("dtype", HALF)
def test_generate_in_half_precision_is_the_models_own_greedy_decoding(dtype, capsys, threads_restored):
    from elision.apps.specdec.loading import load_causal_lm

    # --no-compile: the dtype path is what is under test; the compiled step's token identity has its own tests
    # (tests/apps/specdec/test_torch_route.py), and compiling it again here per dtype costs CI minutes
    assert main(["generate", "builtin:tiny-code-lm", "--prompt", "def parse(", "-n", "32", "--dtype", dtype,
                 "--threads", "1", "--json", "--no-compile"]) == 0
    tokens = json.loads(capsys.readouterr().out)["tokens"]
    assert torch.get_num_threads() == 1
    model, tok = load_causal_lm("builtin:tiny-code-lm", Placement(dtype))
    assert model.dtype == Placement(dtype).torch_dtype
    ids = tok("def parse(", return_tensors="pt").input_ids
    want = model.generate(ids, max_new_tokens=32, do_sample=False)[0, ids.shape[1]:].tolist()
    assert tokens == want[:len(tokens)] and len(tokens) == len(want)


@pytest.mark.parametrize("argv", [
    ["decode-shape", "builtin:vecset-tiny", "--latents", "{lat}", "-r", "16", "-o", "{tmp}/m.glb"],
    ["tune", "builtin:minilm", "--passes", "skip-layers", "--samples", "2", "--seq-len", "16", "--repeats", "1",
     "--plot", "{tmp}/p.png"],
])
def test_commands_leave_torch_threads_alone_unless_told(argv, tmp_path, capsys, threads_restored):
    from elision.models.vecset import FIXTURE_DIR

    lat = str(FIXTURE_DIR / "thin_rods.latents.safetensors")
    argv = [a.replace("{lat}", lat).replace("{tmp}", str(tmp_path)) for a in argv]
    torch.set_num_threads(3)  # not the 2 these commands used to force
    assert main(argv) == 0, capsys.readouterr().err
    assert torch.get_num_threads() == 3
    shutil.rmtree(tmp_path)
    tmp_path.mkdir()
    assert main(argv + ["--threads", "1"]) == 0, capsys.readouterr().err
    assert torch.get_num_threads() == 1
