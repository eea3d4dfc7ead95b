"""Compile time of a Llama graph (32 layers by default): torch.export -> IR, then the default pass pipeline, old vs new.

Usage: .venv/bin/python tools/bench_compile_time.py [--baseline-ref main] [--layers 32] [--hidden 256] [--repeats 3]

Both sides run the same measurement in a fresh interpreter: build a transformers LlamaForCausalLM from a
LlamaConfig (random weights, seed 0), export it to elision's IR with the dynamic (batch, seq) dims `elision compile`
uses, then run the default pipeline through the pass manager. The baseline side imports elision from a copy of
`--baseline-ref` (extracted with `git archive`), the other side from this checkout. Rounds alternate between the
sides; the table holds medians and ratios. Both sides must produce the same node counts (checked).

Writes bench_results/compile_time.md and bench_results/compile_time.png.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def measure(layers: int, hidden: int) -> dict:
    """One export + default pipeline in this interpreter (whichever elision is first on sys.path)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    import elision
    from elision.apps.compile.api import default_pipeline
    from elision.frontend import trace
    from elision.frontend.model_spec import default_example_inputs
    from elision.passes.manager import PassManager
    from elision.passes.pipeline import parse_pipeline

    # time the FX -> IR import apart from torch.export (which both sides share)
    importing = {"s": 0.0}
    import_program = trace.import_exported_program

    def timed_import(*args, **kwargs):
        t = time.perf_counter()
        try:
            return import_program(*args, **kwargs)
        finally:
            importing["s"] += time.perf_counter() - t

    trace.import_exported_program = timed_import

    torch.manual_seed(0)
    config = LlamaConfig(num_hidden_layers=layers, hidden_size=hidden, intermediate_size=hidden * 11 // 4,
                         num_attention_heads=max(hidden // 64, 2), num_key_value_heads=max(hidden // 128, 1),
                         vocab_size=32000, max_position_embeddings=2048)
    model = LlamaForCausalLM(config).eval()
    example, dynamic_dims = default_example_inputs(model)
    t0 = time.perf_counter()
    ir = trace.export_to_ir(model, example, dynamic_dims)
    export_s = time.perf_counter() - t0
    nodes_exported = ir.node_count()
    pm = PassManager(parse_pipeline(default_pipeline()))
    t0 = time.perf_counter()
    pm.run(ir)
    pipeline_s = time.perf_counter() - t0
    return {"elision": str(Path(elision.__file__).parent), "export_s": export_s, "import_s": importing["s"],
            "pipeline_s": pipeline_s,
            "nodes_exported": nodes_exported, "nodes_after": ir.node_count(),
            "passes": {r["name"]: r["seconds"] for r in pm.report()}, "torch_threads": torch.get_num_threads()}


def _run_side(tree: Path, layers: int, hidden: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    out = subprocess.run([sys.executable, __file__, "--worker", "--layers", str(layers), "--hidden", str(hidden)],
                         env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise SystemExit(f"measurement with elision from {tree} failed:\n{out.stderr[-3000:]}")
    result = json.loads(out.stdout.strip().splitlines()[-1])
    if Path(result["elision"]).resolve() != (tree / "elision").resolve():
        raise SystemExit(f"the worker imported elision from {result['elision']}, not from {tree}")
    return result


def _extract(ref: str, into: Path) -> Path:
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref, "elision"], capture_output=True, check=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive.stdout, check=True)
    return into


def _plot(rows: dict, path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    phases = ["export_s", "pipeline_s"]
    for k, (side, results) in enumerate(rows.items()):
        medians = [statistics.median(r[p] for r in results) for p in phases]
        ax.bar([i + k * 0.38 for i in range(len(phases))], medians, width=0.38, label=side)
    ax.set_xticks([i + 0.19 for i in range(len(phases))], ["torch.export -> IR", "default pipeline"])
    ax.set_ylabel("seconds (median)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--baseline-ref", default="main", help="git ref whose elision/ is the baseline")
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--hidden", type=int, default=256, help="hidden size (node count does not depend on it)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=str(ROOT / "bench_results"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.worker:
        print(json.dumps(measure(a.layers, a.hidden)))
        return
    ours = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "-C", str(ROOT), "status", "--porcelain", "elision"], capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="elision-baseline-") as tmp:
        baseline = _extract(a.baseline_ref, Path(tmp))
        sides = {f"baseline ({a.baseline_ref})": baseline, f"this tree ({ours}{'+changes' if dirty else ''})": ROOT}
        rows: dict[str, list[dict]] = {side: [] for side in sides}
        for r in range(a.repeats):
            for side, tree in sides.items():
                rows[side].append(_run_side(tree, a.layers, a.hidden))
                last = rows[side][-1]
                print(f"round {r + 1}/{a.repeats} {side}: export {last['export_s']:.2f}s "
                      f"(IR import {last['import_s']:.2f}s), "
                      f"pipeline {last['pipeline_s']:.2f}s, nodes {last['nodes_exported']} -> {last['nodes_after']}",
                      flush=True)
    counts = {side: {(x["nodes_exported"], x["nodes_after"]) for x in results} for side, results in rows.items()}
    if len({c for s in counts.values() for c in s}) != 1:
        raise SystemExit(f"the two sides disagree on node counts: {counts}")
    base_side, our_side = list(rows)
    med = {side: {p: statistics.median(x[p] for x in results) for p in ("export_s", "import_s", "pipeline_s")}
           for side, results in rows.items()}
    for side in med:
        med[side]["total_s"] = med[side]["export_s"] + med[side]["pipeline_s"]
    n_before, n_after = next(iter(counts[our_side]))
    threads = rows[our_side][0]["torch_threads"]
    lines = [f"## Compile time of a {a.layers}-layer Llama graph (export + default pipeline)", "",
             f"transformers `LlamaForCausalLM` from a `LlamaConfig` with {a.layers} layers, hidden size {a.hidden} "
             f"(random weights, seed 0), exported with dynamic (batch, seq) dims to {n_before} IR nodes; the default "
             f"pipeline leaves {n_after}. Each side runs in a fresh interpreter ({threads} torch threads), rounds "
             f"alternate between the sides, medians of {a.repeats} rounds. Baseline: elision from "
             f"`{a.baseline_ref}`; other side: this tree. Node counts are equal on both sides.", "",
             "| side | torch.export -> IR (s) | of which FX -> IR import (s) | default pipeline (s) | total (s) |",
             "|---|---|---|---|---|"]
    for side in rows:
        m = med[side]
        lines.append(f"| {side} | {m['export_s']:.2f} | {m['import_s']:.2f} | {m['pipeline_s']:.2f} | "
                     f"{m['total_s']:.2f} |")
    ratio = {p: med[base_side][p] / med[our_side][p] for p in ("export_s", "import_s", "pipeline_s", "total_s")}
    lines.append(f"| speedup (baseline / this tree) | {ratio['export_s']:.2f}x | {ratio['import_s']:.2f}x | "
                 f"{ratio['pipeline_s']:.2f}x | {ratio['total_s']:.2f}x |")
    lines += ["", "Per pass (median seconds):", "", "| pass | " + " | ".join(rows) + " |", "|---|---|---|"]
    for name in rows[our_side][0]["passes"]:
        cells = [f"{statistics.median(x['passes'].get(name, float('nan')) for x in results):.3f}" for results in rows.values()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", f"Command: `python tools/bench_compile_time.py --baseline-ref {a.baseline_ref} --layers {a.layers} "
                  f"--hidden {a.hidden} --repeats {a.repeats}`", "", "![compile time](compile_time.png)"]
    out = Path(a.out)
    out.mkdir(exist_ok=True)
    (out / "compile_time.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out / "compile_time.png", f"{a.layers}-layer Llama, {n_before} nodes: compile phases")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
