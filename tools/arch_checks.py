"""The architecture-coverage checks: what a user runs on a model directory, run through the real CLI in-process.

For one saved model directory (`tools/arch_zoo.py`), `check_model` runs

  inspect      `elision inspect DIR --json`                              -> the model map's kind
  verify_fx    `elision compile DIR --emit fx --verify --verify-ir`      (default pipeline, compiled == eager)
  verify_onnx  `elision compile DIR --emit onnx --verify --verify-ir`
  and for causal LMs, against Hugging Face greedy `generate` on the same directory:
  specdec_torch  `elision generate DIR --prompt P --json`                (token-identical)
  specdec_ort    `elision compile DIR --emit onnx --for generate` + `elision run ART --prompt P --json`

Each check ends in one status: ok, unmapped (inspect only: the model map did not recognize
the layers), refused (exit 2: elision's one-line error says what it does not support),
mismatch (exit 3, or tokens that differ from HF greedy), bug (exit 1 / a traceback: an elision bug) or skipped
(an earlier stage failed). The detail is the CLI's own one-line error, or where a bug was raised.
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

OK, REFUSED, MISMATCH, BUG, SKIPPED = "ok", "refused", "mismatch", "bug", "skipped"
UNMAPPED = "unmapped"  # inspect ran, but the model map did not recognize the layers (kind unknown)
PROMPT = "def parse(line):\n    return line.split(',')"
NEW_TOKENS = 24
COMPILE_CHECKS = ("inspect", "verify_fx", "verify_onnx")
SPECDEC_CHECKS = ("specdec_torch", "specdec_ort")


@dataclass
class CheckResult:
    status: str
    detail: str = ""
    seconds: float = 0.0


@dataclass
class ModelReport:
    model_type: str
    kind: str  # the zoo's kind (causal-lm, text-encoder, vision)
    checks: dict[str, CheckResult] = field(default_factory=dict)

    @property
    def works(self) -> bool:
        return all(c.status == OK for c in self.checks.values())

    def as_dict(self) -> dict:
        return {"model_type": self.model_type, "kind": self.kind, "works": self.works,
                "checks": {k: asdict(v) for k, v in self.checks.items()}}


@dataclass
class CliRun:
    code: int
    out: dict | None  # the --json object printed on stdout (None if none)
    error: str  # the one-line error, or where an internal error was raised


def run_cli(argv: list[str]) -> CliRun:
    """`elision ARGV` in this process (the console script's `main`), stdout/stderr captured."""
    from elision.cli.main import main

    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(argv))
    except Exception as e:  # noqa: BLE001 - an exception escaping main is an elision bug: record where it was raised
        frame = traceback.extract_tb(e.__traceback__)[-1]
        where = f"{Path(frame.filename).name}:{frame.lineno}"
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return CliRun(1, None, f"{type(e).__name__} at {where}: {first}")
    obj = _last_json(out.getvalue())
    error = (obj or {}).get("error") or _error_line(err.getvalue())
    return CliRun(code, obj, error)


def _last_json(text: str) -> dict | None:
    """The JSON object a --json command printed (rich may pretty-print it over several lines)."""
    text = text.strip()
    start = text.find("{")
    while start != -1:
        try:
            return json.loads(text[start:])
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
    return None


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    return (errors or lines or [""])[-1][:400]


def _status(run: CliRun) -> str:
    if "IR is invalid after pass" in run.error:  # the IR verifier caught a bad rewrite: a bug, not a refusal
        return BUG
    return {0: OK, 2: REFUSED, 3: MISMATCH}.get(run.code, BUG)


def _timed(fn, *args) -> CheckResult:
    t0 = time.perf_counter()
    result = fn(*args)
    result.seconds = round(time.perf_counter() - t0, 2)
    return result


# ------------------------------------------------------------------------------------------------ the checks
def check_inspect(model_dir: Path) -> CheckResult:
    run = run_cli(["inspect", str(model_dir), "--json"])
    if run.code != 0 or run.out is None:
        return CheckResult(_status(run) if run.code else BUG, run.error or "no JSON report")
    kind, layers = run.out.get("kind"), run.out.get("num_layers")
    if kind == "unknown" or not layers:
        notes = run.out.get("unrecognized") or ["no layers found"]
        return CheckResult(UNMAPPED, f"kind {kind}, {layers} layers: {notes[0]}")
    return CheckResult(OK, f"{kind}, {layers} layers")


def check_verify(model_dir: Path, emit: str, work: Path) -> CheckResult:
    """Default pipeline, IR verified after every pass, compiled result compared with eager on fresh inputs."""
    run = run_cli(["compile", str(model_dir), "--emit", emit, "-o", str(work / f"out-{emit}"), "--verify",
                   "--verify-ir", "--json"])
    if run.code not in (0, 3) or run.out is None:
        return CheckResult(_status(run) if run.code else BUG, run.error or "no JSON report")
    v = run.out["verify"]
    detail = (f"{run.out['nodes_before']}->{run.out['nodes_after']} nodes, max abs err {v['max_abs_error']:.2g} "
              f"(tol {v['tolerance']:g})")
    return CheckResult(OK if v["ok"] else MISMATCH, detail)


def hf_greedy(model_dir: Path, prompt: str = PROMPT, max_new_tokens: int = NEW_TOKENS) -> list[int]:
    """Hugging Face's own greedy decoding of `prompt` from the directory: the reference token sequence."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(model_dir, local_files_only=True, dtype="float32").eval()
    ids = tokenizer(prompt, return_tensors="pt").input_ids
    eos = tokenizer.eos_token_id
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens,
                             eos_token_id=eos, pad_token_id=eos)
    return out[0, ids.shape[1]:].tolist()


def _compare_tokens(run: CliRun, want: list[int]) -> CheckResult:
    if run.code != 0 or run.out is None:
        return CheckResult(_status(run) if run.code else BUG, run.error or "no JSON result")
    got = run.out["tokens"]
    if got == want:
        stats = run.out.get("stats", {})
        return CheckResult(OK, f"{len(got)} tokens identical, mean accepted {stats.get('mean_accepted_length', 0):.2f}")
    first = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return CheckResult(MISMATCH, f"differs from HF greedy at new token {first} ({len(got)} vs {len(want)} tokens)")


def check_specdec_torch(model_dir: Path, want: list[int]) -> CheckResult:
    run = run_cli(["generate", str(model_dir), "--prompt", PROMPT, "--max-new-tokens", str(len(want) or NEW_TOKENS),
                   "--json"])
    return _compare_tokens(run, want)


def check_specdec_ort(model_dir: Path, want: list[int], work: Path) -> CheckResult:
    artifact = work / "gen"
    built = run_cli(["compile", str(model_dir), "--emit", "onnx", "--for", "generate", "-o", str(artifact), "--json"])
    if built.code != 0:
        return CheckResult(_status(built), built.error)
    form = (built.out or {}).get("form", "?")
    result = _compare_tokens(run_cli(["run", str(artifact), "--prompt", PROMPT, "--max-new-tokens",
                                      str(len(want) or NEW_TOKENS), "--json"]), want)
    fallback = (built.out or {}).get("step_lowering")
    result.detail = f"{form}: {result.detail}" + (f" (step lowering refused: {fallback})" if fallback else "")
    return result


def check_model(arch, work: Path, progress=None) -> ModelReport:
    """Save `arch` (an `arch_zoo.Arch`) under `work` and run every check on it; `progress(check name)` before each."""
    from tools.arch_zoo import save_model_dir

    step = progress or (lambda _name: None)
    os.environ.setdefault("ELISION_VERIFY_IR", "1")  # every pass manager (kv-cache, tree-verify too) verifies the IR
    report = ModelReport(arch.model_type, arch.kind)
    work = Path(work)
    model_dir = save_model_dir(arch, work / "model")
    step("inspect")
    report.checks["inspect"] = _timed(check_inspect, model_dir)
    for emit in ("fx", "onnx"):
        step(f"verify_{emit}")
        report.checks[f"verify_{emit}"] = _timed(check_verify, model_dir, emit, work)
    if not arch.is_causal_lm:
        return report
    step("hf greedy")
    want = hf_greedy(model_dir)
    step("specdec_torch")
    report.checks["specdec_torch"] = _timed(check_specdec_torch, model_dir, want)
    step("specdec_ort")
    report.checks["specdec_ort"] = _timed(check_specdec_ort, model_dir, want, work)
    return report
