"""`elision generate`: speculative generation from the command line, streaming or as one JSON object.

MODEL is a Hugging Face causal-LM directory with a tokenizer (loaded offline), or `builtin:tiny-code-lm`.
`--target torch` (default) decodes with the PyTorch model; `--target onnxruntime` compiles MODEL once into a
generation artifact kept in the user cache (keyed by the weights' hash, elision's version and --dtype: float32, or
float16, which onnxruntime's CPU provider runs too) and decodes it with ONNX Runtime, the fast route, in one command.
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.markup import escape

from elision.cli import failures, options
from elision.runtime.generation.bookkeeping import IncrementalDecoder
from elision.runtime.outputs import atomic_file, check_output_file

KNOWN = "lookup, recycling, copy, layer-skip, draft-model, none, or a '+' combination such as recycling+lookup"


class _ConsoleStreamer:
    """HF-streamer-compatible (`put`/`end`): prints decoded text as tokens are accepted."""

    def __init__(self, console: Console, tokenizer):
        self.console = console
        self.decoder = IncrementalDecoder(tokenizer)
        self.prompt_seen = False

    def put(self, value) -> None:
        if not self.prompt_seen:
            self.prompt_seen = True
            return
        piece = self.decoder.push(value.flatten().tolist())
        if piece:
            self.console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

    def end(self) -> None:
        self.console.print(self.decoder.finish(), markup=False, highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    @app.command("generate")
    @failures.command
    def generate_cmd(
        model: str = typer.Argument(..., help="Hugging Face causal LM directory (with tokenizer), Hub id (org/name) "
                                              "or builtin:tiny-code-lm"),
        prompt: str = typer.Option(..., "--prompt", help="prompt text"),
        max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="tokens to generate"),
        drafter: str = typer.Option("recycling+lookup", "--drafter", "-d", help=f"drafter: {KNOWN}"),
        tree: str = typer.Option("dynamic", "--tree", help="'dynamic' or 'static:<template>' (chain-4, 4x2x1, ...)"),
        draft_model: Optional[str] = typer.Option(None, "--draft-model", help="draft model directory (drafter draft-model)"),
        skip_layers: Optional[str] = typer.Option(None, "--skip-layers", help="layer-skip drafter: comma-separated decoder layers to bypass, e.g. 2,4,6"),
        do_sample: bool = typer.Option(False, "--sample/--greedy", help="sample (lossless rejection sampling) or greedy"),
        temperature: float = typer.Option(1.0, "--temperature"),
        top_k: int = typer.Option(0, "--top-k"),
        top_p: float = typer.Option(1.0, "--top-p"),
        seed: Optional[int] = typer.Option(None, "--seed"),
        stop: Optional[list[str]] = typer.Option(None, "--stop", help="stop string (repeatable)"),
        as_json: bool = typer.Option(False, "--json", help="print one JSON object with tokens, text and stats"),
        visualize: Optional[Path] = typer.Option(None, "--visualize", help="write the most-accepted draft tree to this .png/.html"),
        target: str = typer.Option("torch", "--target", help="torch, or onnxruntime (compiles and caches a generation "
                                   "artifact on first use, then decodes with ONNX Runtime)"),
        threads: Optional[int] = options.THREADS,
        dtype: str = options.DTYPE,
        device: Optional[str] = options.DEVICE,
        compile_step: bool = typer.Option(True, "--compile/--no-compile", help="torch target on CPU: compile the "
                                          "model's verification step (export, elision's passes, inductor) before "
                                          "decoding; --no-compile runs the Hugging Face model as is (always so for "
                                          "--draft-model, the layer-skip drafter and CUDA)"),
    ) -> None:
        """Generate text with lossless speculative decoding (output identical to the model's own decoding)."""
        console = Console(stderr=as_json, emoji=False)
        err = Console(stderr=True, emoji=False)
        if not prompt:
            raise failures.fail("the prompt is empty: pass some text with --prompt")
        failures.check_prompt(prompt)
        if max_new_tokens < 1:
            raise failures.fail(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
        if visualize is not None and visualize.suffix.lower() not in (".png", ".html", ".htm"):
            raise failures.fail(f"--visualize needs a .png or .html file name, got {visualize.name!r}")
        if visualize is not None:
            check_output_file(visualize, "--visualize file")
        if target not in ("torch", "onnxruntime"):
            raise failures.fail(f"--target must be 'torch' or 'onnxruntime', got {target!r}")
        if threads is not None and threads < 1:
            raise failures.fail(f"--threads must be >= 1, got {threads}")
        if target == "onnxruntime":
            options.check_dtype(dtype)
            providers = options.ort_providers(device)
            unsupported = [o for o, v in (("--draft-model", draft_model), ("--skip-layers", skip_layers),
                                          ("--visualize", visualize)) if v]
            if unsupported:
                raise failures.fail(f"{', '.join(unsupported)} need --target torch (model drafters and tree pictures "
                                    "run in the PyTorch loop)")
            _generate_onnxruntime(model, prompt, max_new_tokens, drafter, tree, do_sample, temperature, top_k, top_p,
                                  seed, stop, as_json, threads, dtype, providers, console, err)
            return
        placement = options.placement(dtype, device, threads)  # imports torch: the onnxruntime route never needs it
        skip = None
        if skip_layers:
            try:
                skip = sorted({int(x) for x in skip_layers.split(",") if x.strip()})
            except ValueError:
                raise failures.fail(f"--skip-layers must be comma-separated layer numbers like 2,4,6, got {skip_layers!r}")
        # lazy: torch (the onnxruntime route and `elision --help` never need it)
        from elision.apps.specdec.cache import CacheOverflowError
        from elision.apps.specdec.generate import SpeculativeGenerator

        try:
            with err.status(f"loading {escape(model)}"):
                from elision.apps.specdec.loading import load_causal_lm  # lazy: torch and transformers

                target, tokenizer = load_causal_lm(model, placement)
                draft = load_causal_lm(draft_model, placement)[0] if draft_model else None
            hf_only = (draft is not None or skip is not None or "layer-skip" in drafter.split("+")
                       or placement.device != "cpu")
            if compile_step and not hf_only:
                from elision.apps.specdec.compiled_backend import compiled_generator  # lazy: torch.export, inductor

                with err.status("compiling the verification step (export, passes, inductor)"):
                    gen = compiled_generator(target, tokenizer=tokenizer, drafter=drafter, tree=tree)
            else:
                gen = SpeculativeGenerator(target, tokenizer=tokenizer, drafter=drafter, draft_model=draft, tree=tree,
                                           skip_layers=skip)
        except ValueError as e:
            raise failures.fail(str(e)) from None
        ids = tokenizer(prompt, return_tensors="pt").input_ids.to(placement.device)
        if ids.shape[1] == 0:
            raise failures.fail("the prompt encodes to zero tokens: pass some text with --prompt")
        eos = tokenizer.eos_token_id
        streamer = None if as_json else _ConsoleStreamer(console, tokenizer)
        try:
            result = gen.generate(
                ids, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k, top_p=top_p,
                eos_token_id=eos, stop_strings=stop or None, seed=seed, streamer=streamer,
                record_trees=visualize is not None,
            )
        except (ValueError, CacheOverflowError) as e:
            raise failures.fail(str(e)) from None
        stats = result.stats
        compile_s = getattr(gen, "compile_s", None)  # paid once before the first token, outside time_s["total"]
        stats["time_s"]["compile_s"] = sum(compile_s.values()) if compile_s else 0.0
        if visualize is not None and result.steps:
            from elision.apps.specdec.visualize import pick_step, render_tree  # lazy: torch

            with atomic_file(visualize, what="--visualize file") as tmp:
                render_tree(pick_step(result), tmp, tokenizer)
        if as_json:
            print(json.dumps({"tokens": result.tokens[0], "text": result.text[0], "stats": stats}))
        else:
            err.print(
                f"[dim]{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, {stats['forward_passes']} forward passes, "
                f"mean accepted length {stats['mean_accepted_length']:.2f} ({escape(str(stats['drafter']))}, tree "
                f"{escape(str(stats['tree']))})[/]"
            )
            if compile_s:
                err.print(f"[dim]step compiled in {sum(compile_s.values()):.1f} s before the first token "
                          f"(export and passes {compile_s['export_s']:.1f} s, code generation and cost "
                          f"curve {compile_s['warm_up_s']:.1f} s)[/]")
            if visualize is not None:
                err.print(f"[dim]draft tree written to {escape(str(visualize))}[/]")


def _generate_onnxruntime(model: str, prompt: str, max_new_tokens: int, drafter: str, tree: str, do_sample: bool,
                          temperature: float, top_k: int, top_p: float, seed: Optional[int], stop: Optional[list[str]],
                          as_json: bool, threads: Optional[int], dtype: str, providers: Optional[list[str]],
                          console: Console, err: Console) -> None:
    # lazy: onnxruntime and (to compile on first use) torch, which `elision --help` must not pay for
    from elision.apps.specdec.artifact_cache import cached_generation_artifact
    from elision.runtime.artifact import ArtifactError
    from elision.runtime.generation.ort_generator import OrtGenerator

    started = time.perf_counter()
    try:
        with err.status(f"preparing {escape(model)} for onnxruntime") as status:
            artifact, compiled = cached_generation_artifact(model, progress=status.update, dtype=dtype)
            gen = OrtGenerator.load(artifact, threads=threads, drafter=drafter, tree=tree, providers=providers)
    except (ValueError, ArtifactError) as e:
        raise failures.fail(str(e)) from None
    prepare_s = time.perf_counter() - started  # compiling (first use) or reading the cached artifact, loading it
    if compiled and not as_json:
        err.print(f"[dim]compiled {escape(model)} into {escape(str(artifact))} (reused from now on)[/]")

    def stream(piece: str) -> None:
        if piece:
            console.print(piece, end="", markup=False, highlight=False, soft_wrap=True)

    try:
        result = gen.generate(prompt, max_new_tokens, do_sample=do_sample, temperature=temperature, top_k=top_k,
                              top_p=top_p, seed=seed, stop_strings=stop or None, stream=None if as_json else stream)
    except (ValueError, ArtifactError) as e:
        raise failures.fail(str(e)) from None
    stats = result.stats
    stats["time_s"]["compile_s"] = prepare_s  # paid before the first token, outside time_s["total"]
    if as_json:
        print(json.dumps({"tokens": result.tokens, "text": result.text, "stats": stats}))
        return
    console.print("", markup=False)
    err.print(f"[dim]{stats['new_tokens']} tokens, {stats['tokens_per_s']:.1f} tok/s, {stats['forward_passes']} forward "
              f"passes, mean accepted length {stats['mean_accepted_length']:.2f} ({stats['drafter']}, tree "
              f"{stats['tree']}, onnxruntime, {gen.threads} thread(s))[/]")
