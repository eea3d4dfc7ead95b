"""`elision decode-shape` and `elision encode-shape`.

decode-shape MODEL --latents FILE --resolution 256 [--passes PIPELINE] [--backend torch|onnxruntime] [--dump-ir DIR]
             -o mesh.glb [--preview mesh.png] [--json]
encode-shape MODEL MESH -o latents.safetensors [--steps N] [--minutes M] [--dtype D] [--device cpu|cuda]

MODEL is `builtin:NAME` or a VecSet checkpoint (.safetensors written by elision.models.vecset): decode-shape
traces it to elision's IR, runs the volume passes (`elision.passes.volume`) and lowers the result to torch or ONNX
Runtime. With --backend onnxruntime MODEL may also be an ONNX artifact directory of a compiled field decoder
(`elision compile MODEL --passes 'hoist-invariants,sparse-volume' --emit onnx -o DIR`), which carries its plan.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from elision.cli import failures, options
from elision.errors import ElisionError, require_extra
from elision.runtime.outputs import atomic_file, check_output_file

console = Console(stderr=True, emoji=False)  # paths and specs are user text, never :emoji: codes
out = Console(emoji=False)
_fail = failures.fail
BACKEND_ALIASES = {"ort": "onnxruntime"}  # the short spelling earlier releases took; --help names it


def load_vecset(spec: str):
    """builtin:NAME | checkpoint path -> VecSetField (raises ValueError/FileNotFoundError with a message)."""
    from elision.models.vecset import VecSetField, load_checkpoint  # lazy: torch
    if spec.startswith("builtin:"):
        from elision.models.registry import get_builtin  # lazy: torch
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
        model: str = typer.Argument(..., help="builtin:NAME, a VecSet .safetensors checkpoint, or (--backend onnxruntime) a "
                                              "compiled ONNX artifact directory"),
        latents: Path = typer.Option(..., "--latents", help="safetensors file with a 'latents' tensor [1,M,E]"),
        resolution: int = typer.Option(256, "--resolution", "-r", help="grid resolution (cells per axis)"),
        passes: Optional[str] = typer.Option(
            None, "--passes",
            help="pass pipeline; '' = dense decoding (the traced decoder on every chunk). Default: query-independence,"
                 "hoist-invariants,sparse-volume = sparse-volume{min_res=16;band=auto;dilation=0}: dense 16^3, "
                 "then each doubling refines only cells that straddle the surface or lie within the band "
                 "(calibrated on the field). Raise dilation (cells) or band for more safety, min_res for a finer "
                 "start; append adaptive-kv{topk=K} for per-block top-K latent selection"),
        output: Path = typer.Option(..., "-o", "--output", help="mesh file (.glb/.ply/.obj/.stl/.off)"),
        backend: str = typer.Option("torch", "--backend", help="torch | onnxruntime ('ort' is accepted as an alias)"),
        dump_ir: Optional[Path] = typer.Option(None, "--dump-ir", help="write the IR before/after every pass here"),
        preview: Optional[Path] = typer.Option(None, "--preview", help="PNG preview (default: next to the mesh)"),
        chunk: int = typer.Option(32768, "--chunk", help="queries per decoder call (bounds memory)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object with counts, timings and mesh stats"),
        dtype: str = options.DTYPE,
        device: Optional[str] = options.DEVICE,
        threads: Optional[int] = options.THREADS,
    ) -> None:
        """Decode latents to a mesh with (by default) hierarchical sparse volume decoding."""
        require_extra("3d", "elision decode-shape")  # marching cubes and mesh files, needed only after the decode
        # lazy: torch, which `elision --help` must not pay for
        import torch
        from elision.apps.volume import (BACKENDS, DEFAULT_PIPELINE, VolumeError, compile_field, decode_volume,
                                         load_field_artifact)
        from elision.apps.volume.decode import check_memory
        from elision.apps.volume.mesh import MESH_SUFFIXES, MeshError, extract_mesh, render_preview, save_mesh
        from elision.models.vecset import load_latents
        from elision.passes.pipeline import parse_pipeline

        placement = options.placement(dtype, device, threads)
        if output.suffix.lower() not in MESH_SUFFIXES:
            raise _fail(f"unsupported mesh format {output.suffix!r}; use one of {', '.join(MESH_SUFFIXES)}")
        backend = BACKEND_ALIASES.get(backend, backend)
        if backend not in BACKENDS:
            raise _fail(f"--backend must be 'torch' or 'onnxruntime', got {backend!r}")
        if chunk < 1:
            raise _fail(f"--chunk must be >= 1, got {chunk}")
        artifact = Path(model).is_dir()
        if artifact and backend != "onnxruntime":
            raise _fail(f"{model} is a directory: an ONNX artifact runs with --backend onnxruntime")
        if artifact and (dtype != "float32" or device is not None):
            raise _fail("--dtype and --device apply to a model that decode-shape compiles; an ONNX artifact keeps "
                        "its dtype and runs where onnxruntime puts it")
        if artifact and dump_ir is not None:
            raise _fail("--dump-ir needs a model to compile; an ONNX artifact is compiled already")
        seconds: dict[str, float] = {}
        check_output_file(output, "mesh file (-o)")
        if preview is not None:
            check_output_file(preview, "--preview file")
        try:
            if passes is not None:
                parse_pipeline(passes)  # a bad pipeline fails before loading anything
            check_memory(resolution)
            if resolution < 2:
                raise VolumeError(f"resolution must be >= 2, got {resolution}")
            lat = load_latents(latents)
            if not torch.isfinite(lat).all():
                raise VolumeError(f"the latents in {latents} hold NaN or infinite values; re-encode the shape "
                                  f"(`elision encode-shape`)")
            t0 = time.perf_counter()
            if artifact:
                field = load_field_artifact(model)
                if passes is not None and ",".join(p.spec() for p in parse_pipeline(passes)) != field.pipeline:
                    raise VolumeError(f"{model} was compiled with --passes {field.pipeline!r}; an artifact cannot "
                                      "change its passes (compile it again, or leave --passes out)")
                seconds["load"] = time.perf_counter() - t0
            else:
                tmodel = placement.place_model(load_vecset(model))
                lat = placement.place_inputs(lat)
                c = tmodel.config
                if tuple(lat.shape[-2:]) != (c.num_latents, c.embed_dim):
                    raise VolumeError(f"latents have shape {list(lat.shape)} but {model} expects "
                                      f"[1, {c.num_latents}, {c.embed_dim}]")
                t1 = time.perf_counter()
                seconds["load"] = t1 - t0
                if not as_json:
                    console.print(f"compiling the field decoder ({backend}) …")
                field = compile_field(tmodel, DEFAULT_PIPELINE if passes is None else passes, backend=backend,
                                      dump_ir=dump_ir)
                seconds["compile"] = time.perf_counter() - t1
        except (ElisionError, ValueError, KeyError, FileNotFoundError) as e:
            raise _fail(str(e).strip("'\""))

        total = (resolution + 1) ** 3
        with Progress(TextColumn("[bold]decode"), BarColumn(), MofNCompleteColumn(),
                      TextColumn("queries (dense would be {task.total:,})"), TimeElapsedColumn(),
                      console=console, transient=as_json, disable=as_json or not console.is_terminal) as prog:
            task = prog.add_task("decode", total=total)
            try:
                res = decode_volume(field, lat, resolution, chunk=chunk, progress=lambda n: prog.advance(task, n))
            except (VolumeError, ValueError) as e:
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
                render_preview(mesh, tmp, title=f"{Path(model).name} r={resolution} {field.describe()}")
        except (ValueError, OSError) as e:
            raise _fail(f"cannot write {output}: {e}") from None
        t3 = time.perf_counter()
        seconds = {**seconds, **res.seconds, "marching_cubes": t2 - t1, "write_and_preview": t3 - t2}
        report = {"model": model, "backend": backend, "passes": field.describe(), **res.summary(),
                  "seconds": {k: round(v, 4) for k, v in seconds.items()}, "mesh": mesh.stats(),
                  "output": str(output), "preview": str(png)}
        if dump_ir is not None:
            report["dump_ir"] = str(dump_ir)
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
        dtype: str = options.DTYPE,
        device: Optional[str] = options.DEVICE,
        threads: Optional[int] = options.THREADS,
    ) -> None:
        """Fit latents for a mesh (auto-decoding through the frozen decoder; no encoder is trained). --dtype is the
        decoder's; the latents are fitted and written in float32."""
        placement = options.placement(dtype, device, threads)
        require_extra("3d", "elision encode-shape")  # reading the mesh and sampling its surface
        # lazy: torch, which `elision --help` must not pay for
        from elision.models.vecset import save_latents
        from elision.apps.volume.encode import fit
        from elision.apps.volume.shapes import ShapeError, load_mesh_file, mesh_source

        if output.suffix != ".safetensors":
            raise _fail(f"output must be a .safetensors file, got {output.name}")
        check_output_file(output, "latents file (-o)")
        if steps < 1:
            raise _fail(f"--steps must be >= 1, got {steps}")
        try:
            net = placement.place_model(load_vecset(model))
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
            save_latents(res.latents[0], tmp, source=str(mesh), model=model, iou=f"{res.iou[src.name]:.4f}",
                         decoder_dtype=placement.dtype)
        report = {"output": str(output), "iou": res.iou[src.name], "steps": res.steps,
                  "seconds": round(res.seconds, 2), "l1": res.loss, "dtype": placement.dtype,
                  "device": placement.device}
        if as_json:
            out.print_json(json.dumps(report))
        else:
            out.print(f"[green]wrote[/] {escape(str(output))}: volume IoU {res.iou[src.name]:.3f} after {res.steps} steps "
                      f"({res.seconds:.0f}s)")
