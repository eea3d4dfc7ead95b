"""The ``elision`` command line.

Exit codes: 0 success; 1 an unexpected internal error (a bug: please report it); 2 bad input (model spec, options,
artifact); 3 verification failed (compiled result differs from the original beyond tolerance).
"""
from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from elision.errors import ElisionError

app = typer.Typer(
    name="elision",
    help="Compile PyTorch models so inference does less work: draft-verify trees, layer skipping, token pruning, "
         "sparse volume decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True)
out = Console()

# Modules contributing subcommands through register(app).
COMMAND_MODULES = [
    "elision.cli.inspect",
    "elision.cli.run",
    "elision.cli.generate",
    "elision.cli.tune",
    "elision.cli.shape",
    "elision.cli.serve",
]


def fail(message: str, code: int = 2) -> "typer.Exit":
    console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    return typer.Exit(code)


EMITS = ("ir", "fx", "onnx", "mlir")


def _version(value: bool) -> None:
    if value:
        from elision import __version__

        out.print(f"elision {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit")):
    """elision: compile PyTorch models so inference does less work."""


@app.command("compile")
def compile_cmd(
    model: str = typer.Argument(..., help="Hugging Face model directory, builtin:NAME, or package.module:factory"),
    passes: Optional[str] = typer.Option(None, "--passes", "-p", help="pipeline, e.g. 'canonicalize,cse,dce' (default: the semantics-preserving pipeline)"),
    emit: str = typer.Option("ir", "--emit", help="what to write: ir | fx | onnx | mlir"),
    output: Path = typer.Option(Path("elision-out"), "--output", "-o", help="output directory"),
    verify: bool = typer.Option(False, "--verify", help="run the compiled result and the original on fresh random inputs and compare"),
    verify_ir: bool = typer.Option(False, "--verify-ir", help="verify IR structure and types after every pass"),
    dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write IR before/after every pass into this directory"),
    approximate: bool = typer.Option(False, "--approximate", help="allow passes that change the output on purpose (pruning, skipping)"),
    as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of a report"),
    for_use: Optional[str] = typer.Option(None, "--for", help="'generate': with --emit onnx, a speculative-decoding "
                                          "artifact (step function + tokenizer) for `elision run DIR --prompt`"),
):
    """Trace MODEL, run the pass pipeline, and write the result (IR text, FX code, ONNX artifact or MLIR)."""
    if for_use is not None:
        return _compile_for_generate(model, for_use, emit, passes, output, verify, as_json)
    from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

    from elision.apps.compile.api import default_pipeline
    from elision.frontend.model_spec import load_model
    from elision.frontend.trace import export_to_ir, weights_hash
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline
    if emit not in EMITS:
        raise fail(f"--emit must be one of {', '.join(EMITS)}, got {emit!r}")
    pipeline = default_pipeline() if passes is None else passes
    pm_passes = parse_pipeline(pipeline)  # fail fast on a bad pipeline, before tracing
    result: dict = {"model": model, "emit": emit, "pipeline": ",".join(p.spec() for p in pm_passes)}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=as_json) as progress:
        task = progress.add_task(f"loading {model}")
        lm = load_model(model)
        progress.update(task, description="tracing with torch.export")
        static = [p for p in pm_passes if getattr(p, "static_shapes", False)]
        if static:
            # token pruning changes the sequence length inside the graph: trace (and emit) at the example's length;
            # when every such pass handles a symbolic batch, the spec's batch dim stays dynamic (one artifact
            # serves any batch size)
            keep = BATCH_DIM if all(getattr(p, "dynamic_batch", False) for p in static) else None
            lm.dynamic_dims = _keep_dims(lm.dynamic_dims, keep)
            result["static_shapes"] = _static_shapes(lm.example_inputs, lm.dynamic_dims)
        ir = export_to_ir(lm.model, lm.example_inputs, lm.dynamic_dims, input_names=lm.input_names)
        nodes_before = ir.node_count()
        pm = PassManager(pm_passes, verify_each=verify_ir, check_types=verify_ir, dump_dir=dump_ir,
                         allow_approximate=approximate,
                         progress=lambda name: progress.update(task, description=f"pass {name}"))
        pm.run(ir)
        ir.attrs["pipeline"] = result["pipeline"]
        ir.attrs["source_hash"] = weights_hash(lm.model)
        progress.update(task, description=f"writing {emit}")
        written = _emit(emit, ir, lm, output)
        result.update({"nodes_before": nodes_before, "nodes_after": ir.node_count(), "passes": pm.report(),
                       "written": [str(w) for w in written]})
        if verify:
            progress.update(task, description="verifying on fresh random inputs")
            result["verify"] = _verify(ir, lm, emit, output)
    if as_json:
        out.print_json(json.dumps(result))
    else:
        _print_compile_report(result)
    if verify and not result["verify"]["ok"]:
        raise typer.Exit(3)


BATCH_DIM = "batch"  # the dynamic dim name that token-reduction pipelines keep dynamic


def _keep_dims(dynamic_dims: dict | None, name: str | None) -> dict:
    """`dynamic_dims` ({input: {axis: name}}) reduced to the dims called `name` (none when `name` is None)."""
    kept = {}
    for i, axes in (dynamic_dims or {}).items():
        axes = {a: n for a, n in (axes or {}).items() if name is not None and n == name}
        if axes:
            kept[i] = axes
    return kept


def _static_shapes(example_inputs, dynamic_dims: dict) -> list[list]:
    """The traced input shapes, with the dims left dynamic spelled by name."""
    shapes = []
    for i, x in enumerate(example_inputs):
        if not hasattr(x, "shape"):
            continue
        dyn = dynamic_dims.get(i) or dynamic_dims.get(str(i)) or {}
        names = {int(a): n for a, n in dyn.items()}
        shapes.append([names.get(a, int(d)) for a, d in enumerate(x.shape)])
    return shapes


def _compile_for_generate(model: str, for_use: str, emit: str, passes: Optional[str], output: Path, verify: bool,
                          as_json: bool) -> None:
    if for_use != "generate":
        raise fail(f"--for must be 'generate', got {for_use!r}")
    if emit != "onnx":
        raise fail(f"--for generate writes an ONNX artifact: pass --emit onnx (got --emit {emit})")
    if passes is not None or verify:
        raise fail("--for generate uses the fixed speculative-decoding pipeline and cannot take --passes or --verify; "
                   "check the artifact with `elision run DIR --prompt TEXT`")
    from elision.apps.specdec.artifact import export_generation_artifact

    with console.status(f"loading {model}") as status:
        try:
            result = export_generation_artifact(model, output, progress=status.update)
        except ValueError as e:
            raise fail(str(e)) from None
    result = {"model": model, "emit": emit, "for": for_use, **result}
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"generation artifact for {model} (pipeline {result['pipeline']})")
    for w in result["written"]:
        out.print(f"wrote {w}")
    out.print(f"run it with: elision run {output} --prompt TEXT")


def _emit(emit: str, ir, lm, output: Path) -> list[Path]:
    output.mkdir(parents=True, exist_ok=True)
    if emit == "ir":
        from elision.ir.serialize import save_module

        save_module(ir, output)
        return [output / "module.ir", output / "params.safetensors"]
    if emit == "fx":
        from elision.ir.execute import to_fx
        from elision.ir.serialize import save_module

        save_module(ir, output)
        files = []
        for name in ir.functions:
            gm = to_fx(ir, name)
            path = output / f"{name}.py"
            path.write_text(f"# FX code of IR function @{name} (parameters: params.safetensors)\n" + gm.code)
            files.append(path)
        return files
    if emit == "onnx":
        from elision.lowering.emit import emit_onnx

        return emit_onnx(ir, lm, output)
    if emit == "mlir":
        from elision.lowering.emit import emit_mlir

        return emit_mlir(ir, lm, output)
    raise ElisionError(f"unknown --emit {emit!r}")


def _verify(ir, lm, emit: str, output: Path) -> dict:
    import torch

    from elision.apps.compile.api import _takes_use_cache
    from elision.apps.compile.numerics import compare, fresh_inputs, primary
    from elision.ir.execute import to_fx

    high = getattr(getattr(lm.model, "config", None), "vocab_size", None)
    inputs = fresh_inputs(lm.example_inputs, lm.dynamic_dims, high=high)
    with torch.no_grad():
        want = primary(lm.model(*inputs, use_cache=False) if _takes_use_cache(lm.model) else lm.model(*inputs))
        if emit == "onnx":
            from elision.lowering.emit import run_onnx_artifact

            got = run_onnx_artifact(output, "forward", inputs)[0]
        else:
            got = to_fx(ir, "forward")(*inputs)[0]
    cmp = compare(got, want)
    return {**cmp.as_dict(), "inputs": [list(x.shape) for x in inputs]}


def _print_compile_report(result: dict) -> None:
    from rich.table import Table

    t = Table(title=f"elision compile {result['model']}", show_lines=False)
    t.add_column("pass")
    t.add_column("nodes", justify="right")
    t.add_column("ms", justify="right")
    for r in result["passes"]:
        t.add_row(r["name"], f"{r['nodes_before']} -> {r['nodes_after']}", f"{r['seconds'] * 1e3:.1f}")
    out.print(t)
    out.print(f"nodes: {result['nodes_before']} -> {result['nodes_after']}")
    if result.get("static_shapes"):
        shapes = ", ".join("[" + ", ".join(str(d) for d in s) + "]" for s in result["static_shapes"])
        dynamic = sorted({d for s in result["static_shapes"] for d in s if isinstance(d, str)})
        why = "the pipeline needs static shapes" + (f"; {', '.join(dynamic)} stays dynamic" if dynamic else "")
        out.print(f"exported at fixed input shapes [{shapes}] ({why})", markup=False)
    for w in result["written"]:
        out.print(f"wrote {w}")
    if "verify" in result:
        v = result["verify"]
        status = "[green]OK[/]" if v["ok"] else "[red]FAILED[/]"
        out.print(f"verify on fresh inputs {v['inputs']}: max abs error {v['max_abs_error']:.3g}, "
                  f"max rel error {v['max_rel_error']:.3g} (tolerance {v['tolerance']:g}) {status}")


def _register_commands() -> None:
    for name in COMMAND_MODULES:
        try:
            mod = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name is not None and name.startswith(e.name):
                continue  # that capability is not installed in this build
            raise
        mod.register(app)


_register_commands()


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: user errors print one line and exit 2/3; nothing prints a traceback but bugs."""
    try:
        app(args=argv, prog_name="elision", standalone_mode=True)
    except ElisionError as e:
        console.print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        return e.exit_code
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    return 0


def run_main() -> None:
    sys.exit(main())


if __name__ == "__main__":
    run_main()
