"""`elision compile MODEL --emit onnx --for generate` + `elision run DIR --prompt`: speculative decoding with
onnxruntime alone is token-identical to Hugging Face greedy `generate`, and never imports torch.

Each model is compiled once per module (the export is the slow part). Expected tokens always come from the
Hugging Face model at test time (the built-in model may be retrained, so nothing here is hard-coded).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from typer.testing import CliRunner

from elision.runtime.artifact import ArtifactTamperedError, read_manifest
from elision.runtime.generation.ort_generator import GenerationError, KVCacheOverflowError, OrtGenerator
from specdec_helpers import save_tiny_lm_dir

PROMPTS = [
    "def load(path):\n    with open(path) as f:\n        return json.load(f)\n\ndef save(",
    "import os\nimport sys\n",
    "x = 1",
]


def _compile(model: str, out: Path, *options: str) -> Path:
    """Through the real `elision compile` command, so the CLI path is what every test exercises."""
    from elision.cli.main import app

    result = CliRunner().invoke(app, ["compile", model, "--emit", "onnx", "--for", "generate", "-o", str(out),
                                      *options])
    assert result.exit_code == 0, result.output
    return out


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(HF model, HF tokenizer, artifact dir) of a random-weight tiny Llama with a trained BPE tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("tiny")
    model_dir = save_tiny_lm_dir(root / "model", "llama", layers=2)  # 2 layers: the ONNX export is the slow part
    art = _compile(str(model_dir), root / "artifact")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(model_dir), art


@pytest.fixture(scope="module")
def builtin(tmp_path_factory):
    from elision.models import code_lm

    art = _compile("builtin:tiny-code-lm", tmp_path_factory.mktemp("builtin") / "artifact")
    return code_lm.load_model(), code_lm.load_tokenizer(), art


def hf_greedy(model, ids: list[int], max_new: int, eos: list[int]) -> list[int]:
    x = torch.tensor([ids])
    with torch.no_grad():
        out = model.generate(x, attention_mask=torch.ones_like(x), max_new_tokens=max_new, do_sample=False,
                             eos_token_id=eos or None, pad_token_id=0, min_new_tokens=0)
    return out[0, len(ids):].tolist()


def _check_matches_hf(model, tokenizer, art, max_news):
    gen = OrtGenerator.load(art, threads=1)
    for text in PROMPTS:
        ids = tokenizer(text).input_ids
        assert gen.encode(text) == ids  # the exported tokenizer.json splits like the HF tokenizer
        for max_new in max_news:
            want = hf_greedy(model, ids, max_new, gen.eos_token_ids)
            for drafter, tree in [("recycling+lookup", "dynamic"), ("lookup", "static:chain-4"),
                                  ("recycling", "static:3x2x1"), ("none", "dynamic")]:
                got = gen.generate(text, max_new, drafter=drafter, tree=tree)
                assert got.tokens == want, (text, max_new, drafter, tree)
                assert got.text == tokenizer.decode(want, skip_special_tokens=True)
                st = got.stats
                assert st["new_tokens"] == len(want) and st["forward_passes"] == st["verify_steps"] + 1
    # EOS the model actually emits: a token of a continuation, so generation must stop right after it
    ids = tokenizer(PROMPTS[0]).input_ids
    cont = hf_greedy(model, ids, 24, [])
    eos = cont[len(cont) // 2]
    want = hf_greedy(model, ids, 24, [eos])
    got = gen.generate(PROMPTS[0], 24, eos_token_id=[eos])
    assert got.tokens == want and got.tokens[-1] == eos and len(got.tokens) <= len(cont) // 2 + 1
    return gen


def test_tiny_llama_matches_hf_greedy(tiny):
    # head size 8 is below what GroupQueryAttention runs: the artifact keeps the concatenating form and says why
    settings = json.loads((tiny[2] / "manifest.json").read_text())["runtime_settings"]["generation"]
    assert settings["form"] == "concat-kv" and "head size 8 is not a multiple of 16" in settings["step_lowering"]
    assert (tiny[2] / "verify.onnx").is_file() and not (tiny[2] / "step.onnx").exists()
    _check_matches_hf(*tiny, max_news=(1, 7, 40))


def test_builtin_code_lm_compiles_to_the_in_place_step(builtin):
    manifest = json.loads((builtin[2] / "manifest.json").read_text())
    settings = manifest["runtime_settings"]["generation"]
    assert settings["form"] == "gqa-shared-kv" and settings["lowering"]["group_query_attention"] == 4
    # compiled without --device: CUDA first where onnxruntime-gpu sees a GPU, the CPU provider otherwise
    assert manifest["execution_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]


def test_builtin_code_lm_matches_hf_greedy_and_drafts_pay_off(builtin):
    gen = _check_matches_hf(*builtin, max_news=(32,))
    # a prompt that repeats itself: lookup + recycling must accept several tokens per forward
    text = "for i in range(10):\n    print(i)\n" * 4
    result = gen.generate(text, 48, drafter="recycling+lookup")
    assert result.stats["forward_passes"] < 48 and result.stats["mean_accepted_length"] > 1.0


@pytest.fixture(scope="module")
def builtin_fp16(tmp_path_factory):
    """The built-in model compiled with --dtype float16, and its Hugging Face model in float16 (its stored weights)."""
    from elision.models import code_lm

    art = _compile("builtin:tiny-code-lm", tmp_path_factory.mktemp("builtin_fp16") / "artifact", "--dtype", "float16")
    return code_lm.load_model(dtype=torch.float16), code_lm.load_tokenizer(), art


def test_float16_artifact_keeps_the_step_form_in_float16(builtin_fp16, builtin):
    """The manifest records float16; the step's bias and logits are float16, the cache too, the weights half the
    float32 artifact's bytes; the lowered step passes its check against the float16 @verify (half-precision bound)."""
    manifest = json.loads((builtin_fp16[2] / "manifest.json").read_text())
    settings = manifest["runtime_settings"]["generation"]
    assert manifest["dtype"] == settings["dtype"] == "float16" and settings["form"] == "gqa-shared-kv"
    # what it runs on: CUDA first, and the CPU provider, where it was checked and calibrated (and runs below)
    assert manifest["execution_providers"] == ["CUDAExecutionProvider", "CPUExecutionProvider"]
    step = manifest["functions"]["step"]
    assert {t["name"]: t["dtype"] for t in step["inputs"]}["attention_bias"] == "float16"
    assert step["outputs"][0]["name"] == "logits" and step["outputs"][0]["dtype"] == "float16"
    fp32 = json.loads((builtin[2] / "manifest.json").read_text())
    assert fp32["dtype"] == "float32" and manifest["weights"]["bytes"] < 0.6 * fp32["weights"]["bytes"]
    assert OrtGenerator.load(builtin_fp16[2], threads=1).dtype == "float16"


def test_float16_artifact_is_the_float16_models_greedy_decoding(builtin_fp16):
    """On onnxruntime's CPU provider, every drafter and tree gives Hugging Face's float16 greedy tokens (CPU float16
    on both sides; exact on this model and these prompts, measured, not assumed: a near-tie could flip a token)."""
    _check_matches_hf(*builtin_fp16, max_news=(32,))


def test_elision_run_decodes_the_float16_artifact(builtin_fp16):
    model, tokenizer, art = builtin_fp16
    result = CliRunner().invoke(_cli(), ["run", str(art), "--prompt", PROMPTS[0], "-n", "20", "--json"])
    assert result.exit_code == 0, result.output
    want = hf_greedy(model, tokenizer(PROMPTS[0]).input_ids, 20, OrtGenerator.load(art).eos_token_ids)
    assert json.loads(result.stdout)["tokens"] == want


def test_generate_target_onnxruntime_in_float16_compiles_its_own_cached_artifact(builtin_fp16, builtin, tmp_path,
                                                                               monkeypatch):
    """`elision generate --target onnxruntime --dtype float16` compiles a float16 artifact into the user cache beside
    the float32 one of the same weights (the dtype is part of the key: the float32 one is not reused), decodes Hugging
    Face's float16 greedy tokens with it, and reuses it on the next call."""
    from elision.apps.specdec.artifact_cache import cache_directory
    from elision.cli.main import app

    monkeypatch.setenv("ELISION_CACHE_DIR", str(tmp_path))
    fp32, fp16 = (cache_directory("builtin:tiny-code-lm", dtype) for dtype in ("float32", "float16"))
    shutil.copytree(builtin[2], fp32)  # as if float32 generation had run here before
    model, tokenizer, _ = builtin_fp16
    args = ["generate", "builtin:tiny-code-lm", "--prompt", PROMPTS[1], "-n", "16", "--target", "onnxruntime",
            "--dtype", "float16", "--json"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in fp32.parent.iterdir()) == sorted([fp32.name, fp16.name])
    assert json.loads((fp16 / "manifest.json").read_text())["dtype"] == "float16"
    want = hf_greedy(model, tokenizer(PROMPTS[1]).input_ids, 16, OrtGenerator.load(fp16).eos_token_ids)
    assert json.loads(result.stdout)["tokens"] == want
    stamp = (fp16 / "step.onnx").stat().st_mtime_ns
    again = CliRunner().invoke(app, args + ["--device", "cpu", "--threads", "1"])
    assert again.exit_code == 0, again.output
    assert json.loads(again.stdout)["tokens"] == want and (fp16 / "step.onnx").stat().st_mtime_ns == stamp


def test_compile_for_generate_device_cpu_puts_the_cpu_provider_first_and_run_follows_it(tiny, tmp_path):
    """--device orders the manifest's execution providers (the graph is the same); `elision run` loads the artifact
    on them unless told otherwise, and `--device cpu` forces the CPU provider; the tokens stay HF's greedy ones."""
    model, tokenizer, default = tiny
    art = _compile(str(default.parent / "model"), tmp_path / "cpu-first", "--device", "cpu")
    assert read_manifest(art)["execution_providers"] == ["CPUExecutionProvider", "CUDAExecutionProvider"]
    assert OrtGenerator.load(art, threads=1).artifact.providers[0] == "CPUExecutionProvider"
    want = hf_greedy(model, tokenizer(PROMPTS[2]).input_ids, 8, OrtGenerator.load(art).eos_token_ids)
    for options in ([], ["--device", "cpu"]):
        result = CliRunner().invoke(_cli(), ["run", str(art), "--prompt", PROMPTS[2], "-n", "8", "--json", *options])
        assert result.exit_code == 0, result.output
        assert json.loads(result.stdout)["tokens"] == want


def test_stop_strings_and_stream(tiny):
    model, tokenizer, art = tiny
    gen = OrtGenerator.load(art, threads=1)
    full = gen.generate(PROMPTS[1], 30, eos_token_id=[])
    pieces: list[str] = []
    streamed = gen.generate(PROMPTS[1], 30, eos_token_id=[], stream=pieces.append)
    assert "".join(pieces) == streamed.text == full.text
    # stop at the text of a generated token that has not appeared before: generation ends right after it
    k, stop = next((k, tokenizer.decode(full.tokens[k:k + 1])) for k in range(2, len(full.tokens))
                   if tokenizer.decode(full.tokens[k:k + 1]).strip()
                   and tokenizer.decode(full.tokens[k:k + 1]) not in tokenizer.decode(full.tokens[:k]))
    cut = gen.generate(PROMPTS[1], 30, eos_token_id=[], stop_strings=stop)
    assert stop in cut.text and full.tokens[: len(cut.tokens)] == cut.tokens and len(cut.tokens) <= k + 1


def test_generation_does_not_import_torch(tiny):
    model, tokenizer, art = tiny
    code = (
        "import json, sys\n"
        "from elision.runtime.generation.ort_generator import OrtGenerator\n"
        f"r = OrtGenerator.load({str(art)!r}, threads=1).generate({PROMPTS[0]!r}, 12, drafter='recycling+lookup')\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "print(json.dumps(r.tokens))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    want = hf_greedy(model, tokenizer(PROMPTS[0]).input_ids, 12, OrtGenerator.load(art).eos_token_ids)
    assert json.loads(result.stdout) == want


_BLOCK_TORCH = """
import sys


class _NoTorch:
    \"\"\"Refuses `import torch` (and its submodules), as in a Python without PyTorch.\"\"\"

    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test: {name}")
        return None


sys.meta_path.insert(0, _NoTorch())
"""


def _elision_without_torch(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """`elision ARGS` in a fresh interpreter whose sitecustomize makes `import torch` fail."""
    blocker = tmp_path / "no_torch"
    blocker.mkdir(exist_ok=True)
    (blocker / "sitecustomize.py").write_text(_BLOCK_TORCH)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(blocker), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-m", "elision.cli.main", *args], capture_output=True, text=True,
                          env=env, timeout=300)


def test_cli_runs_artifacts_where_torch_cannot_be_imported(tiny, tmp_path):
    """The artifact was compiled in this (torch) process; `elision --help`, `elision run --help` and
    `elision run DIR --prompt` work where importing torch fails, print no third-party warnings, and give HF's
    greedy tokens. A command that compiles says in one line that it needs PyTorch."""
    model, tokenizer, art = tiny
    probe = _elision_without_torch(tmp_path, "--version")
    assert probe.returncode == 0, probe.stderr
    check = subprocess.run([sys.executable, "-c", "import torch"], capture_output=True, text=True, timeout=120,
                           env={**os.environ, "PYTHONPATH": str(tmp_path / "no_torch")})
    assert check.returncode != 0 and "torch is blocked" in check.stderr  # the blocker is in force
    for args in (["--help"], ["run", "--help"]):
        result = _elision_without_torch(tmp_path, *args)
        assert result.returncode == 0, result.stderr
        assert "Usage" in result.stdout and result.stderr == ""
    result = _elision_without_torch(tmp_path, "run", str(art), "--prompt", PROMPTS[0], "-n", "12", "--json")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # nothing from third parties (and no traceback)
    want = hf_greedy(model, tokenizer(PROMPTS[0]).input_ids, 12, OrtGenerator.load(art).eos_token_ids)
    assert json.loads(result.stdout)["tokens"] == want
    streamed = _elision_without_torch(tmp_path, "run", str(art), "--prompt", PROMPTS[0], "-n", "12")
    assert streamed.returncode == 0 and "Warning" not in streamed.stderr and "Traceback" not in streamed.stderr
    assert streamed.stdout.strip() == json.loads(result.stdout)["text"].strip()
    refused = _elision_without_torch(tmp_path, "compile", "builtin:tiny-llama", "-o", str(tmp_path / "out"))
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines() == [refused.stderr.strip()]  # one line, no traceback
    assert "needs PyTorch" in refused.stderr


def test_help_imports_no_heavy_libraries():
    """`elision --help` stays fast: it imports none of torch, transformers, onnxruntime, onnx, triton, sympy."""
    code = ("import sys\n"
            "from elision.cli.main import main\n"
            "assert main(['--help']) == 0\n"
            "heavy = {'torch', 'transformers', 'onnxruntime', 'onnx', 'triton', 'sympy', 'onnxscript'}\n"
            "print(sorted(heavy & {m.split('.')[0] for m in sys.modules}))\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "[]"


def _cli() -> typer.Typer:
    from elision.cli.run import register as register_run
    from elision.cli.generate import register as register_generate

    app = typer.Typer()

    @app.callback()
    def _root() -> None:  # keeps the commands subcommands, as in the real elision app
        pass

    register_run(app)
    register_generate(app)
    return app


def test_cli_run_json_has_generate_keys_and_hf_tokens(tiny, tmp_path):
    model, tokenizer, art = tiny
    app = _cli()
    result = CliRunner().invoke(app, ["run", str(art), "--prompt", PROMPTS[0], "-n", "20", "--json"])
    assert result.exit_code == 0, result.output
    payload = json.loads(result.stdout)
    assert payload["tokens"] == hf_greedy(model, tokenizer(PROMPTS[0]).input_ids, 20, OrtGenerator.load(art).eos_token_ids)
    assert payload["text"] == tokenizer.decode(payload["tokens"], skip_special_tokens=True)
    # `elision generate --json` on the same model directory: same top-level and stats keys
    model_dir = tmp_path / "hf"
    model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    torch_result = CliRunner().invoke(app, ["generate", str(model_dir), "--prompt", PROMPTS[0], "-n", "20", "--json"])
    assert torch_result.exit_code == 0, torch_result.output
    reference = json.loads(torch_result.stdout)
    assert payload.keys() == reference.keys() and payload["stats"].keys() == reference["stats"].keys()
    assert payload["tokens"] == reference["tokens"]
    # streaming (no --json) prints the same text
    streamed = CliRunner().invoke(app, ["run", str(art), "--prompt", PROMPTS[0], "-n", "20", "-d", "lookup"])
    assert streamed.exit_code == 0 and payload["text"] in streamed.stdout


def _copy(art: Path, dest: Path) -> Path:
    shutil.copytree(art, dest)
    return dest


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "the prompt is empty"),
    (["--prompt", "x", "-n", "0"], "--max-new-tokens must be >= 1"),
    (["--prompt", "x", "-d", "layer-skip"], "unknown drafter 'layer-skip' for an ONNX artifact"),
    (["--prompt", "x", "--tree", "static:0x"], "bad static tree template"),
    (["--prompt", "x", "-n", "500"], "cache overflow: a 1-token prompt plus max_new_tokens=500 exceeds"),
    (["--prompt", "def f(x): return x\n" * 40], "is too long: the model's position limit is 128"),
    (["-n", "5"], "need --prompt"),
])
def test_cli_errors_are_one_line(tiny, args, message):
    result = CliRunner().invoke(_cli(), ["run", str(tiny[2]), *args])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output


def test_artifact_without_generation_function_and_tampered_tokenizer(tiny, tmp_path):
    art = tiny[2]
    plain = _copy(art, tmp_path / "plain")
    manifest = json.loads((plain / "manifest.json").read_text())
    manifest["runtime_settings"] = {"kind": "generic"}
    (plain / "manifest.json").write_text(json.dumps(manifest))
    result = CliRunner().invoke(_cli(), ["run", str(plain), "--prompt", "x"])
    assert result.exit_code == 2 and "--for generate" in " ".join(result.output.split()), result.output
    with pytest.raises(GenerationError, match="has no generation function"):
        OrtGenerator.load(plain)

    tampered = _copy(art, tmp_path / "tampered")
    tok = json.loads((tampered / "tokenizer.json").read_text())
    tok["added_tokens"].append({**tok["added_tokens"][0], "id": 99999, "content": "<evil>"})
    (tampered / "tokenizer.json").write_text(json.dumps(tok))
    result = CliRunner().invoke(_cli(), ["run", str(tampered), "--prompt", "x"])
    assert result.exit_code == 2 and "tokenizer.json was modified after export" in " ".join(result.output.split())
    with pytest.raises(ArtifactTamperedError):
        OrtGenerator.load(tampered)


def test_library_errors(tiny):
    gen = OrtGenerator.load(tiny[2], threads=1)
    with pytest.raises(GenerationError, match="outside the vocabulary"):
        gen.generate([1, 10**6], 4)
    with pytest.raises(GenerationError, match="prompt is empty"):
        gen.generate([], 4)
    with pytest.raises(KVCacheOverflowError, match="lower max_new_tokens to at most 126"):
        gen.generate([1, 2], 127)


@pytest.mark.parametrize("args, message", [
    (["builtin:tiny-code-lm", "--emit", "onnx", "--for", "serve"], "--for must be 'generate'"),
    (["builtin:tiny-code-lm", "--emit", "ir", "--for", "generate"], "pass --emit onnx"),
    (["builtin:tiny-code-lm", "--emit", "onnx", "--for", "generate", "--passes", "dce"], "cannot take --passes"),
    (["/nonexistent/model", "--emit", "onnx", "--for", "generate"], "model directory '/nonexistent/model' does not exist"),
])
def test_compile_for_generate_errors(args, message, tmp_path):
    from elision.cli.main import app

    result = CliRunner().invoke(app, ["compile", *args, "-o", str(tmp_path / "out")])
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
