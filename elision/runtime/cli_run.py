"""`elision run DIR --input name=file.npy ...`: run an ONNX artifact with onnxruntime alone.

Torch-free like `elision.runtime.ort`: this command works where only numpy and onnxruntime are installed.

Causal-LM artifacts will also take `--prompt TEXT`; the generation loop that drives the step graphs
registers itself with `register_prompt_runner(kind, runner)` (e.g. from `elision.runtime.specdec`), and
this command dispatches on the manifest's `runtime_settings["kind"]`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import typer
from rich.console import Console
from rich.table import Table

from elision.runtime.ort import Artifact, ArtifactError, load_artifact

__all__ = ["register", "register_prompt_runner", "run_artifact_command"]

# kind -> runner(artifact, prompt, options) -> dict printed as the result (JSON-serializable)
PromptRunner = Callable[[Artifact, str, dict], dict]
_PROMPT_RUNNERS: dict[str, PromptRunner] = {}
# modules that may register a prompt runner when imported (absent ones are skipped)
_PROMPT_RUNNER_MODULES = ("elision.runtime.specdec.ort_generate",)

_JSON_VALUE_LIMIT = 4096  # outputs with more elements are summarized in --json (use --save for the data)

_err = Console(stderr=True)
_out = Console()


def register_prompt_runner(kind: str, runner: PromptRunner) -> None:
    """Make `elision run DIR --prompt TEXT` work for artifacts whose runtime_settings kind is `kind`."""
    _PROMPT_RUNNERS[kind] = runner


def _fail(message: str) -> typer.Exit:
    _err.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(2)


def _parse_inputs(pairs: list[str]) -> dict[str, np.ndarray]:
    inputs: dict[str, np.ndarray] = {}
    for pair in pairs:
        name, sep, file = pair.partition("=")
        if not sep or not name or not file:
            raise _fail(f"--input expects NAME=FILE.npy, got {pair!r}")
        path = Path(file)
        if not path.is_file():
            raise _fail(f"input file {path} for {name!r} does not exist")
        try:
            inputs[name] = np.load(path, allow_pickle=False)
        except (ValueError, OSError) as e:
            raise _fail(f"cannot read {path} as a .npy array ({str(e).splitlines()[0]}); save it with numpy.save") from None
        if not isinstance(inputs[name], np.ndarray):
            raise _fail(f"{path} holds several arrays (.npz); pass one .npy file per input")
    return inputs


def _choose_function(artifact: Artifact, function: Optional[str]) -> str:
    if function is not None:
        if function not in artifact.functions:
            raise _fail(f"artifact has no function {function!r}; functions: {', '.join(artifact.functions)}")
        return function
    if len(artifact.functions) == 1:
        return next(iter(artifact.functions))
    if "forward" in artifact.functions:
        return "forward"
    raise _fail(f"artifact has several functions ({', '.join(artifact.functions)}); pick one with --function")


def _summary(value: np.ndarray, with_values: bool) -> dict[str, Any]:
    info: dict[str, Any] = {"dtype": str(value.dtype), "shape": list(value.shape)}
    if value.size and value.dtype.kind in "fiub":
        as_float = value.astype(np.float64)
        info.update(min=float(as_float.min()), max=float(as_float.max()), mean=float(as_float.mean()))
    if with_values and value.size <= _JSON_VALUE_LIMIT:
        info["values"] = value.tolist()
    return info


def _load_prompt_runners() -> None:
    import importlib

    for name in _PROMPT_RUNNER_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is None or not name.startswith(e.name):
                raise


def run_artifact_command(
    artifact_dir: Path,
    inputs: list[str],
    function: Optional[str],
    prompt: Optional[str],
    as_json: bool,
    save: Optional[Path],
    providers: Optional[str],
    threads: Optional[int],
    no_verify: bool,
) -> dict[str, Any]:
    """The command body, callable from Python (returns the result dict the command prints)."""
    try:
        artifact = load_artifact(
            artifact_dir,
            providers=[p.strip() for p in providers.split(",")] if providers else None,
            verify=not no_verify,
            threads=threads,
        )
    except ArtifactError as e:
        raise _fail(str(e)) from None
    if prompt is not None:
        kind = str(artifact.runtime_settings.get("kind", "generic"))
        _load_prompt_runners()
        if kind not in _PROMPT_RUNNERS:
            raise _fail(f"--prompt needs a generation loop for artifacts of kind {kind!r}, and none is installed; "
                        f"run a single function with --input NAME=FILE.npy instead")
        if inputs:
            raise _fail("pass either --prompt or --input, not both")
        return {"prompt": prompt, **_PROMPT_RUNNERS[kind](artifact, prompt, {"threads": threads})}
    if not inputs:
        raise _fail("no inputs: pass --input NAME=FILE.npy for each input (" + artifact.describe().split("\n", 1)[-1].strip() + ")")
    fn = _choose_function(artifact, function)
    feeds = _parse_inputs(inputs)
    try:
        outputs = artifact.run(fn, **feeds)
    except ArtifactError as e:
        raise _fail(str(e)) from None
    saved = {}
    if save is not None:
        save.mkdir(parents=True, exist_ok=True)
        for name, value in outputs.items():
            np.save(save / f"{name}.npy", value)
            saved[name] = str(save / f"{name}.npy")
    return {
        "artifact": str(artifact_dir),
        "function": fn,
        "providers": artifact.providers,
        "outputs": {name: _summary(value, with_values=as_json) for name, value in outputs.items()},
        "saved": saved,
    }


def _print_table(result: dict[str, Any]) -> None:
    table = Table(title=f"{result['artifact']} :: {result['function']} ({', '.join(result['providers'])})")
    for column in ("output", "dtype", "shape", "min", "max", "mean"):
        table.add_column(column, justify="right" if column in ("min", "max", "mean") else "left")
    for name, info in result["outputs"].items():
        stats = [f"{info[k]:.5g}" if k in info else "" for k in ("min", "max", "mean")]
        table.add_row(name, info["dtype"], str(info["shape"]), *stats)
    _out.print(table)
    for name, path in result["saved"].items():
        _out.print(f"saved {name} -> {path}")


def register(app: typer.Typer) -> None:
    @app.command("run")
    def run_cmd(
        artifact_dir: Path = typer.Argument(..., help="artifact directory written by `elision compile --emit onnx`"),
        inputs: list[str] = typer.Option([], "--input", "-i", help="NAME=FILE.npy, once per function input"),
        function: Optional[str] = typer.Option(None, "--function", "-f", help="function to run (default: the only one, or forward)"),
        prompt: Optional[str] = typer.Option(None, "--prompt", help="text prompt (causal-LM artifacts with a generation loop)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object (values included for small outputs)"),
        save: Optional[Path] = typer.Option(None, "--save", help="directory to write each output as NAME.npy"),
        providers: Optional[str] = typer.Option(None, "--providers", help="comma-separated ORT providers (default: CUDA if available, else CPU)"),
        threads: Optional[int] = typer.Option(None, "--threads", help="ORT intra-op threads"),
        no_verify: bool = typer.Option(False, "--no-verify", help="skip the sha256 check of the artifact files"),
    ) -> None:
        """Run one function of an ONNX artifact with onnxruntime (no torch needed)."""
        result = run_artifact_command(artifact_dir, inputs, function, prompt, as_json, save, providers, threads, no_verify)
        if as_json:
            _out.print_json(json.dumps(result))
        elif "outputs" in result:
            _print_table(result)
        else:
            _out.print(result)
