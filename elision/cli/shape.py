"""`elision decode-shape` and `elision encode-shape`.

decode-shape MODEL --latents FILE --resolution 256 [--passes PIPELINE] [--backend torch|ort] -o mesh.glb
             [--preview mesh.png] [--json]
encode-shape MODEL MESH -o latents.safetensors [--steps N] [--minutes M]

MODEL is `builtin:NAME`, a VecSet checkpoint (.safetensors written by elision.models.vecset), or (ORT
backend) a directory written by `export_field_onnx`.
"""
from __future__ import annotations

import json
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console
from rich.markup import escape

from elision.cli import failures
from elision.runtime.outputs import atomic_file, check_output_file

console = Console(stderr=True, emoji=False)  # paths and specs are user text, never :emoji: codes
out = Console(emoji=False)
_fail = failures.fail


def load_vecset(spec: str):
    """builtin:NAME | checkpoint path -> VecSetField (raises ValueError/FileNotFoundError with a message)."""
    from elision.models.vecset import VecSetField, load_checkpoint
    if spec.startswith("builtin:"):
        from elision.models.registry import get_builtin
        entry = get_builtin(spec.split(":", 1)[1])
        if entry.kind != "shape-decoder":
            raise ValueError(f"{spec} is a {entry.kind} model, not a shape decoder")
        model = entry.build()
    else:
        model = load_checkpoint(spec)
    if not isinstance(model, VecSetField):
        raise ValueError(f"{spec} is not a VecSet field decoder")
    return model


def register(app: typer.Typer) -> None:
    @app.command("decode-shape")
    @failures.command
    def decode_shape(
        model: str = typer.Argument(..., help="builtin:NAME, a VecSet .safetensors checkpoint, or an ONNX artifact dir"),
        latents: Path = typer.Option(..., "--latents", help="safetensors file with a 'latents' tensor [1,M,E]"),
        resolution: int = typer.Option(256, "--resolution", "-r", help="grid resolution (cells per axis)"),
        passes: Optional[str] = typer.Option(
            None, "--passes",
            help="volume pipeline; '' = dense decoding (published method). Default: query-independence,"
                 "hoist-invariants,sparse-volume = sparse-volume{min_res=16,band=auto,dilation=0}: dense 16^3, "
                 "then each doubling refines only cells that straddle the surface or lie within the band "
                 "(calibrated on the field). Raise dilation (cells) or band for more safety, min_res for a finer "
                 "start; append adaptive-kv{topk=K} for per-block top-K latent selection"),
        output: Path = typer.Option(..., "-o", "--output", help="mesh file (.glb/.ply/.obj/.stl/.off)"),
        backend: str = typer.Option("torch", "--backend", help="torch | ort"),
        preview: Optional[Path] = typer.Option(None, "--preview", help="PNG preview (default: next to the mesh)"),
        chunk: int = typer.Option(32768, "--chunk", help="queries per decoder call (bounds memory)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object with counts, timings and mesh stats"),
    ) -> None:
        """Decode latents to a mesh with (by default) hierarchical sparse volume decoding."""
        import torch
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        from elision.models.vecset import load_latents
        from elision.apps.volume import DEFAULT_PIPELINE, VolumeError, decode_volume, parse_volume_pipeline
        from elision.apps.volume.decode import check_memory
        from elision.apps.volume.mesh import MESH_SUFFIXES, MeshError, extract_mesh, render_preview, save_mesh

        torch.set_num_threads(min(2, torch.get_num_threads()))
        pipeline = DEFAULT_PIPELINE if passes is None else passes
        if output.suffix.lower() not in MESH_SUFFIXES:
            raise _fail(f"unsupported mesh format {output.suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
        if backend not in ("torch", "ort"):
            raise _fail(f"--backend must be 'torch' or 'ort', got {backend!r}")
        if chunk < 1:
            raise _fail(f"--chunk must be >= 1, got {chunk}")
        check_output_file(output, "mesh file (-o)")
        if preview is not None:
            check_output_file(preview, "--preview file")
        try:
            plan = parse_volume_pipeline(pipeline)
            check_memory(resolution)
            if resolution < 2:
                raise VolumeError(f"resolution must be >= 2, got {resolution}")
            lat = load_latents(latents)
            if not torch.isfinite(lat).all():
                raise VolumeError(f"the latents in {latents} hold NaN or infinite values; re-encode the shape "
                                  f"(`elision encode-shape`)")
            t0 = time.perf_counter()
            if backend == "ort" and Path(model).is_dir():
                from elision.apps.volume.onnx_field import OrtFieldDecoder
                net: Any = OrtFieldDecoder(model)
            else:
                tmodel = load_vecset(model)
                c = tmodel.config
                if tuple(lat.shape[-2:]) != (c.num_latents, c.embed_dim):
                    raise VolumeError(f"latents have shape {list(lat.shape)} but {model} expects "
                                      f"[1, {c.num_latents}, {c.embed_dim}]")
                net = tmodel
                if backend == "ort":
                    from elision.apps.volume.onnx_field import OrtFieldDecoder, export_field_onnx
                    tmp = Path(tempfile.mkdtemp(prefix="elision-field-"))
                    console.print("exporting the field decoder to ONNX …")
                    export_field_onnx(tmodel, tmp)
                    net = OrtFieldDecoder(tmp)
            load_s = time.perf_counter() - t0
        except (VolumeError, ValueError, KeyError, FileNotFoundError) as e:
            raise _fail(str(e).strip("'\""))

        total = (resolution + 1) ** 3
        with Progress(TextColumn("[bold]decode"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("queries (dense would be {task.total:,})"), TimeElapsedColumn(),
                      console=console, transient=as_json, disable=as_json or not console.is_terminal) as prog:
            task = prog.add_task("decode", total=total)
            try:
                if backend == "ort" and plan.check_independence and not isinstance(net, torch.nn.Module):
                    plan = type(plan)(check_independence=False, hoist=True, sparse=plan.sparse, kv=plan.kv)
                res = decode_volume(net, lat, resolution, plan, chunk=chunk,
                                    progress=lambda n: prog.advance(task, n))
            except VolumeError as e:
                raise _fail(str(e))
        t1 = time.perf_counter()
        try:
            mesh = extract_mesh(res)
        except MeshError as e:
            raise _fail(f"cannot extract a surface: {e}") from None
        t2 = time.perf_counter()
        png = preview or output.with_suffix(".png")
        try:
            with atomic_file(output, what="mesh file (-o)") as tmp:  # a failed write keeps a previous mesh intact
                save_mesh(mesh, tmp)
            with atomic_file(png, what="--preview file") as tmp:
                render_preview(mesh, tmp, title=f"{Path(model).name} r={resolution} {plan.describe()}")
        except (ValueError, OSError) as e:
            raise _fail(f"cannot write {output}: {e}") from None
        t3 = time.perf_counter()
        seconds = {"load": load_s, **res.seconds, "marching_cubes": t2 - t1, "write_and_preview": t3 - t2}
        report = {"model": model, "backend": backend, "passes": plan.describe(), **res.summary(),
                  "seconds": {k: round(v, 4) for k, v in seconds.items()}, "mesh": mesh.stats(),
                  "output": str(output), "preview": str(png)}
        if as_json:
            out.print_json(json.dumps(report))
        else:
            out.print(f"[green]wrote[/] {escape(str(output))} ({report['mesh']['faces']:,} faces) and {escape(str(png))}")
            out.print(f"field queries: {res.queries:,} of {res.dense_queries:,} dense "
                      f"({100 * res.queries / res.dense_queries:.2f}%), decode {res.seconds.get('decode', 0):.2f}s")

    @app.command("encode-shape")
    @failures.command
    def encode_shape(
        model: str = typer.Argument(..., help="builtin:NAME or a VecSet .safetensors checkpoint"),
        mesh: Path = typer.Argument(..., help="watertight mesh (.off/.obj/.ply/.stl/.glb)"),
        output: Path = typer.Option(..., "-o", "--output", help="latents .safetensors to write"),
        steps: int = typer.Option(600, "--steps", help="optimisation steps (auto-decoding)"),
        minutes: float = typer.Option(5.0, "--minutes", help="stop after this many minutes"),
        as_json: bool = typer.Option(False, "--json"),
    ) -> None:
        """Fit latents for a mesh (auto-decoding through the frozen decoder; no encoder is trained)."""
        import torch
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from elision.models.vecset import save_latents
        from elision.apps.volume.encode import fit
        from elision.apps.volume.shapes import ShapeError, load_mesh_file, mesh_source

        torch.set_num_threads(min(2, torch.get_num_threads()))
        if output.suffix != ".safetensors":
            raise _fail(f"output must be a .safetensors file, got {output.name}")
        check_output_file(output, "latents file (-o)")
        if steps < 1:
            raise _fail(f"--steps must be >= 1, got {steps}")
        try:
            net = load_vecset(model)
            src = mesh_source(load_mesh_file(mesh), mesh.stem)
        except (ShapeError, ValueError, KeyError, FileNotFoundError) as e:
            raise _fail(str(e).strip("'\""))
        with Progress(TextColumn("[bold]fit latents"), BarColumn(), TextColumn("{task.completed}/{task.total} "
                      "L1 {task.fields[loss]}"), TimeElapsedColumn(), console=console,
                      disable=as_json or not console.is_terminal) as prog:
            task = prog.add_task("fit", total=steps, loss="-")
            res = fit(net, [src], steps=steps, train_weights=False, time_limit_s=minutes * 60,
                      progress=lambda s, l: prog.update(task, completed=s, loss=f"{l:.4f}"))
        with atomic_file(output, what="latents file (-o)") as tmp:
            save_latents(res.latents[0], tmp, source=str(mesh), model=model, iou=f"{res.iou[src.name]:.4f}")
        report = {"output": str(output), "iou": res.iou[src.name], "steps": res.steps,
                  "seconds": round(res.seconds, 2), "l1": res.loss}
        if as_json:
            out.print_json(json.dumps(report))
        else:
            out.print(f"[green]wrote[/] {escape(str(output))}: volume IoU {res.iou[src.name]:.3f} after {res.steps} steps "
                      f"({res.seconds:.0f}s)")
