"""`elision run DIR --input name=file.npy ...`: run an ONNX artifact with onnxruntime alone.

Torch-free like `elision.runtime.artifact`: this command works where only numpy and onnxruntime are installed.

Generation artifacts (`elision compile MODEL --emit onnx --for generate`) take `--prompt TEXT` instead: this command
dispatches on the manifest's `runtime_settings["kind"]` to the runner of that kind (`prompt_runners()`).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from elision.cli import failures, options
from elision.runtime.outputs import atomic_directory, check_output_dir

if TYPE_CHECKING:
    import numpy as np

    from elision.runtime.artifact import Artifact

__all__ = ["prompt_runners", "register", "run_artifact_command"]

# kind -> runner(artifact, prompt, options) -> dict printed as the result (JSON-serializable)
PromptRunner = Callable[["Artifact", str, dict], dict]


def prompt_runners() -> dict[str, PromptRunner]:
    """The generation loops `--prompt` can drive, by artifact kind."""
    # lazy: the loop's sessions load onnxruntime (~0.3-0.7 s), which `elision --help` must not pay
    from elision.runtime.generation.ort_generator import GENERATION_KIND, run_prompt

    return {GENERATION_KIND: run_prompt}

_JSON_VALUE_LIMIT = 4096  # outputs with more elements are summarized in --json (use --save for the data)

_err = Console(stderr=True, emoji=False)  # artifact paths and outputs are user text, never :emoji: codes
_out = Console(emoji=False)
_fail = failures.fail


def _parse_inputs(pairs: list[str]) -> dict[str, np.ndarray]:
    import numpy as np  # lazy: `elision --help` stays fast

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
    import numpy as np  # lazy: `elision --help` stays fast

    info: dict[str, Any] = {"dtype": str(value.dtype), "shape": list(value.shape)}
    if value.size and value.dtype.kind in "fiub":
        as_float = value.astype(np.float64)
        info.update(min=float(as_float.min()), max=float(as_float.max()), mean=float(as_float.mean()))
    if with_values and value.size <= _JSON_VALUE_LIMIT:
        info["values"] = value.tolist()
    return info


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
    generation: Optional[dict] = None,
) -> dict[str, Any]:
    """The command body, callable from Python (returns the result dict the command prints).

    generation: options of the prompt runner (max_new_tokens, drafter, tree, stop, stream, and the sampling
    options do_sample, temperature, top_k, top_p, seed).
    """
    # lazy: numpy and onnxruntime would add ~0.3 s to every `elision --help`
    import numpy as np
    from elision.runtime.artifact import ArtifactError, load_artifact, read_manifest

    if prompt is not None:
        failures.check_prompt(prompt)
    if save is not None:
        check_output_dir(save, "--save directory", marker="*.npy")
    try:
        if threads is None and prompt is not None:
            manifest = read_manifest(artifact_dir)
            if manifest.get("runtime_settings", {}).get("kind") in prompt_runners():
                # the count calibrated as fastest on this machine (lazy: see prompt_runners)
                from elision.runtime.generation.ort_generator import default_threads

                threads = default_threads(manifest)
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
        runners = prompt_runners()
        if kind not in runners:
            raise _fail(f"--prompt needs a generation loop for artifacts of kind {kind!r}, and none is installed; "
                        f"run a single function with --input NAME=FILE.npy instead, or compile a generation artifact "
                        f"with `elision compile MODEL --emit onnx --for generate -o DIR`")
        if inputs:
            raise _fail("pass either --prompt or --input, not both")
        try:
            return runners[kind](artifact, prompt, {"threads": threads, **(generation or {})})
        except ArtifactError as e:
            raise _fail(str(e)) from None
    if generation and any(v is not None for k, v in generation.items() if k != "stream"):
        raise _fail("--max-new-tokens, --drafter, --tree, --stop and the sampling options (--sample, --temperature, "
                    "--top-k, --top-p, --seed) need --prompt (a generation artifact)")
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
        with atomic_directory(save, marker="*.npy", what="--save directory") as tmp:
            for name, value in outputs.items():
                np.save(tmp / f"{name}.npy", value)
                saved[name] = str(save / f"{name}.npy")
    return {
        "artifact": str(artifact_dir),
        "function": fn,
        "providers": artifact.providers,
        "outputs": {name: _summary(value, with_values=as_json) for name, value in outputs.items()},
        "saved": saved,
    }


def _stream_to_stdout(piece: str) -> None:
    # raw text, not through rich: rich drops control characters such as \r that generated code may contain
    if piece:
        sys.stdout.write(piece)
        sys.stdout.flush()


def _print_table(result: dict[str, Any]) -> None:
    table = Table(title=escape(f"{result['artifact']} :: {result['function']} ({', '.join(result['providers'])})"))
    for column in ("output", "dtype", "shape", "min", "max", "mean"):
        table.add_column(column, justify="right" if column in ("min", "max", "mean") else "left")
    for name, info in result["outputs"].items():
        stats = [f"{info[k]:.5g}" if k in info else "" for k in ("min", "max", "mean")]
        table.add_row(escape(name), info["dtype"], str(info["shape"]), *stats)
    _out.print(table)
    for name, path in result["saved"].items():
        _out.print(f"saved {name} -> {path}", markup=False)


def register(app: typer.Typer) -> None:
    @app.command("run")
    @failures.command
    def run_cmd(
        artifact_dir: Path = typer.Argument(..., help="artifact directory written by `elision compile --emit onnx`"),
        inputs: list[str] = typer.Option([], "--input", "-i", help="NAME=FILE.npy, once per function input"),
        function: Optional[str] = typer.Option(None, "--function", "-f", help="function to run (default: the only one, or forward)"),
        prompt: Optional[str] = typer.Option(None, "--prompt", help="text prompt (causal-LM artifacts with a generation loop)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object (values included for small outputs)"),
        save: Optional[Path] = typer.Option(None, "--save", help="directory to write each output as NAME.npy"),
        providers: Optional[str] = typer.Option(None, "--providers", help="comma-separated onnxruntime execution providers (default: CUDA if available, else CPU)"),
        threads: Optional[int] = options.THREADS,
        device: Optional[str] = options.DEVICE,
        no_verify: bool = typer.Option(False, "--no-verify", help="skip the sha256 check of the artifact files"),
        max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", "-n", help="with --prompt: tokens to generate (default 64)"),
        drafter: Optional[str] = typer.Option(None, "--drafter", "-d", help="with --prompt: lookup, recycling, copy, none, or a '+' combination (default recycling+lookup)"),
        tree: Optional[str] = typer.Option(None, "--tree", help="with --prompt: 'dynamic' or 'static:<template>' (chain-4, 4x2x1, ...)"),
        stop: Optional[list[str]] = typer.Option(None, "--stop", help="with --prompt: stop string (repeatable)"),
        do_sample: bool = typer.Option(False, "--sample/--greedy", help="with --prompt: sample (lossless rejection sampling) or greedy"),
        temperature: Optional[float] = typer.Option(None, "--temperature", help="with --sample: softmax temperature > 0 (default 1)"),
        top_k: Optional[int] = typer.Option(None, "--top-k", help="with --sample: keep the k most likely tokens (default 0: off)"),
        top_p: Optional[float] = typer.Option(None, "--top-p", help="with --sample: nucleus mass in (0, 1] (default 1: off)"),
        seed: Optional[int] = typer.Option(None, "--seed", help="with --sample: random seed (a run reproduces with a static --tree)"),
    ) -> None:
        """Run one function of an ONNX artifact with onnxruntime (no torch needed), or generate text from a
        generation artifact with --prompt (speculative decoding: output identical to the model's greedy decoding,
        or with --sample drawn from exactly the model's sampling distribution)."""
        if prompt is not None and not prompt:
            raise _fail("the prompt is empty: pass some text with --prompt")
        if prompt is not None:
            failures.check_prompt(prompt)
        if max_new_tokens is not None and max_new_tokens < 1:
            raise _fail(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if device is not None:
            if providers:
                raise _fail("pass either --device or --providers, not both")
            providers = ",".join(options.ort_providers(device))
        streaming = prompt is not None and not as_json
        generation = {"max_new_tokens": max_new_tokens, "drafter": drafter, "tree": tree, "stop": stop or None,
                      # None, not False, when greedy: a set option without --prompt is an error below
                      "do_sample": True if do_sample else None, "temperature": temperature, "top_k": top_k,
                      "top_p": top_p, "seed": seed, "stream": _stream_to_stdout if streaming else None}
        result = run_artifact_command(artifact_dir, inputs, function, prompt, as_json, save, providers, threads, no_verify,
                                      generation)
        if "stats" in result:  # generated text: the same output as `elision generate`
            if as_json:
                print(json.dumps({"tokens": result["tokens"], "text": result["text"], "stats": result["stats"]}))
            else:
                sys.stdout.write("\n")
                s = result["stats"]
                _err.print(f"[dim]{s['new_tokens']} tokens, {s['tokens_per_s']:.1f} tok/s, {s['forward_passes']} forward passes, "
                           f"mean accepted length {s['mean_accepted_length']:.2f} ({escape(str(s['drafter']))}, tree {escape(str(s['tree']))}, onnxruntime"
                           f"{', sampling' if do_sample else ''})[/]")
        elif as_json:
            _out.print_json(json.dumps(result))
        elif "outputs" in result:
            _print_table(result)
        else:
            _out.print(result)
