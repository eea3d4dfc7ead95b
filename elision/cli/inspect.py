"""``elision inspect MODEL``: the model map, op histogram, parameter size, applicable rewrites, unrecognized parts.

``--json`` prints one JSON object on stdout (progress and errors go to stderr); ``--list-builtins`` lists the
``builtin:NAME`` models. Bad input gives a one-line error and exit code 2.
"""
from __future__ import annotations

import json
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn
from rich.table import Table

from elision.cli import failures, missing_torch, options
from elision.errors import ElisionError, missing_extra


def _param_stats(module) -> tuple[int, int]:
    """(element count, bytes) over distinct parameter tensors (tied weights counted once)."""
    seen: set[int] = set()
    count = nbytes = 0
    for t in module.params.values():
        key = t.untyped_storage().data_ptr() if t.device.type != "meta" else id(t)
        if key in seen:
            continue
        seen.add(key)
        count += t.numel()
        nbytes += t.numel() * t.element_size()
    return count, nbytes


def _human(n: float, unit: str = "B") -> str:
    for prefix in ("", "K", "M", "G"):
        if abs(n) < 1024 or prefix == "G":
            return f"{n:.1f} {prefix}{unit}" if prefix else f"{int(n)} {unit}"
        n /= 1024
    return f"{n} {unit}"


def inspect_report(spec: str, progress=None, passes: str | None = None, trust_code: bool = False,
                   placement=None) -> dict:
    """Load, export and map ``spec``; everything ``elision inspect`` shows, as a JSON-ready dict.

    trust_code: allow a ``package.module:factory`` spec (it runs that module's code).
    placement: dtype/device/threads to load and trace in (default float32 on the CPU)."""
    # lazy: these import torch, which `elision --help` must not pay for
    from elision.apps.compile.api import check_pipeline
    from elision.frontend.model_spec import load_model
    from elision.frontend.placement import DEFAULT
    from elision.frontend.trace import export_to_ir
    from elision.analysis.model_map import build_model_map

    if passes:
        check_pipeline(passes)  # before loading and tracing: a typo must not cost a trace
    step = progress or (lambda _msg: None)
    step(f"loading {spec}")
    lm = load_model(spec, trust_code=trust_code, placement=placement or DEFAULT)
    step(f"tracing {lm.name} with torch.export")
    module = export_to_ir(lm.model, lm.example_inputs, lm.dynamic_dims, input_names=lm.input_names)
    if passes:
        from elision.passes.manager import run_pipeline  # lazy: torch
        step(f"running passes {passes}")
        run_pipeline(module, passes)
    step("building the model map")
    mm = build_model_map(module)
    count, nbytes = _param_stats(module)
    report = mm.as_dict()
    report.update({
        "model": spec,
        "name": lm.name,
        "source_model": module.attrs.get("source_model", type(lm.model).__name__),
        "inputs": [{"name": v.name, "type": str(v.type)} for v in module.functions["forward"].inputs],
        "parameters": {"count": count, "bytes": nbytes, "tensors": len(module.params)},
        "nodes": module.node_count(),
        "op_histogram": mm.op_histogram,
        "describe": mm.describe(),
    })
    return report


def _print_report(console: Console, r: dict, top: int) -> None:
    say = lambda text: console.print(text, highlight=False, soft_wrap=True)  # noqa: E731
    say(f"[bold]{escape(r['name'])}[/] ({escape(r['source_model'])}): [cyan]{r['kind']}[/], "
        f"{r['num_layers']} layers, {r['nodes']} IR nodes")
    say("inputs: " + escape(", ".join(f"{i['name']} : {i['type']}" for i in r["inputs"])))
    p = r["parameters"]
    say(f"parameters: {p['count']:,} ({_human(p['bytes'])}) in {p['tensors']} tensors")
    parts = []
    if r["embedding"]:
        e = r["embedding"]
        parts.append(f"token embedding {e['param']} ({e['num_embeddings']} x {e['dim']})")
    if r["patch_embed"]:
        pe = r["patch_embed"]
        parts.append(f"patch embedding {pe['weight']} ({'x'.join(map(str, pe['patch_size']))}, "
                     f"{pe['num_patches']} patches)")
    if r["cls_token"]:
        parts.append(f"[CLS] token {r['cls_token']['param']}")
    if r["projector"]:
        parts.append(f"image projector: {len(r['projector'])} linears")
    if r["final_norm"]:
        parts.append(f"final {r['final_norm']['kind']} {r['final_norm']['weight']}")
    if r["lm_head"]:
        parts.append(f"LM head {r['lm_head']['weight']} ({r['lm_head']['in']} -> {r['lm_head']['out']})")
    for line in parts:
        say("  " + escape(line))

    for stack, layers in r["stacks"].items():
        t = Table(title=f"layers: {escape(stack or '(no module path)')}", title_justify="left")
        for col in ("#", "location", "attention", "heads q/kv x dim", "proj", "mlp", "norms"):
            t.add_column(col, overflow="fold")
        for ly in layers:
            a = ly["attention"]
            att = " ".join(x for x in (a["kind"], a["mask_kind"] + ("(input)" if a["mask_from_input"] else ""),
                                       "rope" if a["rotary"] else "") if x)
            projs = "".join(c if a[f"{c}_proj"] else "-" for c in "qkvo") + (" packed" if a["packed_qkv"] else "")
            mlp = "-" if ly["mlp"] is None else (("gated " if ly["mlp"]["gated"] else "") + (ly["mlp"]["activation"] or "?"))
            norms = "+".join(n["kind"] for n in ly["norms"]) + (" post" if ly["post_norm"] else "")
            t.add_row(str(ly["index"]), escape(ly["loc"]), att, f"{a['num_heads']}/{a['num_kv_heads']} x {a['head_dim']}",
                      projs, mlp, norms)
        console.print(t)

    h = Table(title=f"op histogram (top {min(top, len(r['op_histogram']))} of {len(r['op_histogram'])} ops)",
              title_justify="left")
    h.add_column("op")
    h.add_column("count", justify="right")
    for op, n in list(r["op_histogram"].items())[:top]:
        h.add_row(escape(op), str(n))
    console.print(h)

    rw = Table(title="rewrites", title_justify="left")
    for col in ("rewrite", "applies", "why"):
        rw.add_column(col, overflow="fold")
    for x in r["applicable_rewrites"]:
        rw.add_row(x["rewrite"], "[green]yes[/]" if x["applies"] else "[dim]no[/]", escape(x["reason"]))
    console.print(rw)
    if r["unrecognized"]:
        say("[yellow]not recognized:[/]")
        for u in r["unrecognized"]:
            say(f"  - {escape(u)}")
    else:
        say("[green]every attention, norm, linear and embedding was recognized[/]")


def _list_builtins(console: Console, as_json: bool) -> None:
    from elision.models.registry import list_builtins  # lazy: the registry imports torch and the model zoo

    entries = list_builtins()
    if as_json:
        console.print_json(json.dumps([{"name": e.name, "kind": e.kind, "description": e.description}
                                       for e in entries]))
        return
    t = Table(title="builtin models (use as builtin:NAME)", title_justify="left")
    for col in ("name", "kind", "description"):
        t.add_column(col)
    for e in entries:
        t.add_row(escape(e.name), escape(e.kind), escape(e.description))
    console.print(t)


def register(app: typer.Typer) -> None:
    @app.command("inspect")
    @failures.command
    def inspect_cmd(
        model: Optional[str] = typer.Argument(None, help="Hugging Face model directory or Hub id (org/name), "
                                                         "builtin:NAME, or package.module:factory (needs --trust-code)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object instead of tables"),
        list_builtins: bool = typer.Option(False, "--list-builtins", help="list the builtin:NAME models and exit"),
        top: int = typer.Option(15, "--top", help="rows of the op histogram to show"),
        passes: Optional[str] = typer.Option(None, "--passes", "-p",
                                             help="pipeline to run before mapping (e.g. 'fuse-attention')"),
        trust_code: bool = options.TRUST_CODE,
        dtype: str = options.DTYPE,
        device: str = options.DEVICE,
        threads: Optional[int] = options.THREADS,
    ):
        """Show what elision recognizes in MODEL: layers, attention, norms, heads, op counts, applicable rewrites."""
        out = Console(emoji=False)
        err = failures.stderr()
        if list_builtins:
            _list_builtins(out, as_json)
            return
        if not model:
            raise failures.fail("give a MODEL (a Hugging Face model directory, builtin:NAME or package.module:factory), "
                                "or --list-builtins")
        if top < 1:
            raise failures.fail(f"--top must be at least 1 (got {top})")
        placement = options.placement(dtype, device, threads)
        try:
            with Progress(SpinnerColumn(), TextColumn("{task.description}", markup=False), TimeElapsedColumn(),
                          console=err, transient=True, disable=not err.is_terminal) as prog:
                task = prog.add_task("starting", total=None)
                report = inspect_report(model, lambda msg: prog.update(task, description=msg), passes, trust_code,
                                        placement)
        except (ElisionError, KeyboardInterrupt):
            raise
        except ImportError as e:
            if missing_torch.names_torch(e):
                raise failures.fail(missing_torch.message(e)) from None
            missing = missing_extra(e, "elision inspect")
            if missing is not None:
                raise failures.fail(missing) from None
            raise failures.fail(f"internal error while inspecting {model}: {type(e).__name__}: {e}", 1) from None
        except Exception as e:  # noqa: BLE001 - a bug: one line, exit 1, no traceback
            raise failures.fail(f"internal error while inspecting {model}: {type(e).__name__}: {e}", 1) from None
        if as_json:
            report.pop("describe", None)
            print(json.dumps(report, indent=2))
        else:
            _print_report(out, report, top)


__all__ = ["register", "inspect_report"]
