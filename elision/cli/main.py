"""The ``elision`` command line.

Exit codes: 0 success; 1 an unexpected internal error (a bug: please report it); 2 bad input (model spec, options,
artifact); 3 verification failed (compiled result differs from the original beyond tolerance).
"""
from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from elision import __version__
from elision.cli import failures, generate, missing_torch, options, passes, quiet, run, serve, shape, tune
from elision.cli import inspect as inspect_command  # not the standard library's inspect
from elision.errors import ElisionError, missing_extra, require_extra
from elision.runtime.outputs import check_output_dir

app = typer.Typer(
    name="elision",
    help="Compile PyTorch models so inference does less work: draft-verify trees, layer skipping, token pruning, "
         "sparse volume decoding.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
console = Console(stderr=True, emoji=False)  # user text (specs, paths) may contain :codes:
out = Console(emoji=False)



def fail(message: str, code: int = 2) -> "typer.Exit":
    """Report one error line (or the --json error object) and return the typer.Exit to raise."""
    return failures.fail(message, code)


EMITS = ("ir", "fx", "onnx", "mlir")


def _version(value: bool) -> None:
    if value:
        out.print(f"elision {__version__}")
        raise typer.Exit(0)


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="print the version and exit"),
          verbose: bool = typer.Option(False, "--verbose", help="show third-party warnings, log lines and progress bars")):
    """elision: compile PyTorch models so inference does less work."""
    if not verbose:
        quiet.hide_third_party_noise()


@app.command("compile")
@failures.command
def compile_cmd(
    model: str = typer.Argument(..., help="Hugging Face model directory or Hub id (org/name), builtin:NAME, or "
                                          "package.module:factory (needs --trust-code)"),
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
    trust_code: bool = options.TRUST_CODE,
    dtype: str = options.DTYPE,
    device: str = options.DEVICE,
    threads: Optional[int] = options.THREADS,
):
    """Trace MODEL, run the pass pipeline, and write the result (IR text, FX code, ONNX artifact or MLIR)."""
    if for_use is not None:
        # traced, checked and calibrated on the CPU whatever --device says (torch needs no CUDA for that, and the
        # graph is the same for every provider): --device orders the execution providers the manifest lists, which
        # `elision run` follows by default
        return _compile_for_generate(model, for_use, emit, passes, output, verify, as_json,
                                     options.placement(dtype, None, threads), options.check_device(device))
    placement = options.placement(dtype, device, threads)
    # lazy: these import torch, which `elision --help` must not pay for
    from elision.apps.compile.api import check_pipeline
    from elision.frontend.model_spec import load_model
    from elision.frontend.trace import export_to_ir, weights_hash
    from elision.lowering.emit import emit as emit_output, output_marker
    from elision.passes.manager import PassManager

    if emit not in EMITS:
        raise fail(f"--emit must be one of {', '.join(EMITS)}, got {emit!r}")
    if emit == "mlir":
        require_extra("mlir", "elision compile --emit mlir")
    # fail fast, before loading and tracing: a bad pipeline, an approximate pass without --approximate, a bad -o
    pm_passes = check_pipeline(passes, approximate)
    check_output_dir(output, "output directory (-o)", marker=output_marker(emit))
    if dump_ir is not None:
        check_output_dir(dump_ir, "--dump-ir directory")
    result: dict = {"model": model, "emit": emit, "pipeline": ",".join(p.spec() for p in pm_passes),
                    "dtype": dtype, "device": device}
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn(), console=console,
                  transient=True, disable=as_json or not console.is_terminal) as progress:
        task = progress.add_task(f"loading {escape(model)}")
        lm = load_model(model, trust_code=trust_code, placement=placement)
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
                         progress=lambda name: progress.update(task, description=f"pass {escape(name)}"))
        pm.run(ir)
        ir.attrs["pipeline"] = result["pipeline"]
        ir.attrs["source_hash"] = weights_hash(lm.model)
        progress.update(task, description=f"writing {emit}")
        written = emit_output(emit, ir, lm, output)
        result.update({"nodes_before": nodes_before, "nodes_after": ir.node_count(), "passes": pm.report(),
                       "written": [str(w) for w in written]})
        if verify:
            progress.update(task, description="verifying on fresh random inputs")
            result["verify"] = _verify(ir, lm, emit, output, placement)
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
                          as_json: bool, placement, device: Optional[str]) -> None:
    if for_use != "generate":
        raise fail(f"--for must be 'generate', got {for_use!r}")
    if emit != "onnx":
        raise fail(f"--for generate writes an ONNX artifact: pass --emit onnx (got --emit {emit})")
    if passes is not None or verify:
        raise fail("--for generate uses the fixed speculative-decoding pipeline and cannot take --passes or --verify; "
                   "check the artifact with `elision run DIR --prompt TEXT`")
    # lazy: torch and onnxruntime, which `elision --help` must not pay for
    from elision.apps.specdec.artifact import export_generation_artifact
    from elision.runtime.artifact import MANIFEST_NAME

    check_output_dir(output, "output directory (-o)", marker=MANIFEST_NAME)
    with console.status(f"loading {escape(model)}") as status:
        try:
            result = export_generation_artifact(model, output, progress=lambda text: status.update(escape(text)),
                                                placement=placement, device=device)
        except ValueError as e:
            raise fail(str(e)) from None
    result = {"model": model, "emit": emit, "for": for_use, "dtype": placement.dtype, **result}
    if as_json:
        out.print_json(json.dumps(result))
        return
    out.print(f"generation artifact for {model} in {placement.dtype} (pipeline {result['pipeline']})", markup=False)
    for w in result["written"]:
        out.print(f"wrote {w}", markup=False)
    out.print(f"run it with: elision run {output} --prompt TEXT", markup=False)


def _verify(ir, lm, emit: str, output: Path, placement) -> dict:
    # lazy: torch, which `elision --help` must not pay for
    import torch
    from elision.apps.compile.api import _takes_use_cache
    from elision.apps.compile.numerics import compare, fresh_inputs, primary
    from elision.ir.execute import to_fx

    high = getattr(getattr(lm.model, "config", None), "vocab_size", None)
    inputs = placement.place_inputs(fresh_inputs(lm.example_inputs, lm.dynamic_dims, high=high))
    with torch.no_grad():
        want = primary(lm.model(*inputs, use_cache=False) if _takes_use_cache(lm.model) else lm.model(*inputs))
        if emit == "onnx":
            from elision.lowering.emit import run_onnx_artifact  # lazy: torch and onnxruntime

            got = run_onnx_artifact(output, "forward", inputs)[0].to(want.device)
        else:
            got = to_fx(ir, "forward")(*inputs)[0]
    cmp = compare(got, want)
    return {**cmp.as_dict(), "inputs": [list(x.shape) for x in inputs]}


def _print_compile_report(result: dict) -> None:
    t = Table(title=f"elision compile {escape(result['model'])}", show_lines=False)
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
        out.print(f"wrote {w}", markup=False)
    if "verify" in result:
        v = result["verify"]
        status = "[green]OK[/]" if v["ok"] else "[red]FAILED[/]"
        out.print(f"verify on fresh inputs {v['inputs']}: max abs error {v['max_abs_error']:.3g}, "
                  f"max rel error {v['max_rel_error']:.3g} (tolerance {v['tolerance']:g}) {status}")


# The other commands, one module each, in the order --help lists them (compile, above, comes first).
for _command in (inspect_command, run, generate, tune, shape, serve, passes):
    _command.register(app)


def main(argv: list[str] | None = None) -> int:
    """Console-script entry: user errors print one line (with --json: one JSON object on stdout) and exit 2/3,
    Ctrl-C prints one line and exits 130; nothing prints a traceback but bugs."""
    args = list(sys.argv[1:] if argv is None else argv)
    command = typer.main.get_command(app)
    token = failures.json_errors(_json_requested(command, args))
    reported = failures.reported()
    try:
        result = command.main(args=args, prog_name="elision", standalone_mode=False)
        if result == failures.INTERRUPTED and failures.reported() == reported:
            failures.report("interrupted", failures.INTERRUPTED)  # Ctrl-C while typer parsed the arguments
        return result if isinstance(result, int) and not isinstance(result, bool) else 0
    except typer.TyperException as e:  # the command line itself is wrong: unknown option, bad value, missing MODEL
        failures.report_usage_error(e)
        return int(getattr(e, "exit_code", 2))
    except typer.Abort:
        failures.report("aborted", 1)
        return 1
    except ElisionError as e:
        failures.report(e, e.exit_code)
        return e.exit_code
    except KeyboardInterrupt:
        failures.report("interrupted", failures.INTERRUPTED)
        return failures.INTERRUPTED
    except SystemExit as e:
        return int(e.code or 0) if not isinstance(e.code, str) else 2
    except ImportError as e:  # PyTorch, or a module of an optional extra, that a command found missing on its way
        missing = missing_torch.message(e) if missing_torch.names_torch(e) else missing_extra(e, _command_path(command, args))
        if missing is None:
            raise
        failures.report(missing, 2)
        return 2
    finally:
        failures.restore(token)


def _command_path(command, args: list[str]) -> str:
    """`elision NAME` for the command `args` invoke (`elision` when they name none)."""
    name = next((a for a in args if a in getattr(command, "commands", {})), None)
    return f"elision {name}" if name else "elision"


def _json_requested(command, args: list[str]) -> bool:
    """Whether the invoked command got its --json flag (where --json takes a file name, it is not a flag)."""
    if "--json" not in args:
        return False
    name = next((a for a in args if not a.startswith("-")), None)
    sub = getattr(command, "commands", {}).get(name)
    if sub is None:
        return True
    return any("--json" in p.opts and getattr(p, "is_flag", False) for p in sub.params)


def run_main() -> None:
    """The console script of older installs (new ones call `elision.cli.entry.run`, which also covers start-up)."""
    sys.exit(main())


if __name__ == "__main__":
    run_main()
