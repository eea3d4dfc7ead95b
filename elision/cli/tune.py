"""`elision tune`: search token pruning / merging / layer skipping under a fidelity floor.

    elision tune builtin:minilm --passes prune-tokens,skip-layers --min-fidelity 0.98 --calib stdlib
    elision tune builtin:fashion-vit --passes prune-tokens,merge-tokens --calib fashion --plot pareto.png
    elision tune ./clip-vit-base-patch32 --passes prune-tokens,merge-tokens --calib images
    elision tune builtin:minilm --passes prune-tokens,skip-layers --ray local   # candidates as parallel Ray tasks

Prints the chosen pipeline string (the `--passes` syntax of `elision compile`), the `elision compile` command that
applies it, and writes a speed-fidelity Pareto plot (PNG); `--json` prints all of it as one JSON object instead.
Fidelity is reported twice: on the rows the search tuned on and on held-out rows of the same source that the
search never saw (`--held-out N`, default as many as `--samples`), since a plan fitted to its calibration data
measures a little higher there than on new data. Calibration data: `stdlib` (docstrings of the Python standard library, text encoders),
`images` (random crops of the photographs bundled with scikit-image, for vision towers such as CLIP),
`fashion` (the committed Fashion-MNIST sample, resized for other vision models), a folder of image files, or
a .safetensors file holding the model's input tensors (`input_ids` [+ `attention_mask`] or `pixel_values`,
optional `labels`). Images are preprocessed as the model's preprocessor_config.json says (size, mean, std).

`--ray local` (a Ray on this machine) or `--ray ADDRESS` (a cluster) evaluates the candidates of each search stage as
Ray tasks in parallel (`elision.apps.tokens.ray_search`); the choice is the local run's (see that module).
"""
from __future__ import annotations

import json
import shlex
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from elision.cli import failures, options
from elision.errors import ElisionError, missing_extra, require_extra
from elision.runtime.outputs import atomic_file, check_output_file

console = Console(stderr=True, emoji=False)  # specs and paths are user text, never :emoji: codes
out = Console(emoji=False)
_fail = failures.fail


def load_calibration(spec: str, model, adapter, samples: int, seq_len: int, held_out: int = 0):
    """Returns (inputs tuple, labels or None, held-out inputs tuple or None, held-out labels or None).

    The tune part is the first `samples` rows of the source, the held-out part the next `held_out` rows, and no
    held-out row equals a tune row (`calibration_split.split_rows` drops any that do, e.g. two texts that
    truncate to the same tokens). The bundled photographs are split by photo instead (crops of one photo would
    share pixels): even-numbered photos for tuning, odd-numbered ones held out."""
    # lazy: these import torch, which `elision --help` must not pay for
    from elision.models import datasets as calib
    from elision.apps.tokens.executor import BertAdapter
    from elision.apps.tokens.calibration_split import split_rows

    text = isinstance(adapter, BertAdapter)
    total = samples + held_out

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
        texts = calib.long_texts(total, int(seq_len * 0.9)) if seq_len > 200 else calib.stdlib_paragraphs(total)
        return split_rows(calib.tokenize(tok, texts, seq_len, pad_to_max=True), None, samples)
    path = Path(spec)
    if spec in ("fashion", "images") or path.is_dir():
        if text:
            raise ValueError(f"--calib {spec} is images; this model takes text (use --calib stdlib)")
        to_model = prep()
        if spec == "images":
            held = (calib.natural_images(held_out, to_model, part="held-out"),) if held_out else None
            return (calib.natural_images(samples, to_model, part="tune"),), None, held, None
        if path.is_dir():
            return split_rows((calib.folder_images(path, total, to_model),), None, samples)
        x, y = calib.fashion_sample(total)
        if to_model == calib.fashion_preprocessing():
            return split_rows((x,), y, samples)
        # another model's input format: same pictures, its size/channels/normalisation (labels belong to the ViT)
        return split_rows((to_model(calib.fashion_preprocessing().to_unit(x)),), None, samples)
    if not path.is_file() or path.suffix != ".safetensors":
        raise ValueError(f"--calib {spec!r}: use stdlib, images, fashion, a folder of images, or an existing "
                         ".safetensors file of input tensors")
    from safetensors.torch import load_file  # lazy: torch

    data = load_file(str(path))
    labels = data.get("labels")
    labels = labels[:total] if labels is not None else None
    if "input_ids" in data:
        ids = data["input_ids"][:total]
        mask = data.get("attention_mask", ids.new_ones(ids.shape))[:total]
        return split_rows((ids, mask), labels, samples)
    if "pixel_values" in data:
        return split_rows((data["pixel_values"][:total],), labels, samples)
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
        samples: int = typer.Option(32, "--samples", help="calibration rows the search tunes on"),
        held_out: Optional[int] = typer.Option(
            None, "--held-out", help="further rows of the same source, never among the tuning rows, on which the "
                                     "timed candidates' fidelity is reported too (default: as many as --samples; "
                                     "0: none)"),
        seq_len: int = typer.Option(128, "--seq-len", help="token length for text calibration"),
        plot: Path = typer.Option(Path("tune_pareto.png"), "--plot", help="where to write the Pareto plot (PNG)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object (all candidates, both fidelities, "
                                                           "the choice and its compile command) instead of a report"),
        repeats: int = typer.Option(5, "--repeats", help="timed runs per finalist (median)"),
        measure: str = typer.Option("executor", "--measure",
                                    help="time finalists in the eager executor (fast) or as deployed ONNX artifacts "
                                         "in onnxruntime (`onnxruntime`, alias `onnx`: slower to tune, only plans "
                                         "`elision compile` can apply)"),
        threads: Optional[int] = options.THREADS,
        dtype: str = options.DTYPE,
        device: Optional[str] = options.DEVICE,
        ray_address: Optional[str] = typer.Option(
            None, "--ray", help="evaluate candidates as Ray tasks in parallel: 'local' starts a Ray on this machine, "
                                "or a cluster address (host:port, ray://..., auto); needs the serve extra"),
        trust_code: bool = options.TRUST_CODE,
    ) -> None:
        """Search layer, keep ratio and skip sets for the fastest pipeline meeting --min-fidelity."""
        # lazy: torch, which `elision --help` must not pay for
        import torch
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
        measure = MEASURE_ALIASES.get(measure, measure)
        if measure not in ("executor", "onnxruntime"):
            raise _fail(f"--measure must be executor or onnxruntime, got {measure!r}")
        held_out = samples if held_out is None else held_out
        if held_out < 0:
            raise _fail(f"--held-out must be >= 0, got {held_out}")
        check_output_file(plot, "--plot file")
        if ray_address is not None:
            require_extra("serve", "elision tune --ray")  # before the model loads, not after
        placement = options.placement(dtype, device, threads)  # sets torch's threads (per Ray worker with --ray)
        from elision.frontend.model_spec import load_model  # lazy: torch

        try:
            loaded = load_model(model, trust_code=trust_code, placement=placement)
            adapter = adapter_for(loaded.model)
            if getattr(loaded.model, "tokenizer", None) is None and loaded.tokenizer is not None:
                loaded.model.tokenizer = loaded.tokenizer
            calib, labels, held, held_labels = load_calibration(calib_spec, loaded.model, adapter, samples, seq_len,
                                                                held_out)
            calib = placement.place_inputs(calib)
            held = placement.place_inputs(held) if held is not None else None
        except (ElisionError, PruningError, ValueError, FileNotFoundError) as e:
            raise _fail(str(e)) from None
        except ModuleNotFoundError as e:  # a module the model or its calibration data needs
            raise _fail(missing_extra(e, "elision tune") or e) from None
        timer = None
        if measure == "onnxruntime":
            from elision.apps.tokens.deployed import OnnxTimer  # lazy: onnxruntime, only with --measure onnxruntime

            names = ["input_ids", "attention_mask"] if len(calib) == 2 else ["pixel_values"]
            if not as_json:
                console.print("tracing the model at the calibration shape for ONNX timing")
            timer = OnnxTimer(loaded.model, calib, names, threads=threads)
        evaluator = None
        if ray_address is not None:
            from elision.apps.tokens.ray_search import RayEvaluator  # lazy: ray, optional (extra `serve`)

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
        timed = sorted([c for c in result.candidates if c.speedup is not None], key=lambda c: -c.speedup)
        unseen = held_out_fidelities(adapter, held, kind, held_labels, timed)
        with atomic_file(plot, what="--plot file") as tmp:
            pareto_plot(result, str(tmp), f"{model} ({len(result.candidates)} candidates)", min_fidelity,
                        "mean cosine" if kind == "embedding" else "fidelity exp(-KL)")
        best = result.best
        command = compile_command(model, best.plan.describe(), trust_code) if best is not None and \
            deployable(best.plan, adapter) else None
        if as_json:
            out.print_json(json.dumps({
                "model": model, "min_fidelity": min_fidelity, "measured_in": result.measured_in,
                "calibration": {"source": calib_spec, "tune_rows": int(calib[0].shape[0]),
                                "held_out_rows": int(held[0].shape[0]) if held is not None else 0},
                "reference_latency_s": result.reference_latency_s,
                "plain_latency_s": result.plain_latency_s, "executor_latency_s": result.executor_latency_s,
                "chosen": best.plan.describe() if best is not None else "",
                "chosen_fidelity": best.report.fidelity if best is not None else None,
                "chosen_held_out_fidelity": unseen.get(id(best)) if best is not None else None,
                "compile_command": command, "plot": str(plot),
                "candidates": [{"pipeline": c.plan.describe(), "method": c.method, **c.report.as_dict(),
                                "held_out_fidelity": unseen.get(id(c)), "latency_s": c.latency_s,
                                "speedup": c.speedup, "est_speedup": c.est_speedup}
                               for c in result.candidates]}))
            return
        table = Table(title=f"{escape(model)}: fastest measured candidates (fidelity >= {min_fidelity})")
        for col in ("pipeline", "fidelity", "held-out", "cosine", "KL", "top-1", "speed-up", "FLOPs est."):
            table.add_column(col, overflow="fold")  # pipelines must stay readable in full
        for c in timed:
            r = c.report
            table.add_row(c.plan.describe(), f"{r.fidelity:.4f}", _number(unseen.get(id(c))), f"{r.cosine:.4f}",
                          _number(r.kl), _number(r.top1, 3), f"{c.speedup:.2f}x", f"{c.est_speedup:.2f}x")
        out.print(table)
        rows = f"{calib[0].shape[0]} rows" + (f", held-out {held[0].shape[0]} other rows" if held is not None
                                              else ", no held-out rows")
        console.print(f"fidelity on the calibration data ({rows}, source {calib_spec})", markup=False)
        console.print(f"Pareto plot written to {plot}", markup=False)
        if result.measured_in == "deployed":
            console.print(f"unchanged model as an ONNX artifact: {result.reference_latency_s * 1e3:.1f} ms per "
                          "calibration batch (candidates timed as ONNX artifacts too)", highlight=False, soft_wrap=True)
        else:
            console.print(f"unchanged model: {result.reference_latency_s * 1e3:.1f} ms per calibration batch (plain "
                          f"forward {result.plain_latency_s * 1e3:.1f} ms, layer-by-layer executor "
                          f"{result.executor_latency_s * 1e3:.1f} ms)", highlight=False, soft_wrap=True)
        if best is None:
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
        out.print(f"chosen pipeline: {best.plan.describe()}", markup=False, soft_wrap=True)
        held_text = f", held-out fidelity {unseen[id(best)]:.4f}" if id(best) in unseen else ""
        out.print(f"  {best.report.summary()}{held_text}; speed-up {best.speedup:.2f}x "
                  f"({'ONNX artifacts' if result.measured_in == 'deployed' else 'eager executor'})", markup=False)
        if command is not None:
            out.print(f"compile it with: {command}", markup=False, soft_wrap=True)
        else:
            console.print("note: on a text encoder the merge-tokens IR pass does not follow a prune-tokens stage, "
                          "so `elision compile` cannot apply this pipeline; use --measure onnxruntime to tune among "
                          "deployable pipelines",
                          highlight=False, soft_wrap=True)


MEASURE_ALIASES = {"onnx": "onnxruntime"}  # the spelling earlier releases took; --help names it


def held_out_fidelities(adapter, held, kind: str, held_labels, candidates) -> dict[int, float]:
    """{id(candidate): fidelity on the held-out rows} for each candidate whose plan applies there."""
    if held is None or not candidates:
        return {}
    from elision.apps.tokens.search import LocalEvaluator  # lazy: torch

    reports = LocalEvaluator(adapter, held, kind, held_labels).reports([c.plan for c in candidates])
    return {id(c): r.fidelity for c, r in zip(candidates, reports) if r is not None}


def compile_command(model: str, pipeline: str, trust_code: bool) -> str:
    """The `elision compile` command line that applies `pipeline` to `model` (shell-quoted)."""
    name = Path(model.split(":", 1)[-1]).name or "model"
    parts = ["elision", "compile", model, "--passes", pipeline, "--approximate", "--emit", "onnx", "-o",
             f"{name}-tuned"]
    if trust_code:
        parts.append("--trust-code")
    return " ".join(shlex.quote(p) for p in parts)


def _number(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"
