"""The generation artifact: what `elision compile MODEL --emit onnx --for generate -o DIR` writes.

    DIR/manifest.json     runtime_settings: kind "specdec-generate", the specdec attributes, and "generation":
                          EOS ids, position limit, vocabulary, K/V layout, the step form, what the ONNX Runtime
                          lowering fused, and the calibration measured on the compiling machine
    DIR/step.onnx         the generation step (`elision.runtime.generation.step_signature`): @verify lowered with
                          the onnxscript rules of `elision.lowering.ort_rules` to GroupQueryAttention over a
                          KV cache written in place, packed QKV, fused RMSNorms
                          (or DIR/verify.onnx, the concatenating form, when a model's attention does not fuse)
    DIR/weights.bin
    DIR/tokenizer.json    the model's fast tokenizer (+ tokenizer_config.json ...), sha256-checked like the graphs

Compile flow: load -> `compile_specdec` (canonicalize,cse,kv-cache,tree-verify,dce) -> torch.onnx export of @verify
-> `lower_generation_step` -> write -> differential check against the compiled @verify in torch
(`step_check.py`; a mismatch falls back to the verify form and says why) -> calibration on this machine (thread
count, verification-cost curve). `elision run DIR --prompt TEXT` (`elision.runtime.generation.ort_generator`)
generates from it with onnxruntime, numpy and tokenizers only.
"""
from __future__ import annotations

import gc
import tempfile
import time
from pathlib import Path
from typing import Callable

from tokenizers import Tokenizer

from elision.apps.specdec.compiled_backend import compile_specdec, export_specdec_onnx, specdec_onnx_entry
from elision.apps.specdec.loading import load_causal_lm
from elision.apps.specdec.step_check import StepMismatchError, check_step_artifact, reference_run, step_tolerance
from elision.frontend.placement import DEFAULT, Placement
from elision.lowering.onnx_export import ArtifactWriter, export_program
from elision.lowering.ort_rules import StepLoweringError, lower_generation_step
from elision.runtime.artifact import MANIFEST_NAME, read_manifest, select_providers
from elision.runtime.generation import step_signature as sig
from elision.runtime.generation.ort_generator import GENERATION_KIND, calibrate_artifact
from elision.runtime.outputs import atomic_directory
from elision.runtime.precision import CPU_DTYPES, cpu_refusal

# a string with code, prose, spaces and non-ASCII text: the exported tokenizer must split it like the HF one
_TOKENIZER_PROBE = "def f(x):\n    return x  # ok\nThe café costs 3 €."


def _eos_ids(model, tokenizer) -> list[int]:
    """EOS ids the way Hugging Face `generate` reads them (generation config first), else the tokenizer's."""
    value = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if value is None:
        value = getattr(model.config, "eos_token_id", None)
    if value is None:
        value = tokenizer.eos_token_id
    if value is None:
        return []
    return sorted({int(value)} if isinstance(value, int) else {int(v) for v in value})


def _save_tokenizer(tokenizer, directory: Path) -> dict[str, Path]:
    """Write the tokenizer as Hugging Face saves it; {file name: path}. Needs a fast (tokenizer.json) tokenizer."""
    if getattr(tokenizer, "backend_tokenizer", None) is None:
        raise ValueError("the generation artifact needs a fast tokenizer (tokenizer.json); this model only has a "
                         f"slow {type(tokenizer).__name__}")
    tokenizer.save_pretrained(directory)
    tokenizer.backend_tokenizer.save(str(directory / "tokenizer.json"))
    exported = Tokenizer.from_file(str(directory / "tokenizer.json")).encode(_TOKENIZER_PROBE).ids
    if list(exported) != list(tokenizer(_TOKENIZER_PROBE).input_ids):
        raise ValueError("the model's tokenizer adds tokens in Python that tokenizer.json does not describe, so a "
                         "torch-free loop would encode prompts differently; use `elision generate` for this model")
    return {p.name: p for p in sorted(directory.iterdir()) if p.is_file() and p.suffix in (".json", ".jinja", ".txt")}


def _write_step_artifact(spec, out_dir: Path, generation: dict, files: dict, progress, device: str | None) -> dict:
    """Export @verify, lower it to the step graph and write the artifact; StepLoweringError when it does not fuse."""

    config, a = spec.config, spec.attrs
    if not config.get("max_positions"):
        raise StepLoweringError("the model declares no position limit (max_position_embeddings) to size the rotary "
                                "tables")
    module, inputs, dyn, _ = specdec_onnx_entry(spec, "verify")
    if progress:
        progress("exporting @verify to ONNX")
    model = export_program("verify", module, inputs, dyn, optimize=False).model  # the lowering optimizes it
    if progress:
        progress("lowering to ONNX Runtime's fused operators (GroupQueryAttention, shared KV buffers)")
    report = lower_generation_step(model, max_positions=int(config["max_positions"]), kv_heads=int(a["kv_heads"]),
                                   head_dim=int(a["head_dim"]))
    generation.update(form=sig.STEP_FORM, function=sig.STEP_FUNCTION,
                      kv_inputs=[sig.past_name(i // 2, ("key", "value")[i % 2]) for i in range(2 * int(a["num_layers"]))],
                      lowering=report["fusions"])
    with ArtifactWriter(out_dir) as writer:
        writer.add_model(sig.STEP_FUNCTION, model, {"applied": True, "fusions": report["fusions"]})
        del model
        writer.finish(pipeline=spec.pipeline, source_hash=str(spec.ir.attrs.get("source_model", "")),
                      runtime_settings={"specdec": a, "config": config, "kind": GENERATION_KIND,
                                        "generation": generation},
                      extra_files=files, dtype=str(config["dtype"]), device=device)
    return report


def _write_verify_artifact(spec, out_dir: Path, generation: dict, files: dict, fallback: str | None, progress,
                           timings: dict, device: str | None) -> None:
    t0 = time.perf_counter()
    settings = dict(generation, step_lowering=fallback) if fallback else generation
    export_specdec_onnx(spec, out_dir, functions=("verify",), progress=progress,
                        settings={"kind": GENERATION_KIND, "generation": settings}, extra_files=files, device=device)
    timings["export_s"] = time.perf_counter() - t0


def check_dtype_runs_here(dtype: str) -> None:
    """The artifact is checked against torch and calibrated with onnxruntime on this machine: refuse a dtype its
    providers cannot run (bfloat16 without CUDA) before anything is loaded, with what to do instead."""
    providers = select_providers()
    refusal = cpu_refusal(dtype, providers, f"it has no {dtype} MatMul kernel") if dtype not in CPU_DTYPES else None
    if refusal is not None:
        raise ValueError(f"cannot write a {dtype} generation artifact here: {refusal}")


def export_generation_artifact(model_spec: str, out_dir: Path, progress: Callable[[str], None] | None = None,
                               *, form: str = sig.STEP_FORM, calibrate: bool = True,
                               placement: Placement = DEFAULT, device: str | None = None) -> dict:
    """Compile MODEL (HF causal-LM directory or builtin:NAME) for speculative decoding and write the artifact.

    `form`: "gqa-shared-kv" (the step graph; falls back to the verify form, with the reason in the report, when
    the model's attention does not fuse or the lowered step does not match) or "concat-kv" (the verify form).
    `calibrate`: time the thread counts and the verification-cost curve on this machine into the manifest.
    `placement`: the dtype of the weights, K/V cache and logits (float32, or float16, which onnxruntime's CPU provider
    runs too; bfloat16 only where onnxruntime has CUDA); the model is traced on the CPU.
    `device`: where the artifact should run first, recorded as the order of the manifest's execution providers,
    which `elision run` follows unless told otherwise: "cpu" puts the CPU provider first, "cuda" or None CUDA
    (where onnxruntime-gpu sees a GPU). The graph is the same either way.
    Returns a report: the pipeline, the form, the written files, the generation settings and the timings.
    """
    if form not in (sig.STEP_FORM, sig.VERIFY_FORM):
        raise ValueError(f"form must be {sig.STEP_FORM!r} or {sig.VERIFY_FORM!r}, got {form!r}")
    check_dtype_runs_here(placement.dtype)
    # Staged as a whole: the artifact is written, checked against torch and calibrated before it replaces a
    # previous one at `out_dir`; a failure or Ctrl-C at any point leaves that previous artifact as it was.
    with atomic_directory(out_dir, marker=MANIFEST_NAME, what="artifact directory") as stage:
        report = _export_staged(model_spec, stage, progress, form, calibrate, placement, device)
    report["written"] = [str(Path(out_dir) / Path(p).name) for p in report["written"]]
    return report


def _export_staged(model_spec: str, out_dir: Path, progress: Callable[[str], None] | None, form: str,
                   calibrate: bool, placement: Placement, device: str | None) -> dict:
    """The body of `export_generation_artifact`, writing into the (temporary) directory `out_dir`."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    if progress:
        progress(f"loading {model_spec}")
    model, tokenizer = load_causal_lm(model_spec, placement)
    if progress:
        progress("compiling @verify (export, kv-cache, tree-verify)")
    spec = compile_specdec(model)
    timings["trace_and_passes_s"] = time.perf_counter() - t0
    a, config = spec.attrs, spec.config
    fn = spec.ir.functions["verify"]
    generation = {
        "form": sig.VERIFY_FORM,
        "function": "verify",
        "tokenizer": "tokenizer.json",
        "eos_token_ids": _eos_ids(model, tokenizer),
        "max_positions": config["max_positions"],
        "vocab_size": config["vocab_size"],
        "sliding_window": config["sliding_window"],
        "dtype": config["dtype"],
        # K/V: one [batch, kv_heads, length, head_dim] tensor per layer and kind, in this order
        "kv_layers": int(a["num_layers"]),
        "kv_heads": int(a["kv_heads"]),
        "head_dim": int(a["head_dim"]),
        "kv_inputs": [v.name for v in fn.inputs[3:]],
    }
    fallback = None
    with tempfile.TemporaryDirectory(prefix="elision-tokenizer-") as tmp:
        files = _save_tokenizer(tokenizer, Path(tmp))
        if form == sig.STEP_FORM:
            t0 = time.perf_counter()
            try:
                reference = reference_run(spec)  # what the lowered step must reproduce
                _write_step_artifact(spec, out_dir, dict(generation), files, progress, device)
                timings["export_and_lower_s"] = time.perf_counter() - t0
            except StepLoweringError as e:
                fallback = str(e)
        if form == sig.VERIFY_FORM or fallback is not None:
            _write_verify_artifact(spec, out_dir, generation, files, fallback, progress, timings, device)
        pipeline = spec.pipeline
        # the torch model goes before onnxruntime loads the artifact (check, calibration): never both in memory
        del spec, model, fn
        gc.collect()
        if form == sig.STEP_FORM and fallback is None:
            t0 = time.perf_counter()
            if progress:
                progress("checking the ONNX Runtime step against the compiled @verify")
            try:
                worst = check_step_artifact(out_dir, reference, step_tolerance(generation["dtype"]))
            except StepMismatchError as e:
                fallback = str(e)
                # the verify form needs the compiled graph again: recompile (rare: a lowering bug or an ORT limit)
                model, tokenizer = load_causal_lm(model_spec, placement)
                spec = compile_specdec(model)
                _write_verify_artifact(spec, out_dir, generation, files, fallback, progress, timings, device)
                pipeline = spec.pipeline
                del spec, model
                gc.collect()
            timings["check_s"] = time.perf_counter() - t0
    calibration = None
    if calibrate:
        t0 = time.perf_counter()
        record = calibrate_artifact(out_dir, progress=progress)
        calibration = {"threads": record.threads, "step_s": record.step_s}
        timings["calibrate_s"] = time.perf_counter() - t0
    written = read_manifest(out_dir)["runtime_settings"]["generation"]
    report = {"pipeline": pipeline, "form": written["form"], "generation": written, "timings_s": timings,
              "written": [str(p) for p in sorted(Path(out_dir).iterdir()) if p.is_file()]}
    if fallback is not None:
        report["step_lowering"] = fallback
    elif written["form"] == sig.STEP_FORM:
        report["max_relative_error"] = worst
    if calibration is not None:
        report["calibration"] = calibration
    return report
