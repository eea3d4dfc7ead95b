"""`elision tune`: search token pruning / merging / layer skipping under a fidelity floor.

    elision tune builtin:minilm --passes prune-tokens,skip-layers --min-fidelity 0.98 --calib stdlib
    elision tune builtin:fashion-vit --passes prune-tokens,merge-tokens --calib fashion --plot pareto.png
    elision tune ./clip-vit-base-patch32 --passes prune-tokens,merge-tokens --calib images
    elision tune builtin:minilm --passes prune-tokens,skip-layers --ray local   # candidates as parallel Ray tasks

Prints the chosen pipeline string (the `--passes` syntax of `elision compile`) and writes a speed-fidelity
Pareto plot (PNG). Calibration data: `stdlib` (docstrings of the Python standard library, text encoders),
`images` (random crops of the photographs bundled with scikit-image, for vision towers such as CLIP),
`fashion` (the committed Fashion-MNIST sample, resized for other vision models), a folder of image files, or
a .safetensors file holding the model's input tensors (`input_ids` [+ `attention_mask`] or `pixel_values`,
optional `labels`). Images are preprocessed as the model's preprocessor_config.json says (size, mean, std).

`--ray local` (a Ray on this machine) or `--ray ADDRESS` (a cluster) evaluates the candidates of each search stage as
Ray tasks in parallel (`elision.apps.tokens.ray_search`); the choice is the local run's (see that module).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from elision.cli import failures, options
from elision.runtime.outputs import atomic_file, check_output_file

console = Console(stderr=True, emoji=False)  # specs and paths are user text, never :emoji: codes
out = Console(emoji=False)
_fail = failures.fail


def load_calibration(spec: str, model, adapter, samples: int, seq_len: int):
    """Returns (inputs tuple, labels or None)."""
    from elision.models import datasets as calib
    from elision.apps.tokens.executor import BertAdapter

    text = isinstance(adapter, BertAdapter)

    def prep() -> calib.ImagePreprocessing:  # only image sources need it (a .safetensors file of inputs does not)
        try:
            return calib.ImagePreprocessing.for_model(model)
        except ValueError as e:
            raise ValueError(f"{e}; pass --calib FILE.safetensors holding pixel_values for this model") from None

    if spec == "auto":
        spec = "stdlib" if text else ("fashion" if prep() == calib.fashion_preprocessing() else "images")
    if spec == "stdlib":
        if not text:
            raise ValueError("--calib stdlib is text; this model takes images (use --calib images, fashion, "
                             "a folder of images or a .safetensors file)")
        tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError("the model has no tokenizer; pass --calib FILE.safetensors with input_ids and attention_mask")
        texts = calib.long_texts(samples, int(seq_len * 0.9)) if seq_len > 200 else calib.stdlib_paragraphs(samples)
        return calib.tokenize(tok, texts, seq_len, pad_to_max=True), None
    path = Path(spec)
    if spec in ("fashion", "images") or path.is_dir():
        if text:
            raise ValueError(f"--calib {spec} is images; this model takes text (use --calib stdlib)")
        to_model = prep()
        if spec == "images":
            return (calib.natural_images(samples, to_model),), None
        if path.is_dir():
            return (calib.folder_images(path, samples, to_model),), None
        x, y = calib.fashion_sample(samples)
        if to_model == calib.fashion_preprocessing():
            return (x,), y
        # another model's input format: same pictures, its size/channels/normalisation (labels belong to the ViT)
        return (to_model(calib.fashion_preprocessing().to_unit(x)),), None
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"--calib {spec!r}: use stdlib, images, fashion, a folder of images, or an existing "
                         ".safetensors file of input tensors")
    from safetensors.torch import load_file

    data = load_file(str(path))
    labels = data.get("labels")
    if "input_ids" in data:
        ids = data["input_ids"][:samples]
        mask = data.get("attention_mask", ids.new_ones(ids.shape))[:samples]
        return (ids, mask), (labels[:samples] if labels is not None else None)
    if "pixel_values" in data:
        return (data["pixel_values"][:samples],), (labels[:samples] if labels is not None else None)
    raise ValueError(f"{path} holds {sorted(data)}; expected input_ids[/attention_mask] or pixel_values")


def register(app: typer.Typer) -> None:
    @app.command("tune")
    @failures.command
    def tune_cmd(
        model: str = typer.Argument(..., help="builtin:NAME, a Hugging Face model directory, or package.module:factory "
                                              "(needs --trust-code)"),
        passes: str = typer.Option("prune-tokens,skip-layers", "--passes",
                                   help="comma list of prune-tokens, merge-tokens, skip-layers, compress-tokens"),
        min_fidelity: float = typer.Option(0.98, "--min-fidelity",
                                           help="floor on fidelity: mean cosine (embeddings) or exp(-KL) (logits)"),
        calib_spec: str = typer.Option(
            "auto", "--calib", help="stdlib (text) | images (photos bundled with scikit-image) | fashion | "
                                    "a folder of images | FILE.safetensors; auto picks by model"),
        samples: int = typer.Option(32, "--samples", help="calibration rows"),
        seq_len: int = typer.Option(128, "--seq-len", help="token length for text calibration"),
        plot: Path = typer.Option(Path("tune_pareto.png"), "--plot", help="where to write the Pareto plot (PNG)"),
        json_out: Optional[Path] = typer.Option(None, "--json", help="also write all candidates as JSON"),
        repeats: int = typer.Option(5, "--repeats", help="timed runs per finalist (median)"),
        measure: str = typer.Option("executor", "--measure",
                                    help="time finalists in the eager executor (fast) or as deployed ONNX artifacts "
                                         "(`onnx`: slower to tune, only plans `elision compile` can apply)"),
        threads: Optional[int] = options.THREADS,
        dtype: str = options.DTYPE,
        device: Optional[str] = options.DEVICE,
        ray_address: Optional[str] = typer.Option(
            None, "--ray", help="evaluate candidates as Ray tasks in parallel: 'local' starts a Ray on this machine, "
                                "or a cluster address (host:port, ray://..., auto); needs the serve extra"),
        trust_code: bool = options.TRUST_CODE,
    ) -> None:
        """Search layer, keep ratio and skip sets for the fastest pipeline meeting --min-fidelity."""
        import torch
        from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

        from elision.errors import ElisionError
        from elision.kernels.token_reduction import PruningError
        from elision.apps.tokens.deployed import deployable
        from elision.apps.tokens.executor import adapter_for
        from elision.apps.tokens.search import SEARCHABLE_PASSES, pareto_plot, tune

        pass_list = tuple(p.strip() for p in passes.split(",") if p.strip())
        bad = [p for p in pass_list if p not in SEARCHABLE_PASSES]
        if bad or not pass_list:
            raise _fail(f"--passes: unknown pass {', '.join(bad) or '(none)'}; choose from {', '.join(SEARCHABLE_PASSES)}")
        if not 0.0 < min_fidelity <= 1.0:
            raise _fail(f"--min-fidelity {min_fidelity} must be in (0, 1], e.g. 0.98")
        if samples < 1 or seq_len < 4:
            raise _fail("--samples must be >= 1 and --seq-len >= 4")
        if measure not in ("executor", "onnx"):
            raise _fail(f"--measure must be executor or onnx, got {measure!r}")
        check_output_file(plot, "--plot file")
        if json_out is not None:
            check_output_file(json_out, "--json file")
        placement = options.placement(dtype, device, threads)  # sets torch's threads (per Ray worker with --ray)
        from elision.frontend.model_spec import load_model
        try:
            loaded = load_model(model, trust_code=trust_code, placement=placement)
            adapter = adapter_for(loaded.model)
            if getattr(loaded.model, "tokenizer", None) is None and loaded.tokenizer is not None:
                loaded.model.tokenizer = loaded.tokenizer
            calib, labels = load_calibration(calib_spec, loaded.model, adapter, samples, seq_len)
            calib = placement.place_inputs(calib)
        except (ElisionError, PruningError, ValueError, FileNotFoundError, ModuleNotFoundError) as e:
            raise _fail(str(e)) from None
        timer = None
        if measure == "onnx":
            from elision.apps.tokens.deployed import OnnxTimer

            names = ["input_ids", "attention_mask"] if len(calib) == 2 else ["pixel_values"]
            console.print("tracing the model at the calibration shape for ONNX timing")
            timer = OnnxTimer(loaded.model, calib, names, threads=threads)
        evaluator = None
        if ray_address is not None:
            try:
                from elision.apps.tokens.ray_search import RayEvaluator
            except ModuleNotFoundError as e:
                raise _fail(f"--ray needs the serve extra ({e.name} is not installed): pip install 'elision[serve]'") from None
            try:
                evaluator = RayEvaluator(adapter, calib, adapter.output_kind, labels, address=ray_address,
                                         threads=torch.get_num_threads())
            except ConnectionError as e:
                raise _fail(f"cannot join the Ray cluster at {ray_address}: {str(e).splitlines()[0]}") from None
        kind = adapter.output_kind
        with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                      TimeElapsedColumn(), console=console, transient=True, disable=not console.is_terminal) as prog:
            task = prog.add_task("tuning", total=1)

            def report(desc: str, step: int, total: int) -> None:
                prog.update(task, completed=step, total=total, description=desc[:60])

            try:
                result = tune(adapter, calib, kind, pass_list, min_fidelity, labels=labels, repeats=repeats,
                              progress=report, deployed=timer.runner if timer is not None else None,
                              evaluator=evaluator)
            except PruningError as e:
                raise _fail(str(e)) from None
            finally:
                if timer is not None:
                    timer.close()
                if evaluator is not None:
                    evaluator.close()
        table = Table(title=f"{escape(model)}: fastest measured candidates (fidelity >= {min_fidelity})")
        for col in ("pipeline", "fidelity", "cosine", "KL", "top-1", "speed-up", "FLOPs est."):
            table.add_column(col, overflow="fold")  # pipelines must stay readable in full
        for c in sorted([c for c in result.candidates if c.speedup is not None], key=lambda c: -c.speedup):
            r = c.report
            table.add_row(c.plan.describe(), f"{r.fidelity:.4f}", f"{r.cosine:.4f}",
                          "-" if r.kl is None else f"{r.kl:.4f}", "-" if r.top1 is None else f"{r.top1:.3f}",
                          f"{c.speedup:.2f}x", f"{c.est_speedup:.2f}x")
        out.print(table)
        with atomic_file(plot, what="--plot file") as tmp:
            pareto_plot(result, str(tmp), f"{model} ({len(result.candidates)} candidates)", min_fidelity,
                        "mean cosine" if kind == "embedding" else "fidelity exp(-KL)")
        if json_out is not None:
            with atomic_file(json_out, what="--json file") as tmp:
                tmp.write_text(json.dumps({
                    "reference_latency_s": result.reference_latency_s,
                    "plain_latency_s": result.plain_latency_s, "executor_latency_s": result.executor_latency_s,
                    "chosen": result.best.plan.describe() if result.best is not None else "",
                    "candidates": [{"pipeline": c.plan.describe(), "method": c.method, **c.report.as_dict(),
                                    "latency_s": c.latency_s, "speedup": c.speedup, "est_speedup": c.est_speedup}
                                   for c in result.candidates]}, indent=1))
        console.print(f"Pareto plot written to {plot}", markup=False)
        if result.measured_in == "deployed":
            console.print(f"unchanged model as an ONNX artifact: {result.reference_latency_s * 1e3:.1f} ms per "
                          "calibration batch (candidates timed as ONNX artifacts too)", highlight=False, soft_wrap=True)
        else:
            console.print(f"unchanged model: {result.reference_latency_s * 1e3:.1f} ms per calibration batch (plain "
                          f"forward {result.plain_latency_s * 1e3:.1f} ms, layer-by-layer executor "
                          f"{result.executor_latency_s * 1e3:.1f} ms)", highlight=False, soft_wrap=True)
        if result.best is None:
            timed = [c for c in result.candidates if c.speedup is not None]
            if not result.feasible(min_fidelity):
                why = f"no candidate reached fidelity {min_fidelity}"
            else:
                fastest = max(c.speedup for c in timed)
                why = (f"no candidate at fidelity >= {min_fidelity} is faster than the unchanged model "
                       f"(best measured {fastest:.2f}x)")
            console.print(f"[yellow]{why}; keeping the model unchanged (empty pipeline)[/]", highlight=False,
                          soft_wrap=True)
            # An empty pipeline is a valid answer, not an error: applying nothing is the best choice here.
            out.print("chosen pipeline: ")
            return
        out.print(f"chosen pipeline: {result.best.plan.describe()}")
        out.print(f"  {result.best.report.summary()}; speed-up {result.best.speedup:.2f}x "
                  f"({'ONNX artifacts' if result.measured_in == 'deployed' else 'eager executor'})")
        if not deployable(result.best.plan, adapter):
            console.print("note: on a text encoder the merge-tokens IR pass does not follow a prune-tokens stage, "
                          "so `elision compile` cannot apply this pipeline; use --measure onnx to tune among "
                          "deployable pipelines",
                          highlight=False, soft_wrap=True)
