"""`make demo`: elision's main job on built-in models, end to end, on a CPU.

1. inspect + compile + verify a built-in model (IR, passes, bit-exact check)
2. the trained tiny code LM compiled to an ONNX Runtime artifact: parity and latency beside eager PyTorch
3. speculative decoding: the same model generating with and without elision, identical text, speedup
4. token pruning / layer skipping: a tuned pipeline on MiniLM and the Fashion-MNIST ViT, Pareto plots
5. sparse volume decoding: one fixture shape decoded dense and sparse, queries, time, IoU, PNG previews;
   adaptive KV on the decoder with local attention (K/V read, time, IoU)
Outputs land in demo-out/.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.table import Table

from elision.cli.quiet import hide_third_party_noise

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "demo-out"
console = Console()


def elision(*args: str) -> None:
    cmd = [sys.executable, "-m", "elision.cli.main", *args]
    console.print(f"[dim]$ elision {' '.join(args)}[/]")
    subprocess.run(cmd, check=True, cwd=ROOT)


def median_ms(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def step_compile() -> None:
    console.rule("1. inspect, compile and verify builtin:tiny-llama")
    elision("inspect", "builtin:tiny-llama", "--top", "8")
    elision("compile", "builtin:tiny-llama", "--emit", "ir", "-o", str(OUT / "tiny-llama-ir"), "--verify")


def step_onnx() -> None:
    console.rule("2. builtin:tiny-code-lm as an ONNX Runtime artifact")
    art = OUT / "tiny-code-lm-onnx"
    elision("compile", "builtin:tiny-code-lm", "--emit", "onnx", "-o", str(art), "--verify")
    from elision.models import get_builtin
    from elision.runtime.artifact import load_artifact

    model = get_builtin("tiny-code-lm").build()
    artifact = load_artifact(art)
    ids = torch.randint(0, model.config.vocab_size, (1, 128), generator=torch.Generator().manual_seed(0))
    name = artifact.spec("forward").input_names[0]
    with torch.no_grad():
        want = model(ids, use_cache=False).logits
        got = next(iter(artifact.run("forward", **{name: ids.numpy()}).values()))
        eager = median_ms(lambda: model(ids, use_cache=False))
    ort = median_ms(lambda: artifact.run("forward", **{name: ids.numpy()}))
    err = float(np.abs(got - want.numpy()).max())
    t = Table(title="prefill, batch 1, 128 tokens (median ms)")
    for c in ("eager PyTorch", "elision ONNX Runtime", "speedup", "max abs error"):
        t.add_column(c, justify="right")
    t.add_row(f"{eager:.1f}", f"{ort:.1f}", f"{eager / ort:.2f}x", f"{err:.2e}")
    console.print(t)


def step_specdec() -> None:
    console.rule("3. speculative decoding on builtin:tiny-code-lm (greedy, lossless)")
    from elision.models.code_lm import load_model, load_prompts, load_tokenizer
    from elision.apps.specdec import generate

    model, tok = load_model("tiny-code-lm"), load_tokenizer("tiny-code-lm")
    prompt = load_prompts("tiny-code-lm")["code"][0]["text"]
    ids = tok(prompt, return_tensors="pt").input_ids
    n = 96
    model.generation_config.eos_token_id = None  # fixed-length runs: every method makes exactly n tokens
    with torch.no_grad():
        # one short warm-up call per method, so first-call overheads (allocator, kernel selection) are not timed
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                       pad_token_id=tok.pad_token_id)
        t0 = time.perf_counter()
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, do_sample=False,
                             pad_token_id=tok.pad_token_id)
        hf_s = time.perf_counter() - t0
    hf_tokens = ref[0, ids.shape[1]:].tolist()
    t = Table(title=f"{n} new tokens, greedy")
    for c in ("method", "tokens/s", "speedup", "mean accepted", "forward passes", "identical to HF"):
        t.add_column(c, justify="right")
    t.add_row("HF generate", f"{len(hf_tokens) / hf_s:.0f}", "1.00x", "1.00", str(len(hf_tokens)), "-")
    for drafter in ("recycling+lookup", "lookup", "copy"):
        generate(model, ids, max_new_tokens=4, drafter=drafter, eos_token_id=None)
        res = generate(model, ids, max_new_tokens=n, drafter=drafter, eos_token_id=None)
        s = res.stats
        same = res.tokens[0] == hf_tokens
        t.add_row(f"elision {drafter}", f"{s['tokens_per_s']:.0f}", f"{s['tokens_per_s'] * hf_s / len(hf_tokens):.2f}x",
                  f"{s['mean_accepted_length']:.2f}", str(s["forward_passes"]), "yes" if same else "[red]NO[/]")
    # the same model as an ONNX generation artifact, decoded by the torch-free loop (what `elision run DIR
    # --prompt` does at deploy time)
    art = OUT / "tiny-code-lm-generate"
    elision("compile", "builtin:tiny-code-lm", "--emit", "onnx", "--for", "generate", "-o", str(art))
    from elision.runtime.generation.ort_generator import OrtGenerator

    ort = OrtGenerator.load(art)
    ort.generate(ids[0].tolist(), max_new_tokens=4, eos_token_id=[])
    res = ort.generate(ids[0].tolist(), max_new_tokens=n, drafter="recycling+lookup", eos_token_id=[])
    s = res.stats
    t.add_row("elision ORT recycling+lookup", f"{s['tokens_per_s']:.0f}",
              f"{s['tokens_per_s'] * hf_s / len(hf_tokens):.2f}x", f"{s['mean_accepted_length']:.2f}",
              str(s["forward_passes"]), "yes" if list(res.tokens) == hf_tokens else "[red]NO[/]")
    console.print(t)
    console.print("[dim]same text, fewer forward passes: speculation is lossless; the ORT row runs with numpy + "
                  "onnxruntime only[/]")


def step_pruning() -> None:
    console.rule("4. tuned token pruning / layer skipping (approximate, fidelity reported)")
    elision("tune", "builtin:minilm", "--passes", "prune-tokens,merge-tokens,skip-layers", "--min-fidelity", "0.98",
            "--samples", "8", "--repeats", "3", "--plot", str(OUT / "minilm_pareto.png"))
    elision("tune", "builtin:fashion-vit", "--passes", "prune-tokens,merge-tokens,skip-layers", "--min-fidelity", "0.98",
            "--calib", "fashion", "--samples", "64", "--repeats", "3", "--plot", str(OUT / "fashion_vit_pareto.png"))


def step_volume() -> None:
    console.rule("5. sparse volume decoding of a fitted VecSet shape (elephant, 128^3)")
    from elision.models.vecset import fixture_latents, load_checkpoint
    from elision.models.vecset import FIXTURE_DIR
    from elision.apps.volume import DEFAULT_PIPELINE, compile_field, decode_volume
    from elision.apps.volume.mesh import extract_mesh, occupancy_iou, render_preview, save_mesh

    model = load_checkpoint(FIXTURE_DIR / "vecset-tiny.safetensors")
    latents = fixture_latents("elephant")
    res = 128
    # compiled once per model and pipeline (trace, passes, lowering); the decodes are timed
    dense_field, sparse_field = compile_field(model, "hoist-invariants"), compile_field(model, DEFAULT_PIPELINE)
    t0 = time.perf_counter()
    dense = decode_volume(dense_field, latents, res)
    t_dense = time.perf_counter() - t0
    t0 = time.perf_counter()
    sparse = decode_volume(sparse_field, latents, res)
    t_sparse = time.perf_counter() - t0
    t = Table(title=f"elephant at {res}^3")
    for c in ("decoding", "field queries", "seconds", "IoU vs dense"):
        t.add_column(c, justify="right")
    t.add_row("dense (chunked)", f"{dense.summary()['queries']:,}", f"{t_dense:.1f}", "1.0000")
    t.add_row("elision sparse", f"{sparse.summary()['queries']:,}", f"{t_sparse:.1f}", f"{occupancy_iou(dense, sparse):.4f}")
    console.print(t)
    for name, r in (("dense", dense), ("sparse", sparse)):
        mesh = extract_mesh(r)
        save_mesh(mesh, OUT / f"elephant_{name}.glb")
        render_preview(mesh, OUT / f"elephant_{name}.png", title=f"elephant, {name} decoding")
    console.print(f"meshes and previews in {OUT}/elephant_*.glb / .png")

    # adaptive KV needs a decoder whose cross-attention is local: builtin:vecset-local (1024 latents)
    from elision.models.registry import get_builtin
    from elision.models.vecset import LOCAL_FIXTURE_DIR
    local = get_builtin("vecset-local").build()
    latents = fixture_latents("elephant", LOCAL_FIXTURE_DIR)
    t = Table(title=f"adaptive KV on builtin:vecset-local, elephant at {res}^3")
    for c in ("decoding", "field queries", "seconds", "of which field", "K/V read", "IoU vs hierarchical"):
        t.add_column(c, justify="right")
    runs = {}
    for label, passes in (("hierarchical", "hoist-invariants,sparse-volume"),
                          ("+ adaptive KV (top-32 ladder)", "hoist-invariants,sparse-volume,adaptive-kv{topk=32,block=16}")):
        field = compile_field(local, passes)
        t0 = time.perf_counter()
        runs[label] = r = decode_volume(field, latents, res)
        kv = f"{r.kv_stats['kv_fraction']:.2f}" if r.kv_stats else "1.00"
        t.add_row(label, f"{r.queries:,}", f"{time.perf_counter() - t0:.2f}", f"{r.seconds['field']:.2f}", kv,
                  f"{occupancy_iou(runs['hierarchical'], r):.4f}")
    console.print(t)


def main() -> None:
    hide_third_party_noise()  # what the CLI does by default: no "Loading weights" bars or exporter warnings
    OUT.mkdir(exist_ok=True)
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    for step in (step_compile, step_onnx, step_specdec, step_pruning, step_volume):
        step()
    console.rule("done")


if __name__ == "__main__":
    main()
